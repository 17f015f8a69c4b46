"""method reward: a reward model (a sequence classifier with one output) trained on preference pairs
by TRL's RewardTrainer, exported in Hugging Face layout with its score head.

The DPO tests' preference set (a correct answer chosen over a refusal) and a tiny random Qwen2: the
preference accuracy on the training and the held-out pairs must rise well above chance in 30 steps,
and what final/ holds must load with AutoModelForSequenceClassification and score as the trained
model does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_preference import kubetune_run, make_job, write_preferences


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("reward-model") / "tiny")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preferences(tmp_path_factory.mktemp("reward-data") / "prefs.jsonl", 48)


def scores(model: Any, tokenizer: Any, texts: list[str]) -> Any:
    import torch

    model.eval()
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        return model(**batch).logits.squeeze(-1)


def pair_texts(prefs: Path, n: int) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in prefs.read_text().splitlines()[:n]]
    chosen = [
        f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['chosen']}<|im_end|>"
        for r in rows
    ]
    rejected = [
        f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['rejected']}<|im_end|>"
        for r in rows
    ]
    return chosen, rejected


def test_reward_config_is_the_sft_arguments_plus_the_reward_fields(tmp_path: Path) -> None:
    """RewardConfig built directly from every method's keyword arguments (RewardConfig's own defaults,
    e.g. gradient checkpointing on or bf16, never apply) plus max_length and the centring term."""
    from transformers import TrainingArguments
    from trl import RewardConfig

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments, training_kwargs

    job = make_job(
        "args", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", method="reward",
        training={"reward_center_coefficient": 0.01, "seq_length": 96, "warmup_ratio": 0.1},
    )  # fmt: skip
    fp32 = resolve_precision("fp32")
    base = TrainingArguments(**training_kwargs(job.spec, tmp_path / "ck", precision=fp32, has_eval=True))
    cfg = training_arguments(job.spec, tmp_path / "ck", precision=fp32, has_eval=True)
    assert type(cfg) is RewardConfig
    for f in dataclasses.fields(TrainingArguments):
        assert getattr(cfg, f.name) == getattr(base, f.name), f.name
    assert cfg.gradient_checkpointing is False and cfg.bf16 is False and cfg.learning_rate == 2e-3
    assert cfg.max_length == 96 and cfg.center_rewards_coefficient == 0.01
    plain = make_job("plain", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", method="reward")
    assert (
        training_arguments(
            plain.spec, tmp_path / "ck", precision=fp32, has_eval=True
        ).center_rewards_coefficient
        is None
    )


def test_lora_reward_model_learns_the_preference_and_exports_its_score_head(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kubetune_trainer.reporting import read_metrics
    from kubetune_trainer.train import run_training

    job = make_job("lora", model_dir, prefs, tmp_path / "out", method="reward",
                   dataset={"validation_split": 0.25}, training={"eval_steps": 30, "seq_length": 128},
                   output={"uri": str(tmp_path / "out"), "merge_adapter": True})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    assert result.completed and result.global_step == 30
    # kubetune plan builds the same model: LoRA and the score head, no lm_head
    from kubetune_trainer.plan import measure, model_config

    planned = measure(job.spec, model_config(job.spec), "cpu")
    assert (planned.trainable_params, planned.total_params) == (result.trainable_params, result.total_params)
    logs = [h for h in result.log_history if "loss" in h and "accuracy" in h]
    assert len(logs) == 30
    last5 = logs[-5:]
    mean = lambda key: sum(h[key] for h in last5) / 5  # noqa: E731
    assert mean("accuracy") >= 0.9 and mean("margin") > logs[0]["margin"] + 1.0, (logs[0], last5)
    assert mean("loss") < logs[0]["loss"] / 2
    ev = [h for h in result.log_history if "eval_accuracy" in h]
    assert ev and ev[-1]["eval_accuracy"] >= 0.9, ev
    metrics = read_metrics(result.output_dir / "metrics.jsonl")
    assert any("accuracy" in m for m in metrics) and any("eval_accuracy" in m for m in metrics)

    # final/adapter: the LoRA matrices and, in modules_to_save, the trained score head
    adapter, merged = result.exported["adapter"], result.exported["merged"]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("score.weight") for k in keys), keys
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    # final/merged is a plain sequence classifier that scores as base + adapter does, chosen first
    tok = AutoTokenizer.from_pretrained(merged)
    chosen, rejected = pair_texts(prefs, 8)
    rm = AutoModelForSequenceClassification.from_pretrained(merged)
    assert rm.config.num_labels == 1 and type(rm).__name__ == "Qwen2ForSequenceClassification"
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    base.config.pad_token_id = tok.pad_token_id
    with_adapter = PeftModel.from_pretrained(base, adapter)
    got, want = scores(rm, tok, chosen + rejected), scores(with_adapter, tok, chosen + rejected)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert (got[:8] > got[8:]).float().mean() >= 0.9

    # kubetune export keeps the score head, from the job output (its adapter merged onto the base) and
    # from final/merged; kubetune chat refuses a model that only scores
    from kubetune_trainer.chat import open_chat
    from kubetune_trainer.convert import export
    from kubetune_trainer.errors import JobError

    for i, source in enumerate((tmp_path / "out", merged)):
        dest = export(str(source), str(tmp_path / f"exported-{i}"))
        again = AutoModelForSequenceClassification.from_pretrained(dest)
        assert type(again).__name__ == "Qwen2ForSequenceClassification" and again.config.num_labels == 1
        assert torch.allclose(
            scores(again, AutoTokenizer.from_pretrained(dest), chosen + rejected), want, atol=1e-4
        )
    with pytest.raises(JobError, match="reward model"):
        open_chat(str(tmp_path / "out"))


def test_freeze_reward_model_trains_its_new_score_head(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    """With freeze only the chosen layers would train; the new, random score head trains with them."""
    from safetensors import safe_open

    from kubetune_trainer.train import run_training

    job = make_job("freeze", model_dir, prefs, tmp_path / "out", method="reward",
                   pet_config={"pet_type": "freeze", "freeze_trainable_layers": 1},
                   training={"max_steps": 10, "seq_length": 128})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    assert result.completed
    with safe_open(result.exported["merged"] / "model.safetensors", "pt") as f:
        assert "score.weight" in f.keys()
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    last = len(rm.model.layers) - 1
    expected = {n for n, _ in rm.named_parameters() if n.startswith((f"model.layers.{last}.", "score."))}
    assert result.trainable_params == sum(p.numel() for n, p in rm.named_parameters() if n in expected)


def test_a_reward_model_is_not_evaluated_by_generation() -> None:
    from kubetune.spec import FineTuneJobSpec

    doc = {"model": {"uri": "m"}, "dataset": {"uri": "p.json", "validation_split": 0.1}, "method": "reward",
           "output": {"uri": "o"}, "evaluation": {"metrics": ["perplexity"]}}  # fmt: skip
    with pytest.raises(
        ValueError, match=r"method reward trains a model that scores replies and does not generate"
    ):
        FineTuneJobSpec.model_validate(doc)
    del doc["evaluation"]
    FineTuneJobSpec.model_validate(doc)


def test_qlora_reward_model_trains_on_the_quantized_base(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    """QLoRA 4-bit: the adapter and the score head train on the quantized base; final/merged is the
    de-quantized base with both merged, still a sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    from kubetune_trainer.train import run_training

    job = make_job(
        "qlora", model_dir, prefs, tmp_path / "out", method="reward",
        pet_config={"pet_type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4"}},
        training={"max_steps": 8, "seq_length": 128},
        output={"uri": str(tmp_path / "out"), "merge_adapter": True},
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    logs = [h for h in result.log_history if "accuracy" in h and "loss" in h]
    assert result.completed and logs[-1]["loss"] < logs[0]["loss"], logs
    rm = AutoModelForSequenceClassification.from_pretrained(result.exported["merged"])
    assert rm.config.num_labels == 1 and not getattr(rm.config, "quantization_config", None)


