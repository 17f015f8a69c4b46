"""The data pipeline's shared pieces, and its entry point :func:`build_datasets`.

    built = build_datasets(job, tokenizer, seed=job.spec.training.seed)
    Trainer(..., train_dataset=built.train_dataset, eval_dataset=built.eval_dataset,
            data_collator=built.data_collator)

``build_datasets`` hands the job to its method's recipe (``kubetune_trainer/recipes/<method>.py``),
which assembles these pieces: :func:`data_context` (renderer, collator, counters), :func:`read_main`
(read rows -> normalise (formats.py) -> hold out ``validation_split`` of the rows, seeded),
:func:`add_mix` (``dataset.mix`` samples drawn in, shuffled, seeded), then one of

:func:`tokenized_data`
    render and mask (chat_render.py), truncated to ``seq_length`` -- or, for ``documents``
    (pre-training: text, each followed by EOS, every token in the loss), each cut into
    ``seq_length`` pieces -- drop samples with no trainable token, pack best-fit decreasing
    (``training.packing``, packing.py) or not. Rows of ``input_ids``, ``labels`` (+ ``position_ids``
    when packed; + ``length`` with ``training.group_by_length``) in a ``datasets.Dataset``. (sft,
    pretrain)
:func:`preference_data`
    ``prompt``/``chosen``/``rejected`` text rows rendered with the chat template (or ChatML) and
    system prompt, ready for a TRL preference trainer (which tokenizes them itself); no collator.
    (dpo)
:func:`streamed_documents`
    ``dataset.streaming``: read lazily (:class:`PretrainStream`, a torch ``IterableDataset``), packed
    by concatenating documents into ``seq_length`` blocks. (pretrain)

Mixing (``dataset.mix``): the main source keeps all its training samples and makes up
``1 - sum(ratios)`` of the result; each mix source adds ``ratio * total`` samples drawn from a seeded
permutation of its samples (repeated when it has fewer). Held-out evaluation rows come from the main
source only. Mix sources use the main dataset's ``system_prompt`` and ``apply_chat_template``.

Streaming (pre-training only; needs ``training.max_steps``): rows are read, tokenized and packed as
the trainer consumes them, in file order (no shuffling: shuffle the corpus beforehand), pass after
pass until max_steps. The order is a pure function of the files and the seed, so a resumed run sees
exactly the batches the interrupted run would have seen next; the cost is that the Trainer skips the
consumed batches by reading and tokenizing them again. s3:// data is downloaded to the local cache
(disk, not memory) before reading. Held-out rows are chosen by a seeded hash of the row index (at
most ``STREAM_EVAL_MAX_ROWS`` of them are evaluated). Mix sources are read into memory and
interleaved at a fixed cadence.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from kubetune_trainer.chat_render import ChatRenderer, Encoded
from kubetune_trainer.data_sources import BadRows, DataError, Row, iter_rows
from kubetune_trainer.formats import Columns, Example, Normalizer
from kubetune_trainer.packing import DataCollator, chunk, pack_best_fit, pack_blocks, segments

log = logging.getLogger("kubetune.data")

STREAM_EVAL_MAX_ROWS = 1000
_ENCODE_BATCH = 512


@dataclass
class DataStats:
    """Counts for logs and ``kubetune inspect-data``. ``None``: not known up front (streaming)."""

    rows: int | None = 0  # rows read, every source, bad ones included
    skipped_bad_rows: int | None = 0  # on_bad_row: skip
    empty_rows: int | None = 0  # empty text rows (pre-training), skipped
    samples: int | None = 0  # training samples (conversations / documents / preference pairs)
    eval_samples: int | None = 0
    mixed_samples: int | None = 0  # of `samples`, how many came from dataset.mix sources
    tokens: int | None = 0  # tokens of the training samples, after truncation
    trainable_tokens: int | None = 0  # of those, tokens in the loss
    truncated: int | None = 0  # samples cut at seq_length
    no_trainable: int | None = 0  # samples dropped: no token left in the loss (e.g. reply truncated away)
    sequences: int | None = 0  # rows the trainer iterates (packed rows, blocks, or samples)
    packing_efficiency: float | None = None  # tokens / (sequences * seq_length) when packed
    streaming: bool = False
    bad_row_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def n(v: Any) -> str:
            return "?" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.1%}"

        parts = [
            f"samples {n(self.samples)}", f"eval {n(self.eval_samples)}", f"tokens {n(self.tokens)}",
            f"trainable tokens {n(self.trainable_tokens)}", f"truncated {n(self.truncated)}",
            f"no trainable token {n(self.no_trainable)}", f"skipped bad rows {n(self.skipped_bad_rows)}",
            f"sequences {n(self.sequences)}",
        ]  # fmt: skip
        if self.mixed_samples:
            parts.append(f"from mix {n(self.mixed_samples)}")
        if self.empty_rows:
            parts.append(f"empty rows {n(self.empty_rows)}")
        if self.packing_efficiency is not None:
            parts.append(f"packing efficiency {n(self.packing_efficiency)}")
        if self.streaming:
            parts.append("streaming: counted as read")
        return ", ".join(parts)


@dataclass
class BuiltData:
    """What :func:`build_datasets` hands the trainer."""

    train_dataset: Any  # datasets.Dataset, or PretrainStream (torch IterableDataset) when streaming
    eval_dataset: Any | None  # same kind; None without validation_split
    data_collator: DataCollator | None  # None for dpo: TRL's DPOTrainer collates itself
    stats: DataStats
    method: str  # sft | pretrain | dpo
    packed: bool  # rows carry position_ids (one segment per sample), no attention_mask
    streaming: bool
    # ids that close a reply as rendered: add them to generation_config.eos_token_id
    end_of_turn_token_ids: list[int]


# ---------------------------------------------------------------- reading


class _Reader:
    """Rows of one source, normalised, with counts."""

    def __init__(self, uri: str, fmt: str, cols: Columns, method: str, s3: Any, bad: BadRows) -> None:
        self.uri = uri
        self.cols = cols
        self.s3 = s3
        self.bad = bad
        self.norm = Normalizer(fmt, cols, method, bad)
        self.rows = 0

    def rows_iter(self) -> Iterator[Row]:
        for row in iter_rows(self.uri, self.s3, text_column=self.cols.text, on_bad=self._on_bad):
            self.rows += 1
            yield row

    def _on_bad(self, err: Any) -> None:
        self.rows += 1  # unreadable rows count as read
        self.bad(err)

    def __iter__(self) -> Iterator[Example]:
        for row in self.rows_iter():
            ex = self.norm(row)
            if ex is not None:
                yield ex

    def read_all(self) -> list[Example]:
        out = list(self)
        if not out:
            raise DataError(f"{self.uri}: no usable rows ({self.rows} read, {self.bad.count} bad)")
        return out


def _mix_format(src: Any) -> str:
    # auto: the Normalizer detects it (a text column -> text for pretrain, else a chat format)
    return src.format


def _split(examples: list[Any], fraction: float, seed: int, what: str) -> tuple[list[Any], list[Any]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if fraction <= 0:
        return [examples[i] for i in order], []
    n_eval = max(1, round(len(examples) * fraction))
    if len(examples) - n_eval < 1:
        raise DataError(
            f"{what}: {len(examples)} usable rows cannot be split with validation_split {fraction}: "
            "nothing would be left to train on"
        )
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _mix_counts(n_main: int, ratios: list[float]) -> list[int]:
    total_ratio = sum(ratios)
    if total_ratio >= 1:
        raise DataError(
            f"dataset.mix ratios add up to {total_ratio:g}; they must leave a share for dataset.uri (sum < 1)"
        )
    total = n_main / (1 - total_ratio)
    return [max(1, round(r * total)) for r in ratios]


def _draw(examples: list[Example], n: int, seed: int) -> list[Example]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[order[j % len(order)]] for j in range(n)]


# ---------------------------------------------------------------- tokenizing


def _encode_all(
    renderer: ChatRenderer, examples: Iterable[Example], *, truncate: bool, stats: DataStats | None
) -> Iterator[Encoded]:
    """Encode lazily in tokenizer batches; count and drop samples with nothing to train."""
    batch: list[Example] = []

    def flush() -> Iterator[Encoded]:
        for enc in renderer.encode_batch(batch, truncate=truncate):
            trainable = enc.trainable
            if stats is not None:
                stats.truncated += int(enc.truncated)
                if trainable == 0:
                    stats.no_trainable += 1
                else:
                    stats.samples += 1
                    stats.tokens += len(enc.input_ids)
                    stats.trainable_tokens += trainable
            if trainable:
                yield enc
        batch.clear()

    for ex in examples:
        batch.append(ex)
        if len(batch) >= _ENCODE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def _sequences(
    encoded: Iterable[Encoded], documents: bool, packing: bool, seq_length: int
) -> Iterator[dict[str, list[int]]]:
    """In-memory rows: segments to pack (packing.pack_best_fit), or one sample (piece) per row.
    `documents`: samples are documents cut into seq_length pieces (pre-training), not truncated."""
    if packing:
        return segments(encoded, seq_length, split=documents)
    if documents:
        return chunk(encoded, seq_length)
    return ({"input_ids": e.input_ids, "labels": e.labels} for e in encoded)


def _to_dataset(rows: Iterable[dict[str, list[int]]], chunk_rows: int = 20_000) -> Any:
    """Rows -> an Arrow-backed ``datasets.Dataset`` of int32 lists, built a chunk at a time so that only
    one chunk is ever held as Python lists."""
    import datasets

    int_list = getattr(datasets, "List", datasets.Sequence)(datasets.Value("int32"))
    parts: list[Any] = []
    columns: dict[str, list[list[int]]] = {}

    def flush() -> None:
        feats = datasets.Features({k: int_list for k in columns})
        parts.append(datasets.Dataset.from_dict(columns, features=feats))
        columns.clear()

    n = 0
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(value)
        n += 1
        if n % chunk_rows == 0:
            flush()
    if columns or not parts:
        if not columns:
            columns = {"input_ids": [], "labels": []}
        flush()
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _tokenized_dataset(
    renderer: ChatRenderer,
    examples: list[Example],
    *,
    documents: bool,
    packing: bool,
    seq_length: int,
    stats: DataStats | None,
) -> Any:
    encoded = _encode_all(renderer, examples, truncate=not documents, stats=stats)
    ds = _to_dataset(_sequences(encoded, documents, packing, seq_length))
    if packing:
        ds = pack_best_fit(ds, seq_length)
    if stats is not None:
        stats.sequences = len(ds)
        if packing or documents:
            total = sum(len(x) for x in ds["input_ids"]) if len(ds) else 0
            stats.packing_efficiency = total / (len(ds) * seq_length) if len(ds) else None
    return ds


# Tensor cores work on tiles of 8 (bf16/fp16): on GPUs every batch is padded to a multiple of it.
CUDA_PAD_MULTIPLE = 8


def pad_multiple(device_type: str) -> int | None:
    """What the collator pads batch widths to a multiple of on `device_type` (None: the longest row)."""
    return CUDA_PAD_MULTIPLE if device_type == "cuda" else None


def _with_lengths(ds: Any) -> Any:
    """``ds`` with a ``length`` column (tokens per row), what transformers' length-grouped sampler reads."""
    import pyarrow.compute as pc

    return ds.add_column("length", pc.list_value_length(ds.data.column("input_ids")).to_pylist())


