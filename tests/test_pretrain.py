"""method pretrain through run_training: the SFT trainer path fed plain text.

Real C4 text (examples/data/c4_118.jsonl): the first 100 documents train, the last 18 are the
held-out text of the same domain whose perplexity must fall. The batches the Trainer actually
feeds the model are recorded: every token is in the loss but each segment's first, documents are
separated by EOS, and no document attends to another (each segment's logits in the packed row
equal the logits of that segment run alone; a control with positions that do not restart
differs). Mixing SFT data by ratio and streaming with an exact resume run through the trainer too.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from kubetune.spec import FineTuneJob
from tests.callbacks import StopAt

REPO = Path(__file__).resolve().parents[1]
C4 = REPO / "examples/data/c4_118.jsonl"
ALPACA = REPO / "examples/data/alpaca_en_200.json"


def make_job(name: str, model_path: Path, data: Path, out: Path, **spec: Any) -> FineTuneJob:
    training = {
        "max_steps": 40, "learning_rate": 3e-3, "per_device_train_batch_size": 4, "seq_length": 128,
        "packing": True, "precision": "fp32", "lr_scheduler_type": "constant", "logging_steps": 1,
        **spec.pop("training", {}),
    }  # fmt: skip
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model_path)},
            "dataset": {"uri": str(data), **spec.pop("dataset", {})},
            "method": "pretrain",
            "pet_config": spec.pop("pet_config", {"pet_type": "full"}),
            "training": training,
            "checkpoint": {"every_steps": 1000, **spec.pop("checkpoint", {})},
            "output": {"uri": str(out), **spec.pop("output", {})},
            **spec,
        },
    }
    return FineTuneJob.model_validate(doc)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    lines = C4.read_text(encoding="utf-8").splitlines()
    d = tmp_path_factory.mktemp("c4")
    (d / "train.jsonl").write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    (d / "heldout.jsonl").write_text("\n".join(lines[100:]) + "\n", encoding="utf-8")
    (d / "two.jsonl").write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    return {"train": d / "train.jsonl", "heldout": d / "heldout.jsonl", "two": d / "two.jsonl"}


class BatchRecorder(TrainerCallback):
    """Keeps the keyword arguments of every training forward call of the model."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self._handle: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        def hook(module: Any, a: Any, kwargs: dict[str, Any]) -> None:
            if module.training:
                self.batches.append(
                    {k: v.detach().clone() for k, v in kwargs.items() if hasattr(v, "detach")}
                )

        self._handle = model.register_forward_pre_hook(hook, with_kwargs=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._handle.remove()


def held_out_loss(model: Any, job: FineTuneJob, tokenizer: Any) -> float:
    """Mean token loss of `job`'s data (packed blocks, the trainer's own collator) under `model`."""
    import torch

    from kubetune_trainer.datasets_build import build_datasets

    data = build_datasets(job, tokenizer, seed=0)
    rows = list(data.train_dataset)
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = data.data_collator(rows[i : i + 8])
            out = model(**batch)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def load(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model


def test_pretrain_lowers_held_out_perplexity_and_keeps_documents_apart(
    tiny_model_dirs: dict, corpus: dict, tmp_path: Path
) -> None:
    import torch

    from kubetune_trainer.model_loading import load_tokenizer
    from kubetune_trainer.train import run_training

    base_dir = tiny_model_dirs["qwen2"]
    job = make_job("pt", base_dir, corpus["train"], tmp_path / "out")
    recorder = BatchRecorder()
    result = run_training(job, workdir=tmp_path / "work", callbacks=[recorder])
    assert result.completed and result.global_step == 40
    tokenizer = load_tokenizer(job.spec, base_dir)

    # held-out text of the same domain: perplexity falls
    heldout = make_job("heldout", base_dir, corpus["heldout"], tmp_path / "unused")
    before = math.exp(held_out_loss(load(base_dir), heldout, tokenizer))
    trained = load(result.exported["merged"])
    after = math.exp(held_out_loss(trained, heldout, tokenizer))
    assert after < 0.7 * before, (before, after)
    print(f"held-out perplexity {before:.0f} -> {after:.0f} after 40 steps", file=sys.__stdout__)

    # the batches the Trainer fed the model: packed rows, every token in the loss, EOS between documents
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    fill = []
    assert len(recorder.batches) == 40
    for batch in recorder.batches:
        assert batch.get("attention_mask") is None
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        assert ids.shape[0] == 4 and ids.shape[1] <= 128
        for r in range(4):
            real = ids.shape[1]  # the padding after the last document: a segment of its own, not trained
            while real and int(ids[r, real - 1]) == pad and int(labels[r, real - 1]) == -100:
                real -= 1
            assert pos[r, real:].tolist() == list(range(ids.shape[1] - real))
            starts = [i for i in range(real) if pos[r, i] == 0]
            assert labels[r, :real].tolist() == [-100 if i in starts else int(ids[r, i]) for i in range(real)]
            assert all(ids[r, s - 1] == eos for s in starts if s > 0)
            rows.append((ids[r, :real], pos[r, :real], starts))
            fill.append(real / 128)
    joined = [row for row in rows if len(row[2]) >= 2]
    assert len(joined) >= 10, "rows should join documents"
    assert sum(fill) / len(fill) > 0.97

    # no document attends to another: each segment's logits equal that segment run alone
    ids, pos, starts = joined[0]
    bounds = [*starts, len(ids)]
    with torch.no_grad():
        packed = trained(input_ids=ids[None], position_ids=pos[None]).logits[0]
        leaky = trained(input_ids=ids[None], position_ids=torch.arange(len(ids))[None]).logits[0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            alone = trained(input_ids=ids[None, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)
    second = slice(bounds[1], bounds[2])
    assert (leaky[second] - packed[second]).abs().max() > 1e-2  # the check can fail


def test_pretrain_mixed_with_sft_data_by_ratio_trains(
    tiny_model_dirs: dict, corpus: dict, tmp_path: Path
) -> None:
    from kubetune_trainer.datasets_build import build_datasets
    from kubetune_trainer.model_loading import load_tokenizer
    from kubetune_trainer.train import run_training

    base_dir = tiny_model_dirs["qwen2"]
    job = make_job(
        "mix", base_dir, corpus["train"], tmp_path / "out",
        dataset={"mix": [{"uri": str(ALPACA), "format": "alpaca", "ratio": 0.25}]},
        pet_config={"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16},
        training={"max_steps": 4},
    )  # fmt: skip
    stats = build_datasets(job, load_tokenizer(job.spec, base_dir), seed=job.spec.training.seed).stats
    assert stats.mixed_samples == round(0.25 * 100 / 0.75) and stats.samples == 100 + stats.mixed_samples
    result = run_training(job, workdir=tmp_path / "work")
    assert result.completed and result.exported["adapter"].is_dir()
    assert all(math.isfinite(h["loss"]) for h in result.log_history if "loss" in h)


def test_streaming_resume_gives_the_same_losses(tiny_model_dirs: dict, corpus: dict, tmp_path: Path) -> None:
    """Two documents (~26 blocks of 64 tokens), streamed: stopped at step 8 (32 blocks: past the end of
    the data, so the resumed run must skip through a wrap) and resumed = the uninterrupted run."""
    from kubetune_trainer.train import run_training

    base_dir = tiny_model_dirs["qwen2"]

    def job(name: str) -> FineTuneJob:
        return make_job(name, base_dir, corpus["two"], tmp_path / name, dataset={"streaming": True},
                        training={"max_steps": 10, "seq_length": 64}, checkpoint={"every_steps": 4})  # fmt: skip

    whole = run_training(job("whole"), workdir=tmp_path / "w-whole")
    first = run_training(job("parts"), workdir=tmp_path / "w-parts", callbacks=[StopAt(8)])
    assert not first.completed and first.global_step == 8
    rest = run_training(
        job("parts"), workdir=tmp_path / "w-parts", resume_from=first.checkpoint_dir / "checkpoint-8"
    )
    assert rest.completed and rest.global_step == 10

    def losses(r: Any) -> dict[int, float]:
        return {h["step"]: h["loss"] for h in r.log_history if "loss" in h}

    got, want = losses(rest), losses(whole)
    assert sorted(want) == list(range(1, 11)) and sorted(got) == sorted(want)
    for step in range(1, 11):  # 9 and 10 come after the resume
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_crafted_pair_second_document_cannot_see_the_first(tiny_model_dirs: dict, tmp_path: Path) -> None:
    """Two documents whose second repeats the first: attending across the boundary would make the
    repeat cheap to predict. Packed by the pretrain pipeline, document 2's summed token loss is exactly
    its loss alone; with one running position sequence (a leak) it is not."""
    import torch
    import torch.nn.functional as F

    from kubetune_trainer.datasets_build import build_datasets
    from kubetune_trainer.model_loading import load_tokenizer

    base_dir = tiny_model_dirs["qwen2"]
    text = "The secret password is blue falcon seven. " * 3
    pair = tmp_path / "pair.txt"
    pair.write_text(f"{text}\n{text}\n", encoding="utf-8")
    single = tmp_path / "single.txt"
    single.write_text(f"{text}\n", encoding="utf-8")
    tokenizer = load_tokenizer(make_job("t", base_dir, pair, tmp_path).spec, base_dir)

    def batch(path: Path) -> dict:
        data = build_datasets(
            make_job("p", base_dir, path, tmp_path, training={"seq_length": 256}), tokenizer, 0
        )
        assert len(data.train_dataset) == 1
        return data.data_collator([data.train_dataset[0]])

    model = load(base_dir)
    with torch.no_grad():  # sharpen the random model so that context matters a lot
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    packed, alone = batch(pair), batch(single)
    n = alone["input_ids"].shape[1]
    assert packed["input_ids"].shape[1] == 2 * n and packed["position_ids"][0, n] == 0
    assert packed["input_ids"][0, n - 1] == tokenizer.eos_token_id

    def doc2_loss(b: dict, positions: Any) -> Any:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], position_ids=positions).logits[0]
        per_token = F.cross_entropy(logits[:-1], b["labels"][0, 1:], ignore_index=-100, reduction="none")
        return per_token[-(n - 1) :]

    isolated = doc2_loss(packed, packed["position_ids"])
    torch.testing.assert_close(isolated, doc2_loss(alone, alone["position_ids"]), atol=1e-4, rtol=1e-4)
    leaky = doc2_loss(packed, torch.arange(2 * n)[None])
    assert (leaky - isolated).abs().sum() > 1.0, "a leak must be visible in the loss"
