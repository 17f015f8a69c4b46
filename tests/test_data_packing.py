"""Packing: samples in one row never attend to each other.

The key test runs a random tiny Qwen2 / Llama model: the loss of a packed batch must equal the
token-weighted mean loss of the same samples run one at a time (eager and SDPA attention). A
control run with positions that do not restart gives a different loss, so the test can fail.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.chat_render import IGNORE_INDEX, ChatRenderer
from kubetune_trainer.data_sources import iter_rows
from kubetune_trainer.datasets_build import PretrainStream, build_datasets
from kubetune_trainer.formats import ASSISTANT, USER, Columns, Example, Turn
from kubetune_trainer.packing import DataCollator, chunk, pack_best_fit, pack_blocks, pack_greedy, segments
from tests.fixtures_data import EXAMPLE_DATA, make_job


def _alpaca_samples(tokenizer: Any, n: int = 7, seq_length: int = 160) -> list[Any]:
    rows = json.loads((EXAMPLE_DATA / "alpaca_en_200.json").read_text())[:n]
    r = ChatRenderer(tokenizer, system_prompt="Be helpful.", seq_length=seq_length)
    exs = [
        Example(
            "chat",
            (
                Turn(USER, row["instruction"] + ("\n" + row["input"] if row["input"] else "")),
                Turn(ASSISTANT, row["output"]),
            ),
        )
        for row in rows
    ]
    return r.encode_batch(exs)


C4 = EXAMPLE_DATA / "c4_118.jsonl"


def test_pack_greedy_positions_restart_and_first_labels_masked() -> None:
    samples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]},
    ]
    rows = list(pack_greedy(samples, 6))
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9], "position_ids": [0, 1, 2, 3]},
    ]


def _best_fit(samples: list[Any], seq_length: int, *, split: bool = False) -> list[dict[str, list[int]]]:
    import datasets

    rows = datasets.Dataset.from_list(list(segments(samples, seq_length, split=split)))
    return list(pack_best_fit(rows, seq_length))


def _segments_of(row: dict[str, list[int]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each sample in a packed row, cut where the position ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in itertools.pairwise(starts)]


def test_best_fit_puts_each_sample_where_it_fills_a_row_most_closely() -> None:
    lengths = [5, 4, 3, 2, 2]  # in order, the greedy packer needs 4 rows of 6: [5] [4] [3 2] [2]
    samples = [
        {"input_ids": [10 * n + i for i in range(n)], "labels": [10 * n + i for i in range(n)]}
        for n in lengths
    ]
    samples[3]["input_ids"] = samples[3]["labels"] = [7, 8]
    assert len(list(pack_greedy(samples, 6))) == 4
    rows = _best_fit(samples, 6)
    # longest first; each 2 goes to the row whose free space it fills most closely
    assert [[len(ids) for ids, _ in _segments_of(r)] for r in rows] == [[5], [4, 2], [3, 2]]
    assert rows[1] == {
        "input_ids": [40, 41, 42, 43, 7, 8],
        "labels": [-100, 41, 42, 43, -100, 8],
        "position_ids": [0, 1, 2, 3, 0, 1],
    }
    assert _best_fit(samples, 6) == rows  # a pure function of the input


def test_best_fit_fills_rows_of_the_alpaca_demo_and_keeps_every_sample_whole(tokenizer: Any) -> None:
    data = {"uri": str(EXAMPLE_DATA / "alpaca_en_200.json")}
    packed = build_datasets(make_job(data, training={"seq_length": 512, "packing": True}), tokenizer, seed=42)
    assert packed.stats.packing_efficiency >= 0.97
    rows = list(packed.train_dataset)
    assert all(len(r["input_ids"]) <= 512 for r in rows)
    # the same samples unpacked (same seed, same truncation): each one is in exactly one row, whole
    plain = build_datasets(make_job(data, training={"seq_length": 512}), tokenizer, seed=42)
    want = sorted((s["input_ids"], [IGNORE_INDEX, *s["labels"][1:]]) for s in plain.train_dataset)
    got = sorted(seg for r in rows for seg in _segments_of(r))
    assert got == want and len(got) == packed.stats.samples == 200
    # what rows in order reach on the same samples
    greedy = list(pack_greedy(plain.train_dataset, 512))
    assert sum(len(r["input_ids"]) for r in greedy) / (len(greedy) * 512) < 0.85
    assert len(rows) < len(greedy)


def test_pack_blocks_and_chunk_split_documents() -> None:
    docs = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8]},
    ]
    blocks = list(pack_blocks(docs, 4))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert [b["labels"] for b in blocks] == [[-100, 2, 3, 4], [-100, -100, 7, 8]]
    assert list(chunk(docs, 4)) == [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]},
        {"input_ids": [5], "labels": [-100]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8]},
    ]


def test_collator_padded_and_packed() -> None:
    c = DataCollator(pad_token_id=0)
    b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    p = c(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 0]},
            {"input_ids": [8], "labels": [-100], "position_ids": [0]},
        ]
    )
    assert "attention_mask" not in p
    assert p["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]  # padding is a segment of its own
    assert (
        DataCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "labels": [1]}])["input_ids"].shape[1] == 8
    )


def _loss_sum_count(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    import torch

    with torch.no_grad():
        out = model(**batch)
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return float(out.loss) * n, n


@pytest.mark.parametrize("packer", ["best_fit", "greedy"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_mean(
    tokenizer: Any, tiny_model_dirs: dict, load_tiny: Any, arch: str, attn: str, packer: str
) -> None:
    import torch

    model = load_tiny(tiny_model_dirs[arch], attn, sharpen=5.0)
    samples = _alpaca_samples(tokenizer)
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)

    # unpacked, one sample at a time: token-weighted mean of per-sample losses
    total, count = 0.0, 0
    for s in samples:
        batch = {"input_ids": torch.tensor([s.input_ids]), "labels": torch.tensor([s.labels])}
        loss_sum, n = _loss_sum_count(model, batch)
        total, count = total + loss_sum, count + n
    unpacked = total / count

    # unpacked but padded into one batch (attention_mask path)
    padded = collate([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    padded_loss = float(model(**padded).loss.detach())

    # packed: several samples per row, two rows of different lengths (the shorter one padded)
    rows = _best_fit(samples, 320) if packer == "best_fit" else list(pack_greedy(samples, 320))
    assert len(rows) >= 2 and any(r["position_ids"].count(0) >= 2 for r in rows)
    packed_batch = collate(rows)
    assert "attention_mask" not in packed_batch
    packed_loss = float(model(**packed_batch).loss.detach())

    assert packed_loss == pytest.approx(unpacked, abs=1e-5, rel=1e-5)
    assert padded_loss == pytest.approx(unpacked, abs=1e-5, rel=1e-5)

    # control: the same rows with positions that run on (samples see each other) give another loss
    leaky = dict(packed_batch)
    leaky["position_ids"] = torch.arange(packed_batch["input_ids"].shape[1]).expand_as(
        packed_batch["input_ids"]
    )
    leaky_loss = float(model(**leaky).loss.detach())
    assert abs(leaky_loss - unpacked) > 1e-3


def test_packing_needs_the_kv_cache_off(tokenizer: Any, tiny_model_dirs: dict, load_tiny: Any) -> None:
    """transformers only reads packed sequences from position_ids when no KV cache is built: training
    must run with config.use_cache = False (model_loading sets it). This documents why."""
    import torch

    model = load_tiny(tiny_model_dirs["qwen2"], "sdpa")
    s1, s2 = _alpaca_samples(tokenizer, n=2)
    batch = DataCollator(pad_token_id=tokenizer.pad_token_id)(list(pack_greedy([s1, s2], 1024)))
    n1 = len(s1.input_ids)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([s2.input_ids]), use_cache=False).logits[0]
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, n1:]
        leaking = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True
        ).logits[0, n1:]
    torch.testing.assert_close(isolated, alone, atol=1e-5, rtol=1e-5)
    assert (leaking - alone).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pretrain_block_doc2_loss_independent_of_doc1(
    tokenizer: Any, tiny_model_dirs: dict, load_tiny: Any, attn: str
) -> None:
    """A crafted pair: doc 2's per-token loss is identical whether doc 1 precedes it in the block."""
    import torch
    import torch.nn.functional as F

    model = load_tiny(tiny_model_dirs["qwen2"], attn)
    r = ChatRenderer(tokenizer)
    doc1 = Example("text", text="The secret password is blue falcon. " * 4)
    doc2 = Example("text", text="The secret password is")
    e1, e2 = r.encode_batch([doc1, doc2], truncate=False)
    assert e1.input_ids[-1] == tokenizer.eos_token_id and e1.labels[-1] == tokenizer.eos_token_id
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)

    def per_token(rows: list[dict]) -> tuple[Any, Any]:
        batch = collate(rows)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        labels = batch["labels"][0]
        return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none"), logits

    together = list(pack_blocks([e1, e2], 1024))
    alone = list(pack_blocks([e2], 1024))
    assert len(together) == 1 and together[0]["position_ids"].count(0) == 2
    loss_together, logits_together = per_token(together)
    loss_alone, logits_alone = per_token(alone)
    n1, n2 = len(e1.input_ids), len(e2.input_ids)
    torch.testing.assert_close(logits_together[n1:], logits_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_together[n1 : n1 + n2 - 1], loss_alone, atol=1e-5, rtol=1e-5)
    # nothing in doc 1 is trained to predict doc 2's first token
    assert together[0]["labels"][n1] == IGNORE_INDEX

    leaky = collate(together)
    with torch.no_grad():
        logits_leaky = model(input_ids=leaky["input_ids"], position_ids=torch.arange(n1 + n2)[None]).logits[0]
    assert (logits_leaky[n1:] - logits_alone).abs().max() > 1e-3