# ---------------------------------------------------------------- streaming


def _held_out(index: int, seed: int, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


class PretrainStream(IterableDataset):
    """Lazily read, tokenized and packed pre-training data (a torch ``IterableDataset``).

    Deterministic: iterating twice yields the same blocks, so the Trainer's skip-on-resume lands
    exactly where the interrupted run stopped. With DataLoader workers each worker reads the whole
    stream and keeps every n-th block, which preserves the order (at n times the tokenizing cost).
    """

    def __init__(
        self,
        *,
        uri: str,
        s3: Any,
        cols: Columns,
        renderer: ChatRenderer,
        seq_length: int,
        packing: bool,
        on_bad_row: str,
        validation_split: float,
        seed: int,
        part: str = "train",
        mix: list[tuple[list[Example], float]] | None = None,
        max_eval_rows: int = STREAM_EVAL_MAX_ROWS,
        repeat: bool = False,
    ) -> None:
        self.uri, self.s3, self.cols, self.renderer = uri, s3, cols, renderer
        self.seq_length, self.packing, self.on_bad_row = seq_length, packing, on_bad_row
        self.validation_split, self.seed, self.part = validation_split, seed, part
        self.mix = mix or []
        self.max_eval_rows = max_eval_rows
        self.repeat = repeat
        self.stats = DataStats(streaming=True)

    def _documents(self, stats: DataStats, bad: BadRows) -> Iterator[Example]:
        reader = _Reader(self.uri, "text", self.cols, "pretrain", self.s3, bad)
        kept = 0
        for index, ex in enumerate(reader):
            held = _held_out(index, self.seed, self.validation_split)
            if (self.part == "eval") != held:
                continue
            kept += 1
            yield ex
            if self.part == "eval" and kept >= self.max_eval_rows:
                break
        stats.rows = reader.rows
        stats.empty_rows = reader.norm.empty

    def _with_mix(self, docs: Iterator[Example]) -> Iterator[Example]:
        if not self.mix or self.part == "eval":
            yield from docs
            return
        total_ratio = sum(r for _, r in self.mix)
        # per main document, each mix source adds ratio / (1 - sum) samples on average
        rates = [r / (1 - total_ratio) for _, r in self.mix]
        acc = [0.0] * len(self.mix)
        pos = [0] * len(self.mix)
        orders = []
        for i, (exs, _) in enumerate(self.mix):
            order = list(range(len(exs)))
            random.Random(self.seed + 1 + i).shuffle(order)
            orders.append(order)
        for doc in docs:
            yield doc
            for i, (exs, _) in enumerate(self.mix):
                acc[i] += rates[i]
                while acc[i] >= 1:
                    acc[i] -= 1
                    yield exs[orders[i][pos[i] % len(exs)]]
                    pos[i] += 1
                    self.stats.mixed_samples = (self.stats.mixed_samples or 0) + 1

    def iter_sequences(self) -> Iterator[dict[str, list[int]]]:
        stats = DataStats(streaming=True)
        self.stats = stats
        bad = BadRows(self.on_bad_row)
        docs = self._with_mix(self._documents(stats, bad))
        encoded = _encode_all(self.renderer, docs, truncate=False, stats=stats)
        n = 0
        blocks = pack_blocks if self.packing else chunk  # a stream cannot be sorted by length
        for seq in blocks(encoded, self.seq_length):
            n += 1
            stats.sequences = n
            yield seq
        stats.skipped_bad_rows = bad.count
        stats.bad_row_examples = list(bad.first)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        """One pass, or (``repeat``, the training stream) pass after pass without end: the Trainer then
        sees one endless epoch that max_steps ends, and its skip-on-resume counts through earlier
        passes too, so a resume lands on the same block even after the data wrapped around."""
        info = get_worker_info()
        i = 0
        while True:
            produced = 0
            for seq in self.iter_sequences():
                produced += 1
                if info is None or i % info.num_workers == info.id:
                    yield seq
                i += 1
            if not self.repeat:
                return
            if produced == 0:
                raise DataError(f"{self.uri}: the stream holds no text to train on")


# ---------------------------------------------------------------- DPO


def _preference_dataset(
    renderer: ChatRenderer,
    examples: list[Example],
    seq_length: int,
    stats: DataStats | None,
    *,
    with_lengths: bool = False,
) -> Any:
    """`with_lengths`: add a ``length`` column (the prompt and the longer reply, capped at seq_length:
    the width TRL pads the pair to) for the length-grouped sampler."""
    import datasets

    rows = [renderer.preference_row(ex) for ex in examples]
    lengths: list[int] = []
    if (stats is not None or with_lengths) and rows:
        tok = renderer.tok
        for start in range(0, len(rows), _ENCODE_BATCH):
            part = rows[start : start + _ENCODE_BATCH]
            prompt = tok([r["prompt"] for r in part])["input_ids"]
            chosen = tok([r["chosen"] for r in part], add_special_tokens=False)["input_ids"]
            rejected = tok([r["rejected"] for r in part], add_special_tokens=False)["input_ids"]
            for p, c, r in zip(prompt, chosen, rejected, strict=True):
                lengths.append(min(seq_length, len(p) + max(len(c), len(r))))
                if stats is None:
                    continue
                stats.samples += 1
                stats.tokens += 2 * len(p) + len(c) + len(r)
                stats.trainable_tokens += len(c) + len(r)
                if len(p) + max(len(c), len(r)) > seq_length:
                    stats.truncated += 1
                if len(p) >= seq_length:
                    stats.no_trainable += 1
    if stats is not None:
        stats.sequences = len(rows)
    cols: dict[str, list[Any]] = {k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")}
    if with_lengths:
        cols["length"] = lengths
    return datasets.Dataset.from_dict(cols)


# ---------------------------------------------------------------- pieces the recipes assemble


@dataclass
class DataContext:
    """What every method's pipeline starts from (:func:`data_context`)."""

    job: Any
    spec: Any
    method: str
    seed: int
    s3: Any
    cols: Columns  # dataset.uri's column names
    renderer: ChatRenderer
    pad_id: int
    collator: DataCollator  # pads to the longest row (a multiple of 8 on GPUs)
    bad: BadRows  # every source's bad rows (dataset.on_bad_row)
    stats: DataStats
    end_of_turn_token_ids: list[int]

    @property
    def ds(self) -> Any:
        return self.spec.dataset

    @property
    def seq_length(self) -> int:
        return self.spec.training.seq_length

    def reader(self, uri: str, fmt: str, columns: Any) -> _Reader:
        return _Reader(uri, fmt, Columns.from_spec(columns), self.method, self.s3, self.bad)

    def main_reader(self, uri: str | None = None) -> _Reader:
        """dataset.uri (or `uri`, read the same way) in the format spec.dataset_format resolves."""
        return self.reader(uri or self.ds.uri, self.spec.dataset_format(), self.ds.columns)

    def built(self, train: Any, evald: Any, collator: DataCollator | None, packed: bool) -> BuiltData:
        """The result, with the bad rows counted."""
        self.stats.skipped_bad_rows = self.bad.count
        self.stats.bad_row_examples = list(self.bad.first)
        log.debug("data: %s", self.stats.summary())
        return BuiltData(
            train, evald, collator, self.stats, self.method, packed, False, self.end_of_turn_token_ids
        )


def data_context(job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> DataContext:
    """The renderer (chat template or ChatML, system prompt), collator and counters of `job`'s data."""
    spec = job.spec
    ds = spec.dataset
    renderer = ChatRenderer(
        tokenizer,
        apply_chat_template=ds.apply_chat_template,
        system_prompt=ds.system_prompt,
        seq_length=spec.training.seq_length,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    return DataContext(
        job=job, spec=spec, method=spec.method, seed=seed, s3=spec.storage.s3 if spec.storage is not None else None,
        cols=Columns.from_spec(ds.columns), renderer=renderer, pad_id=pad_id,
        collator=DataCollator(pad_token_id=pad_id, pad_to_multiple_of=pad_multiple(device_type)),
        bad=BadRows(ds.on_bad_row), stats=DataStats(), end_of_turn_token_ids=renderer.end_of_turn_token_ids(),
    )  # fmt: skip


def read_main(ctx: DataContext) -> tuple[list[Example], list[Example]]:
    """dataset.uri's usable examples, split (seeded) into (train, held out by validation_split)."""
    main = ctx.main_reader()
    examples = main.read_all()
    ctx.stats.rows = main.rows
    ctx.stats.empty_rows = main.norm.empty
    return _split(examples, ctx.ds.validation_split, ctx.seed, ctx.ds.uri)


def add_mix(ctx: DataContext, train_ex: list[Example]) -> list[Example]:
    """`train_ex` with the dataset.mix samples drawn in (see the module docstring), shuffled (seeded)."""
    ds = ctx.ds
    if not ds.mix:
        return train_ex
    counts = _mix_counts(len(train_ex), [m.ratio for m in ds.mix])
    for i, (src, n) in enumerate(zip(ds.mix, counts, strict=True)):
        reader = ctx.reader(src.uri, _mix_format(src), src.columns)
        drawn = _draw(reader.read_all(), n, ctx.seed + 1 + i)
        ctx.stats.rows += reader.rows
        ctx.stats.mixed_samples += len(drawn)
        train_ex = train_ex + drawn
    random.Random(ctx.seed + 1000).shuffle(train_ex)
    return train_ex


def tokenized_data(
    ctx: DataContext, train_ex: list[Example], eval_ex: list[Example], *, documents: bool
) -> BuiltData:
    """Examples rendered, masked and tokenized (truncated to seq_length, or with `documents` cut into
    seq_length pieces), packed best fit with training.packing, with a ``length`` column for
    training.group_by_length; samples with no trainable token dropped and counted."""
    training = ctx.spec.training
    common = dict(documents=documents, packing=training.packing, seq_length=ctx.seq_length)
    train = _tokenized_dataset(ctx.renderer, train_ex, stats=ctx.stats, **common)
    if ctx.stats.samples == 0:
        raise DataError(
            f"{ctx.ds.uri}: no sample has a token to train on after rendering and truncation to "
            f"seq_length {ctx.seq_length} ({ctx.stats.no_trainable} samples dropped)"
        )
    evald = None
    if eval_ex:
        eval_stats = DataStats()
        evald = _tokenized_dataset(ctx.renderer, eval_ex, stats=eval_stats, **common)
        ctx.stats.eval_samples = eval_stats.samples
        if len(evald) == 0:
            evald = None
    packed = "position_ids" in train.column_names
    if training.group_by_length:
        # the sampler reads this column instead of measuring every row
        train = _with_lengths(train)
        evald = _with_lengths(evald) if evald is not None else None
    return ctx.built(train, evald, ctx.collator, packed)


def preference_data(ctx: DataContext, train_ex: list[Example], eval_ex: list[Example]) -> BuiltData:
    """prompt/chosen/rejected text rows for a TRL preference trainer (which tokenizes and collates them
    itself: no collator), with a ``length`` column for training.group_by_length."""
    grouped = ctx.spec.training.group_by_length
    train = _preference_dataset(ctx.renderer, train_ex, ctx.seq_length, ctx.stats, with_lengths=grouped)
    evald = (
        _preference_dataset(ctx.renderer, eval_ex, ctx.seq_length, None, with_lengths=grouped)
        if eval_ex
        else None
    )
    ctx.stats.eval_samples = len(eval_ex)
    return ctx.built(train, evald, None, False)


def streamed_documents(ctx: DataContext) -> BuiltData:
    """dataset.uri read lazily as text documents (:class:`PretrainStream`), mix sources in memory;
    the spec's rules guarantee a method that streams and training.max_steps here."""
    ds, training = ctx.ds, ctx.spec.training
    mix = []
    for src in ds.mix:
        mix.append((ctx.reader(src.uri, _mix_format(src), src.columns).read_all(), src.ratio))
    if mix:
        _mix_counts(1, [r for _, r in mix])  # checks the ratios
    common = dict(
        uri=ds.uri, s3=ctx.s3, cols=ctx.cols, renderer=ctx.renderer, seq_length=ctx.seq_length,
        packing=training.packing, on_bad_row=ds.on_bad_row, validation_split=ds.validation_split, seed=ctx.seed,
    )  # fmt: skip
    train = PretrainStream(part="train", mix=mix, repeat=True, **common)
    evald = PretrainStream(part="eval", **common) if ds.validation_split > 0 else None
    unknown = DataStats(
        rows=None, skipped_bad_rows=None, empty_rows=None, samples=None, eval_samples=None,
        mixed_samples=None, tokens=None, trainable_tokens=None, truncated=None, no_trainable=None,
        sequences=None, streaming=True,
    )  # fmt: skip
    # Every batch exactly seq_length wide: with several processes accelerate reads an
    # IterableDataset on rank 0 and concatenates one batch per rank before dispatching them.
    fixed = DataCollator(pad_token_id=ctx.pad_id, pad_to_multiple_of=ctx.seq_length)
    return BuiltData(
        train, evald, fixed, unknown, ctx.method, training.packing, True, ctx.end_of_turn_token_ids
    )


def first_examples(ctx: DataContext, n: int) -> list[Example]:
    """The first `n` usable examples of dataset.uri, in file order (what inspect-data shows)."""
    return [ex for _, ex in zip(range(n), ctx.main_reader(), strict=False)]


# ---------------------------------------------------------------- entry points


def build_datasets(job: Any, tokenizer: Any, seed: int, *, device_type: str = "cpu") -> BuiltData:
    """Read, normalise, render, mask and pack the job's data as its method's recipe does
    (``kubetune_trainer.recipes``). Raises :class:`DataError` (a ValueError) with a user-facing message
    (file, row and field for a bad row) when the data is unusable. `device_type`: where the batches go
    (``cuda``: padded to a multiple of :data:`CUDA_PAD_MULTIPLE`)."""
    from kubetune_trainer import recipes

    return recipes.get(job.spec.method).build_data(job, tokenizer, seed=seed, device_type=device_type)


def preview(job: Any, tokenizer: Any, n: int = 3) -> list[tuple[Example, Any]]:
    """The first ``n`` usable examples of the main source, in file order, rendered by the method's
    recipe: (example, Encoded) where tokens are masked (sft, pretrain), (example, {field: text}) for
    text rows a TRL trainer tokenizes itself (dpo: prompt, chosen, rejected)."""
    from kubetune_trainer import recipes

    return recipes.get(job.spec.method).preview(job, tokenizer, n)


def evaluation_examples(job: Any, limit: int, uri: str | None = None) -> list[Example]:
    """Up to `limit` normalised examples to evaluate on: the first rows of `uri` (read with the main
    dataset's format and columns), or without it the rows `build_datasets` held out, in its order."""
    spec = job.spec
    ds = spec.dataset
    s3 = spec.storage.s3 if spec.storage is not None else None
    reader = _Reader(
        uri or ds.uri, spec.dataset_format(), Columns.from_spec(ds.columns), spec.method, s3,
        BadRows(ds.on_bad_row),
    )  # fmt: skip
    if uri is not None:
        return [ex for _, ex in zip(range(limit), reader, strict=False)]
    if ds.streaming:
        held = (ex for i, ex in enumerate(reader) if _held_out(i, spec.training.seed, ds.validation_split))
        return [ex for _, ex in zip(range(limit), held, strict=False)]
    return _split(reader.read_all(), ds.validation_split, spec.training.seed, ds.uri)[1][:limit]


__all__ = [
    "BuiltData", "DataContext", "DataStats", "PretrainStream", "add_mix", "build_datasets", "data_context",
    "evaluation_examples", "first_examples", "preference_data", "preview", "read_main", "streamed_documents",
    "tokenized_data",
]  # fmt: skip
