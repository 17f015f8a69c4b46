"""Packing samples into ``seq_length`` rows, and the batch collator.

Packed samples never attend to each other: each row carries ``position_ids`` that restart at 0 for
every sample, and the collator sends **no** ``attention_mask``. transformers (>= 4.56,
``masking_utils.find_packed_sequence_indices``) then reads the sample boundaries from the position
ids and builds a block-diagonal causal mask for eager/SDPA/flex attention; FlashAttention-2 uses the
same position ids for its variable-length kernels. The first token of every sample has label -100,
so no position predicts the first token of the next sample: a packed row's loss is exactly the
token-weighted mean of its samples' losses run one by one (tests/test_data_packing.py proves it).

- In memory (SFT, and pre-training without ``dataset.streaming``), ``training.packing: true``:
  :func:`segments` turns every sample into one segment (SFT samples were truncated to seq_length;
  a pre-training document longer than seq_length is cut into seq_length pieces, each its own
  segment) and :func:`pack_best_fit` packs the segments best-fit decreasing (TRL's
  ``pack_dataset``): longest first, each into the row whose free space it fills most closely. Rows
  come out about 0.99 full, no segment is split across rows or dropped, and the result is a pure
  function of the input order (the seeded shuffle), so every rank and every restart builds the same
  rows.
- Streamed pre-training: documents (each ending with EOS) are concatenated and cut into
  ``seq_length`` blocks (:func:`pack_blocks`, lazily, in file order); a document that crosses a
  block boundary continues in the next block as a new segment (position 0). Every token is in the
  loss except each segment's first.
- :func:`pack_greedy` (samples in order, a new row when the next does not fit) is the earlier SFT
  packer, kept as the baseline the benchmarks compare with.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.chat_render import IGNORE_INDEX


def _ids_labels(sample: Any) -> tuple[list[int], list[int]]:
    if isinstance(sample, dict):
        return list(sample["input_ids"]), list(sample["labels"])
    return list(sample.input_ids), list(sample.labels)


def pack_greedy(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Whole samples, in order, into rows of at most seq_length tokens (a longer sample is cut)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        s_ids, s_labels = s_ids[:seq_length], s_labels[:seq_length]
        if not s_ids:
            continue
        if ids and len(ids) + len(s_ids) > seq_length:
            yield {"input_ids": ids, "labels": labels, "position_ids": pos}
            ids, labels, pos = [], [], []
        ids += s_ids
        labels += [IGNORE_INDEX, *s_labels[1:]]
        pos += list(range(len(s_ids)))
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": pos}


def pack_blocks(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Concatenate samples and cut into seq_length blocks; a sample crossing a boundary is split."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        start = 0
        while start < len(s_ids):
            take = min(seq_length - len(ids), len(s_ids) - start)
            ids += s_ids[start : start + take]
            labels += [IGNORE_INDEX, *s_labels[start + 1 : start + take]]
            pos += list(range(take))
            start += take
            if len(ids) == seq_length:
                yield {"input_ids": ids, "labels": labels, "position_ids": pos}
                ids, labels, pos = [], [], []
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": pos}


def segments(samples: Iterable[Any], seq_length: int, *, split: bool) -> Iterator[dict[str, list[int]]]:
    """Each sample as a segment to pack: positions from 0, first label masked. A sample longer than
    seq_length is cut into seq_length pieces (``split``, pre-training) or truncated (SFT)."""
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        for start in range(0, len(s_ids) if split else min(len(s_ids), 1), seq_length):
            piece = s_ids[start : start + seq_length]
            yield {
                "input_ids": piece,
                "labels": [IGNORE_INDEX, *s_labels[start + 1 : start + len(piece)]],
                "position_ids": list(range(len(piece))),
            }


# Segments packed together in one best-fit pass: more fills rows a little better, costs more memory.
PACK_WINDOW = 20_000


def pack_best_fit(dataset: Any, seq_length: int, window: int = PACK_WINDOW) -> Any:
    """Best-fit-decreasing packing of a ``datasets.Dataset`` of :func:`segments` (each at most
    seq_length) into rows of at most seq_length, ``window`` segments at a time (TRL's
    ``pack_dataset``, strategy bfd). The columns are concatenated per row; nothing is cut or dropped."""
    if len(dataset) == 0:
        return dataset
    import datasets
    from trl.data_utils import pack_dataset

    bars_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per pass would fill pod logs
    try:
        packed = pack_dataset(dataset, seq_length, strategy="bfd", map_kwargs={"batch_size": window})
    finally:
        if bars_on:
            datasets.enable_progress_bars()
    return packed.remove_columns("seq_lengths")


def chunk(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Pre-training without packing: each document on its own, cut into pieces of seq_length."""
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        for start in range(0, len(s_ids), seq_length):
            piece = s_labels[start : start + seq_length]
            yield {"input_ids": s_ids[start : start + seq_length], "labels": [IGNORE_INDEX, *piece[1:]]}


@dataclass
class DataCollator:
    """Pads a batch on the right.

    Unpacked rows (``input_ids``, ``labels``): pads with ``pad_token_id``, labels -100, and returns an
    ``attention_mask``. Packed rows (with ``position_ids``): pads the same way, gives the padding its
    own segment of position ids (0, 1, ...) and returns no ``attention_mask``, so transformers builds the
    per-sample mask from the position ids.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        packed = "position_ids" in features[0]
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids, labels, masks, positions = [], [], [], []
        for f in features:
            ids = [int(x) for x in f["input_ids"]]
            lab = [int(x) for x in f["labels"]]
            pad = longest - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            if packed:
                positions.append([int(x) for x in f["position_ids"]] + list(range(pad)))
            else:
                masks.append([1] * len(ids) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        return batch


@dataclass
class PaddingFreeCollator:
    """Packed rows as one row without padding, for flash attention's variable-length kernels
    (``training.attn_implementation: flash_attention_2`` with ``training.packing``).

    Every sample of every packed row (a run of ``position_ids`` from 0) becomes a sequence of its own
    for transformers' ``DataCollatorWithFlattening``, which concatenates them into a ``[1, tokens]``
    batch with ``position_ids`` restarting at each sample and no ``attention_mask``; flash attention
    reads the sample boundaries from the position ids. The batch holds exactly the rows' tokens, no
    padding, and samples still never attend to each other.
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        from transformers import DataCollatorWithFlattening

        samples = []
        for f in features:
            ids, labels, pos = list(f["input_ids"]), list(f["labels"]), [int(p) for p in f["position_ids"]]
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
            for a, b in zip(starts, starts[1:], strict=False):
                # the first label of each sample is already -100: the flattening collator's separator
                samples.append({"input_ids": ids[a:b], "labels": labels[a:b]})
        return DataCollatorWithFlattening(return_tensors="pt")(samples)


__all__ = [
    "PACK_WINDOW", "DataCollator", "PaddingFreeCollator", "chunk", "pack_best_fit", "pack_blocks", "pack_greedy",
    "segments",
]  # fmt: skip
