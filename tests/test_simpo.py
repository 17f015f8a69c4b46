"""method simpo: SimPO with TRL's CPOTrainer (loss_type simpo), no reference model.

The DPO tests' preference set (a correct answer chosen over a refusal) and a tiny random Qwen2:
30 steps must raise the reward margin and the preference accuracy, and nothing but the trained
model is held (no reference model, no reference adapter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.fixtures_preference import kubetune_run, make_job, write_preferences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("simpo-model") / "tiny")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preferences(tmp_path_factory.mktemp("simpo-data") / "prefs.jsonl", 48)


def test_cpo_config_is_the_sft_arguments_plus_the_simpo_fields(tmp_path: Path) -> None:
    """CPOConfig built directly from every method's keyword arguments (CPOConfig's own defaults, e.g.
    a 1e-6 learning rate or cpo_alpha 1, never apply) plus the SimPO fields."""
    from transformers import TrainingArguments
    from trl.experimental.cpo import CPOConfig

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments, training_kwargs

    job = make_job(
        "args", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", method="simpo",
        training={"simpo_beta": 2.5, "simpo_gamma": 1.4, "seq_length": 96, "warmup_ratio": 0.1},
        checkpoint={"every_steps": 7, "keep_last": 3},
    )  # fmt: skip
    fp32 = resolve_precision("fp32")
    base = TrainingArguments(**training_kwargs(job.spec, tmp_path / "ck", precision=fp32, has_eval=True))
    cfg = training_arguments(job.spec, tmp_path / "ck", precision=fp32, has_eval=True)
    assert type(cfg) is CPOConfig
    for f in dataclasses.fields(TrainingArguments):
        assert getattr(cfg, f.name) == getattr(base, f.name), f.name
    assert cfg.learning_rate == 2e-3 and cfg.gradient_checkpointing is False
    assert cfg.loss_type == "simpo" and cfg.beta == 2.5 and cfg.simpo_gamma == 1.4 and cfg.max_length == 96
    assert cfg.cpo_alpha == 0.0  # pure SimPO unless asked

    with_sft = make_job("sft", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", method="simpo",
                        training={"cpo_alpha": 0.5})  # fmt: skip
    cfg = training_arguments(with_sft.spec, tmp_path / "ck", precision=fp32, has_eval=True)
    assert cfg.cpo_alpha == 0.5 and cfg.beta == 2.0 and cfg.simpo_gamma == 1.0


def test_lora_simpo_raises_margin_and_accuracy_without_a_reference(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    from kubetune_trainer.reporting import read_metrics
    from kubetune_trainer.train import run_training

    job = make_job("lora", model_dir, prefs, tmp_path / "out", method="simpo",
                   dataset={"validation_split": 0.25}, training={"eval_steps": 30, "simpo_gamma": 0.5})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    assert result.completed and result.global_step == 30
    logs = [h for h in result.log_history if "loss" in h and "rewards/margins" in h]
    assert len(logs) == 30
    first, last5 = logs[0], logs[-5:]
    mean = lambda key: sum(h[key] for h in last5) / 5  # noqa: E731
    assert mean("rewards/margins") > first["rewards/margins"] + 1.0, (first, last5)
    assert mean("rewards/accuracies") >= 0.9
    assert mean("loss") < first["loss"] / 2
    ev = [h for h in result.log_history if "eval_rewards/accuracies" in h][-1]
    assert ev["eval_rewards/accuracies"] >= 0.9
    # metrics.jsonl carries the rewards
    assert any("rewards/margins" in m for m in read_metrics(result.output_dir / "metrics.jsonl"))
    # one adapter, the trained one: nothing to drop, nothing frozen beside it
    from safetensors import safe_open

    with safe_open(result.exported["adapter"] / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)


def test_a_pair_whose_prompt_fills_seq_length_is_dropped_not_a_nan_loss(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    """CPOTrainer keeps a too-long prompt whole and empties its replies (a mean over no token: NaN);
    such pairs are dropped, as DPO drops them, and the others train."""
    import json
    import math

    from kubetune_trainer.train import run_training

    rows = [json.loads(line) for line in prefs.read_text().splitlines()[:16]]
    for r in rows[::2]:
        r["prompt"] = (
            " ".join(["Please read this long story about apples and count them."] * 20) + r["prompt"]
        )
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    job = make_job("long", model_dir, data, tmp_path / "out", method="simpo",
                   dataset={"validation_split": 0.25}, training={"max_steps": 4, "eval_steps": 4})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    values = [h[k] for h in result.log_history for k in ("loss", "eval_loss", "rewards/margins") if k in h]
    assert values and all(math.isfinite(v) for v in values), result.log_history


def test_qlora_simpo_trains_on_the_quantized_base(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    from kubetune_trainer.train import run_training

    job = make_job(
        "qlora", model_dir, prefs, tmp_path / "out", method="simpo",
        pet_config={"pet_type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4"}},
        training={"max_steps": 6, "simpo_gamma": 0.5},
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    logs = [h for h in result.log_history if "rewards/margins" in h and "loss" in h]
    assert result.completed and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.3, logs
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_full_simpo_with_fsdp_on_two_processes(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    """kubetune run: 2 torchrun processes (gloo) with strategy fsdp: the model is sharded (FSDP2 on CPU)
    and the final export gathers it back into one full model."""

    from kubetune_trainer.reporting import read_metrics

    job = make_job(
        "fsdp", model_dir, prefs, tmp_path / "out", method="simpo", pet_config={"pet_type": "full"},
        parallel_config={"strategy": "fsdp", "nproc_per_node": 2},
        training={"max_steps": 6, "learning_rate": 2e-4, "per_device_train_batch_size": 2},
    )  # fmt: skip
    p = kubetune_run(job, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sharded over 2 processes (FSDP2 on cpu)" in p.stderr
    logs = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(logs) == 6 and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert (tmp_path / "out" / "final" / "merged" / "model.safetensors").is_file()
