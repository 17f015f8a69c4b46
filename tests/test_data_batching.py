"""Batches: `training.group_by_length` groups samples of similar length (less padding), the order is
the same on every restart and every rank, and a run stopped in its second epoch and resumed trains
exactly the steps of the uninterrupted run (packed or length-grouped); on GPUs batch widths are a
multiple of 8.

The batches are the ones the Trainer's own train dataloader yields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer

from kubetune_trainer.datasets_build import CUDA_PAD_MULTIPLE, build_datasets
from kubetune_trainer.model_loading import resolve_precision
from kubetune_trainer.train import training_arguments
from kubetune_trainer.trainer_class import kubetune_trainer
from tests.callbacks import StopAt
from tests.fixtures_data import EXAMPLE_DATA, make_job

ALPACA = EXAMPLE_DATA / "alpaca_en_200.json"


def _trainer(job: Any, tokenizer: Any, model_dir: Path, out: Path) -> Any:
    from transformers import AutoModelForCausalLM

    built = build_datasets(job, tokenizer, seed=job.spec.training.seed)
    args = training_arguments(job.spec, out, precision=resolve_precision("fp32", "cpu"), has_eval=False)
    return kubetune_trainer(Trainer)(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=built.train_dataset,
        data_collator=built.data_collator,
        processing_class=tokenizer,
    )


def _epoch(trainer: Any, epoch: int) -> list[Any]:
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)  # what the Trainer does at the start of every epoch
    return list(loader)


def _padding(batches: list[Any]) -> float:
    """Padding positions / all positions of the batches."""
    mask = [b["attention_mask"] for b in batches]
    return 1 - sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask)


def test_group_by_length_batches_carry_less_padding(
    tokenizer: Any, tiny_model_dirs: dict, tmp_path: Path
) -> None:
    def job(grouped: bool) -> Any:
        training = {"seq_length": 512, "per_device_train_batch_size": 8, "group_by_length": grouped}
        return make_job({"uri": str(ALPACA)}, training=training)

    plain = _epoch(_trainer(job(False), tokenizer, tiny_model_dirs["qwen2"], tmp_path / "a"), 0)
    grouped = _epoch(_trainer(job(True), tokenizer, tiny_model_dirs["qwen2"], tmp_path / "b"), 0)
    assert sum(len(b["input_ids"]) for b in grouped) == sum(len(b["input_ids"]) for b in plain) == 200
    assert _padding(grouped) < 0.5 * _padding(plain)
    # every sample exactly once
    rows = sorted(
        tuple(r[m.bool()].tolist())
        for b in grouped
        for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    )
    assert rows == sorted(
        tuple(r[m.bool()].tolist())
        for b in plain
        for r, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    )


def test_group_by_length_order_depends_on_the_seed_and_epoch_only(
    tokenizer: Any, tiny_model_dirs: dict, tmp_path: Path
) -> None:
    """A resumed run (or another rank) builds its dataloader with the global RNG in another state: the
    order of every epoch must not depend on it."""
    import torch

    def job(seed: int) -> Any:
        training = {
            "seq_length": 512,
            "per_device_train_batch_size": 8,
            "group_by_length": True,
            "seed": seed,
        }
        return make_job({"uri": str(ALPACA)}, training=training)

    def order(seed: int, epoch: int, rng_draws: int) -> list[list[int]]:
        trainer = _trainer(job(seed), tokenizer, tiny_model_dirs["qwen2"], tmp_path / f"{seed}-{epoch}")
        torch.rand(rng_draws)  # e.g. an epoch of dropout before this one
        return [b["input_ids"][:, 0:8].tolist() for b in _epoch(trainer, epoch)]

    first = order(1, 1, 0)
    assert order(1, 1, 1000) == first
    assert order(1, 0, 0) != first  # a new shuffle every epoch
    assert order(2, 1, 0) != first


def test_group_by_length_reaches_dpo_pairs(tiny_model_dirs: dict, tmp_path: Path) -> None:
    """TRL's DPOTrainer samples with the same sampler: a pair is as long as its prompt and longer reply."""
    from kubetune_trainer import model_loading, pet
    from kubetune_trainer.recipes.dpo import build_dpo_trainer
    from tests.fixtures_preference import make_job as dpo_job

    rows = json.loads(ALPACA.read_text())[:48]
    pairs = [
        {
            "prompt": r["instruction"],
            "chosen": r["output"],
            "rejected": "No. " + r["output"][: len(r["output"]) // 3],
        }
        for r in rows
    ]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs), encoding="utf-8")
    model_dir = tiny_model_dirs["qwen2"]
    precision = resolve_precision("fp32", "cpu")

    def epoch(grouped: bool) -> list[Any]:
        training = {"group_by_length": grouped, "seq_length": 512}
        job = dpo_job("p", model_dir, data, tmp_path / "out", training=training)
        spec = job.spec
        plan = pet.plan_pet(spec, precision)
        tokenizer = model_loading.load_tokenizer(spec, model_dir)
        built = build_datasets(job, tokenizer, seed=42)
        model = model_loading.load_model(model_dir, spec, precision, quantization_config=None, device="cpu")
        trainer = build_dpo_trainer(
            spec, model=pet.apply_pet(model, spec, plan), tokenizer=tokenizer, data=built,
            args=training_arguments(spec, tmp_path / "ck", precision=precision, has_eval=False), plan=plan,
        )  # fmt: skip
        return list(trainer.get_train_dataloader())

    plain, grouped = epoch(False), epoch(True)
    assert sum(len(b["input_ids"]) for b in grouped) == sum(len(b["input_ids"]) for b in plain) == 2 * 48
    assert _padding(grouped) < 0.8 * _padding(plain)