@pytest.mark.slow
def test_full_reward_model_with_fsdp_on_two_processes(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    """kubetune run: 2 torchrun processes (gloo) with strategy fsdp: the classifier is sharded (FSDP2 on
    CPU) and the final export gathers it, score head included, into one full model."""

    from safetensors import safe_open

    from kubetune_trainer.reporting import read_metrics

    job = make_job(
        "fsdp", model_dir, prefs, tmp_path / "out", method="reward", pet_config={"pet_type": "full"},
        parallel_config={"strategy": "fsdp", "nproc_per_node": 2},
        training={"max_steps": 6, "learning_rate": 2e-4, "per_device_train_batch_size": 2, "seq_length": 128},
    )  # fmt: skip
    p = kubetune_run(job, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sharded over 2 processes (FSDP2 on cpu)" in p.stderr
    logs = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(logs) == 6 and all("accuracy" in r for r in logs)
    with safe_open(tmp_path / "out" / "final" / "merged" / "model.safetensors", "pt") as f:
        assert "score.weight" in f.keys()


def test_kubetune_status_shows_the_reward_models_accuracy() -> None:
    from kubetune.progress import TrainerProgress
    from kubetune_trainer.progress import format_progress

    doc = TrainerProgress(job="rm", state="running", step=20, total_steps=30, loss=0.12,
                          metrics={"accuracy": 0.95, "margin": 1.3, "eval_accuracy": 0.9})  # fmt: skip
    text = format_progress(doc)
    assert "loss 0.1200, accuracy 0.95, margin 1.3, eval_accuracy 0.9" in text, text


def test_pairs_longer_than_seq_length_are_left_out_and_said(
    model_dir: Path, prefs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TRL's reward trainer drops a pair with a side longer than seq_length (a cut reply would be
    scored on text it lacks): one warning says how many; when none is left, one line says so."""
    from transformers import AutoTokenizer

    from kubetune_trainer import recipes
    from kubetune_trainer.data_sources import DataError

    rows = [json.loads(line) for line in prefs.read_text().splitlines()[:8]]
    for r in rows[:3]:
        r["chosen"] = " ".join(["This is a very long and careful answer."] * 20)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(model_dir)
    recipe = recipes.get("reward")
    job = make_job("long", model_dir, data, tmp_path / "out", method="reward", training={"seq_length": 64})
    with caplog.at_level("WARNING", logger="kubetune.reward"):
        recipe.build_data(job, tok, seed=0)
    assert "3 of 8 pairs have a side longer than training.seq_length 64" in caplog.text
    short = make_job("short", model_dir, data, tmp_path / "out", method="reward", training={"seq_length": 8})
    with pytest.raises(
        DataError, match=r"every pair has a side longer than seq_length 8.*raise training.seq_length"
    ):
        recipe.build_data(short, tok, seed=0)