def test_pretrain_build_blocks_every_token_trained(tokenizer: Any) -> None:
    job = make_job(
        {"uri": str(C4)},
        method="pretrain",
        training={"seq_length": 256, "packing": True},
    )
    built = build_datasets(job, tokenizer, seed=0)
    assert built.packed and built.method == "pretrain"
    rows = list(built.train_dataset)
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    eos = tokenizer.eos_token_id
    n_eos = sum(r["input_ids"].count(eos) for r in rows)
    assert n_eos == built.stats.samples == 118
    # a document is cut only where it is longer than a row: one segment per 256 tokens of it
    # (concatenated blocks, as streaming packs, cut many more)
    renderer = ChatRenderer(tokenizer)
    docs = renderer.encode_batch(
        [Example("text", text=row.data["text"]) for row in iter_rows(str(C4))], truncate=False
    )
    blocks = list(pack_blocks(docs, 256))
    n_segments = sum(r["position_ids"].count(0) for r in rows)
    assert n_segments == sum(-(-len(d.input_ids) // 256) for d in docs)
    assert n_segments < sum(b["position_ids"].count(0) for b in blocks)
    for r in rows:
        starts = {i for i, p in enumerate(r["position_ids"]) if p == 0}
        for i, (tok_id, lab) in enumerate(zip(r["input_ids"], r["labels"], strict=True)):
            assert lab == (IGNORE_INDEX if i in starts else tok_id)
    assert built.stats.packing_efficiency > 0.99
    # without packing: each document cut into seq_length pieces, padded
    job2 = make_job(
        {"uri": str(EXAMPLE_DATA / "c4_118.jsonl")}, method="pretrain", training={"seq_length": 256}
    )
    built2 = build_datasets(job2, tokenizer, seed=0)
    assert not built2.packed and "position_ids" not in built2.train_dataset.column_names
    assert len(built2.train_dataset) > 118


def test_sft_packing_build_and_eval_split(tokenizer: Any) -> None:
    job = make_job(
        {"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "validation_split": 0.1},
        training={"seq_length": 512, "packing": True},
    )
    built = build_datasets(job, tokenizer, seed=3)
    assert built.packed and built.stats.samples == 180 and built.stats.eval_samples == 20
    assert built.stats.sequences < 180 and len(built.eval_dataset) >= 1
    assert sum(r["position_ids"].count(0) for r in built.train_dataset) == 180
    again = build_datasets(job, tokenizer, seed=3)
    assert list(again.train_dataset["input_ids"]) == list(built.train_dataset["input_ids"])
    other = build_datasets(job, tokenizer, seed=4)
    assert list(other.train_dataset["input_ids"]) != list(built.train_dataset["input_ids"])


def test_mix_by_ratio(tokenizer: Any) -> None:
    job = make_job(
        {
            "uri": str(EXAMPLE_DATA / "c4_118.jsonl"),
            "mix": [{"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "ratio": 0.2}],
        },
        method="pretrain",
        training={"seq_length": 512, "packing": True},
    )
    built = build_datasets(job, tokenizer, seed=0)
    s = built.stats
    assert s.mixed_samples == round(0.2 * 118 / 0.8) == 30
    assert s.samples == 118 + 30
    # chat samples keep their prompt masked inside pre-training blocks
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    masked = [
        lab
        for r in built.train_dataset
        for i, lab in zip(r["input_ids"], r["labels"], strict=True)
        if i == im_start
    ]
    assert masked and all(lab == IGNORE_INDEX for lab in masked)
    bad = make_job(
        {
            "uri": str(EXAMPLE_DATA / "c4_118.jsonl"),
            "mix": [
                {"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "ratio": 0.6},
                {"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "ratio": 0.5},
            ],
        },
        method="pretrain",
    )
    from kubetune_trainer.data_sources import DataError

    with pytest.raises(DataError, match="ratios add up to 1.1"):
        build_datasets(bad, tokenizer, seed=0)


def _stream(tokenizer: Any, path: Path, **kw: Any) -> PretrainStream:
    args = dict(
        uri=str(path), s3=None, cols=Columns(), renderer=ChatRenderer(tokenizer), seq_length=128, packing=True,
        on_bad_row="error", validation_split=0.0, seed=0,
    )  # fmt: skip
    args.update(kw)
    return PretrainStream(**args)


def test_streaming_is_deterministic_and_matches_in_memory_packing(tokenizer: Any) -> None:
    path = EXAMPLE_DATA / "c4_118.jsonl"
    stream = _stream(tokenizer, path)
    first = list(stream)
    assert first == list(stream)  # a second pass (a resumed run) sees the same blocks
    r = ChatRenderer(tokenizer)
    docs = [Example("text", text=row.data["text"]) for row in iter_rows(str(path))]
    assert first == list(pack_blocks(r.encode_batch(docs, truncate=False), 128))
    # resume after k batches = the tail of an uninterrupted pass
    k = 7
    assert list(itertools.islice(iter(stream), k, None)) == first[k:]
    assert stream.stats.sequences == len(first) and stream.stats.samples == 118


def test_streaming_eval_holdout_and_workers(tokenizer: Any) -> None:
    import torch

    path = EXAMPLE_DATA / "c4_118.jsonl"
    train = _stream(tokenizer, path, validation_split=0.2, packing=False)
    evals = _stream(tokenizer, path, validation_split=0.2, packing=False, part="eval")
    list(train), list(evals)
    assert train.stats.samples + evals.stats.samples == 118 and 10 < evals.stats.samples < 40
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=2)
    assert [b["input_ids"] for b in loader] == [b["input_ids"] for b in train]


def test_streaming_build(tokenizer: Any) -> None:
    # (a stream without training.max_steps is refused by the spec: tests/test_validate.py)
    job = make_job(
        {"uri": str(EXAMPLE_DATA / "c4_118.jsonl"), "streaming": True, "validation_split": 0.1,
         "mix": [{"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "ratio": 0.25}]},
        method="pretrain", training={"max_steps": 10, "packing": True, "seq_length": 256},
    )  # fmt: skip
    built = build_datasets(job, tokenizer, seed=0)
    assert built.streaming and isinstance(built.train_dataset, torch_iterable())
    blocks = list(built.train_dataset.iter_sequences())  # one pass
    assert blocks and all(len(b["input_ids"]) <= 256 for b in blocks)
    st = built.train_dataset.stats
    assert st.mixed_samples == pytest.approx(st.samples * 0.25, abs=2)
    assert list(built.eval_dataset)  # the eval stream is finite
    # fixed-width batches (accelerate concatenates one batch per rank when it dispatches a stream)
    assert built.data_collator(blocks[-1:])["input_ids"].shape == (1, 256)
    # the training stream repeats pass after pass (max_steps ends training)
    two_passes = list(itertools.islice(iter(built.train_dataset), 2 * len(blocks)))
    assert two_passes == blocks + blocks


def test_streaming_resume_skips_to_the_same_batch_even_after_wrapping(tokenizer: Any) -> None:
    """What the Trainer does on resume: accelerate's skip_first_batches over a fresh dataloader."""
    from accelerate.data_loader import skip_first_batches
    from torch.utils.data import DataLoader

    stream = _stream(tokenizer, EXAMPLE_DATA / "c4_118.jsonl", repeat=True)
    n_pass = sum(1 for _ in stream.iter_sequences())
    collate = DataCollator(pad_token_id=tokenizer.pad_token_id)

    def loader() -> DataLoader:
        return DataLoader(stream, batch_size=4, collate_fn=collate)

    per_pass = -(-n_pass // 4)
    total = per_pass + 5  # beyond the end of the first pass
    uninterrupted = [b["input_ids"].tolist() for b in itertools.islice(loader(), total)]
    for done in (3, per_pass + 2):
        resumed = [
            b["input_ids"].tolist()
            for b in itertools.islice(skip_first_batches(loader(), done), total - done)
        ]
        assert resumed == uninterrupted[done:]


def torch_iterable() -> type:
    import torch.utils.data

    return torch.utils.data.IterableDataset