@pytest.mark.parametrize("mode", ["group_by_length", "packing"])
def test_stopped_in_the_second_epoch_and_resumed_gives_the_uninterrupted_losses(
    train_job: Any, tmp_path: Path, mode: str
) -> None:
    from kubetune_trainer.train import run_training

    data = tmp_path / "rows.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:40]), encoding="utf-8")
    # 40 rows: 10 steps of 4 per epoch unpacked (fewer packed); stopped 3 steps into the second epoch
    training = {"seq_length": 256, "max_steps": 16, "learning_rate": 3e-3, mode: True}
    steps = {"group_by_length": (13, 16), "packing": (7, 10)}[mode]
    training["max_steps"] = steps[1]

    def job(name: str) -> Any:
        return train_job(tmp_path / name, training=training, dataset={"uri": str(data)}, merge_adapter=False)

    whole = run_training(job("whole"), workdir=tmp_path / "w-whole")
    first = run_training(job("parts"), workdir=tmp_path / "w-parts", callbacks=[StopAt(steps[0])])
    assert not first.completed and first.global_step == steps[0]
    rest = run_training(
        job("parts"),
        workdir=tmp_path / "w-parts",
        resume_from=first.checkpoint_dir / f"checkpoint-{steps[0]}",
    )
    assert rest.completed

    def losses(r: Any) -> dict[int, float]:
        return {h["step"]: h["loss"] for h in r.log_history if "loss" in h}

    got, want = losses(rest), losses(whole)
    assert sorted(got) == sorted(want) == list(range(1, steps[1] + 1))
    assert max(h["epoch"] for h in whole.log_history if "loss" in h) > 1  # the resume is past an epoch
    for step in range(1, steps[1] + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_batches_are_padded_to_a_multiple_of_8_on_gpus_only(tokenizer: Any) -> None:
    job = make_job({"uri": str(ALPACA)}, training={"seq_length": 512})
    rows = list(build_datasets(job, tokenizer, seed=0).train_dataset)[:3]
    cuda = build_datasets(job, tokenizer, seed=0, device_type="cuda").data_collator
    cpu = build_datasets(job, tokenizer, seed=0, device_type="cpu").data_collator
    longest = max(len(r["input_ids"]) for r in rows)
    assert CUDA_PAD_MULTIPLE == 8 and longest % 8
    assert cuda(rows)["input_ids"].shape[1] == -(-longest // 8) * 8
    assert cpu(rows)["input_ids"].shape[1] == longest
