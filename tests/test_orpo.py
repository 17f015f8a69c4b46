"""method orpo: TRL's ORPOTrainer (trl.experimental.orpo) on the SFT paths (run_training, model
loading, pet_config, callbacks, export).

ORPO needs no reference model: an SFT loss on the chosen reply plus orpo_beta x a log odds-ratio
term. On the preference pairs of tests/test_dpo.py the tiny random Qwen2 learns in 30 steps to
prefer the correct answer: the reward margin and preference accuracy rise, the loss falls, and no
second model or reference adapter is ever made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_preference import live_models, make_job, write_preferences


def orpo_logs(result: Any) -> list[dict]:
    return [h for h in result.log_history if "loss" in h and "log_odds_ratio" in h]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("orpo-model") / "tiny")


def test_orpo_config_is_every_methods_arguments_plus_orpo_beta(tmp_path: Path) -> None:
    from transformers import TrainingArguments
    from trl.experimental.orpo import ORPOConfig

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments, training_kwargs

    job = make_job("args", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", method="orpo",
                   training={"orpo_beta": 0.25, "seq_length": 96})  # fmt: skip
    fp32 = resolve_precision("fp32")
    base = TrainingArguments(**training_kwargs(job.spec, tmp_path / "ck", precision=fp32, has_eval=False))
    cfg = training_arguments(job.spec, tmp_path / "ck", precision=fp32, has_eval=False)
    assert type(cfg) is ORPOConfig
    for f in dataclasses.fields(TrainingArguments):
        assert getattr(cfg, f.name) == getattr(base, f.name), f.name
    assert cfg.learning_rate == 2e-3 and cfg.beta == 0.25 and cfg.max_length == 96


def test_lora_orpo_raises_margin_and_accuracy_without_a_reference(model_dir: Path, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    from kubetune_trainer.reporting import read_metrics
    from kubetune_trainer.train import run_training

    seen: dict[str, Any] = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            seen["adapters"] = sorted(getattr(model, "peft_config", {}))
            seen["models"] = len(live_models(model_dir))

    prefs = write_preferences(tmp_path / "prefs.jsonl", 48)
    job = make_job("lora", model_dir, prefs, tmp_path / "out", method="orpo", pet_config={"lora_dropout": 0.0},
                   training={"orpo_beta": 0.5})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work", callbacks=[Look()])
    assert result.completed and result.global_step == 30
    logs = orpo_logs(result)
    assert len(logs) == 30
    first, last5 = logs[0], logs[-5:]
    margin = sum(h["rewards/margins"] for h in last5) / 5
    accuracy = sum(h["rewards/accuracies"] for h in last5) / 5
    print(f"orpo: loss {first['loss']:.3f} -> {logs[-1]['loss']:.3f}, margin {first['rewards/margins']:.3f} -> "
          f"{margin:.3f}, accuracy {first['rewards/accuracies']:.2f} -> {accuracy:.2f}")  # fmt: skip
    assert margin > first["rewards/margins"] + 0.05 and accuracy >= 0.9, (first, last5)
    assert logs[-1]["loss"] < 0.85 * first["loss"]  # mostly the SFT term on the chosen reply
    assert seen == {"adapters": ["default"], "models": 1}  # no reference: one model, one adapter

    # metrics.jsonl carries the rewards and the odds ratio with every logged loss (progress.json:
    # tests/test_stages_resume_e2e.py)
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 30 and all("log_odds_ratio" in r and "rewards/accuracies" in r for r in records)
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()


def test_pairs_whose_prompt_fills_seq_length_are_left_out(tokenizer: Any, tmp_path: Path) -> None:
    import json

    from kubetune_trainer import recipes
    from kubetune_trainer.data_sources import DataError

    prefs = write_preferences(tmp_path / "prefs.jsonl", 4)
    long = {"prompt": "count " * 200, "chosen": "ok", "rejected": "no"}
    prefs.write_text(prefs.read_text() + json.dumps(long) + "\n")
    job = make_job("long", tmp_path, prefs, tmp_path / "out", method="orpo")
    data = recipes.get("orpo").build_data(job, tokenizer, seed=0)
    assert len(data.train_dataset) == data.stats.sequences == 4 and data.stats.no_trainable == 1

    prefs.write_text(json.dumps(long) + "\n")
    with pytest.raises(DataError, match=r"every prompt fills training.seq_length \(64 tokens\)"):
        recipes.get("orpo").build_data(job, tokenizer, seed=0)


def test_qlora_orpo_trains_on_the_quantized_base(model_dir: Path, tmp_path: Path) -> None:
    from kubetune_trainer.train import run_training

    prefs = write_preferences(tmp_path / "prefs.jsonl", 48)
    job = make_job(
        "qlora", model_dir, prefs, tmp_path / "out", method="orpo",
        pet_config={"pet_type": "qlora", "lora_dropout": 0.0, "quantization": {"bits": 4, "quant_type": "nf4"}},
        training={"max_steps": 8, "orpo_beta": 0.5},
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    logs = orpo_logs(result)
    assert result.completed and len(logs) == 8
    assert logs[-1]["loss"] < logs[0]["loss"] and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"], (
        logs
    )
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()
