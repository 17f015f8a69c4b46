"""method dpo: TRL's DPOTrainer on the SFT paths (run_training, model loading, pet_config, callbacks, export).

A small preference set (polite, correct answers chosen over a refusal) and a tiny random Qwen2
model: 30 steps must move the reward margin and preference accuracy well above their step-0
values (0: the policy starts equal to its reference). The reference is checked to be frozen
(weights unchanged, no gradient, not in the optimizer) and, for LoRA, not a second copy of the
model: the tensors alive while training are counted against a full fine-tuning run, which does
hold two copies.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from kubetune_trainer.data_sources import DataError
from tests.fixtures_preference import (
    changed,
    kubetune_run,
    live_models,
    live_tensor_bytes,
    make_job,
    snapshot,
    write_preferences,
)

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 of its own (its path tells this module's models from other tests' ones)."""
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dpo-model") / "tiny")


@pytest.fixture(scope="module")
def prefs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_preferences(tmp_path_factory.mktemp("dpo-data") / "prefs.jsonl", 48)


# ---------------------------------------------------------------- what is alive during training


def the_trainer(model: Any) -> Any:
    from trl import DPOTrainer

    found = [o for o in gc.get_objects() if isinstance(o, DPOTrainer) and o.model is model]
    assert len(found) == 1
    return found[0]


class Probe(TrainerCallback):
    """Looks at the trainer's models at the start and the end of training."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.begin: dict[str, Any] = {}
        self.end: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        trainer = the_trainer(model)
        self.begin = {
            "bytes": live_tensor_bytes(),
            "models": len(live_models(self.model_dir)),
            "ref_model": trainer.ref_model,
            "adapters": sorted(getattr(model, "peft_config", {})),
            "params": snapshot(model.named_parameters()),
            "ref_params": snapshot(trainer.ref_model.named_parameters())
            if trainer.ref_model is not None
            else {},
            "ref_grad": [p.requires_grad for p in trainer.ref_model.parameters()]
            if trainer.ref_model
            else [],
        }

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw
    ) -> None:
        trainer = the_trainer(model)
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.end = {
            "params": snapshot(model.named_parameters()),
            "ref_params": snapshot(trainer.ref_model.named_parameters())
            if trainer.ref_model is not None
            else {},
            "optimized_names": {n for n, p in model.named_parameters() if id(p) in optimized},
            "ref_in_optimizer": trainer.ref_model is not None
            and any(id(p) in optimized for p in trainer.ref_model.parameters()),
        }


def train_logs(result: Any) -> list[dict]:
    return [h for h in result.log_history if "loss" in h and "rewards/margins" in h]


# ---------------------------------------------------------------- arguments


def test_dpo_config_is_the_sft_arguments_plus_the_dpo_fields(tmp_path: Path) -> None:
    """The recipe builds TRL's DPOConfig directly from every method's keyword arguments: each
    TrainingArguments field is what a plain TrainingArguments gets (DPOConfig's own defaults, e.g.
    gradient checkpointing on, never apply), plus the DPO fields."""
    from transformers import TrainingArguments
    from trl import DPOConfig

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments, training_kwargs

    job = make_job(
        "args", tmp_path, tmp_path / "p.jsonl", tmp_path / "out",
        training={"dpo_beta": 0.3, "dpo_loss_type": "ipo", "dpo_sft_weight": 0.5, "seq_length": 96,
                  "warmup_ratio": 0.1, "gradient_checkpointing": False, "weight_decay": 0.01},
        checkpoint={"every_steps": 7, "keep_last": 3},
    )  # fmt: skip
    fp32 = resolve_precision("fp32")
    base = TrainingArguments(**training_kwargs(job.spec, tmp_path / "ck", precision=fp32, has_eval=True))
    cfg = training_arguments(job.spec, tmp_path / "ck", precision=fp32, has_eval=True)
    assert type(cfg) is DPOConfig
    for f in dataclasses.fields(TrainingArguments):
        assert getattr(cfg, f.name) == getattr(base, f.name), f.name
    assert cfg.save_steps == 7 and cfg.save_total_limit == 3 and cfg.gradient_checkpointing is False
    assert cfg.learning_rate == 2e-3 and cfg.logging_steps == 1  # not DPOConfig's 1e-6 and 10
    assert cfg.beta == 0.3 and cfg.max_length == 96
    assert cfg.loss_type == ["ipo", "sft"] and cfg.loss_weights == [1.0, 0.5]

    plain = make_job(
        "plain", tmp_path, tmp_path / "p.jsonl", tmp_path / "out", training={"dpo_loss_type": "hinge"}
    )
    cfg = training_arguments(plain.spec, tmp_path / "ck", precision=fp32, has_eval=True)
    assert cfg.loss_type == ["hinge"] and cfg.loss_weights == [1.0] and cfg.beta == 0.1


# ---------------------------------------------------------------- training


def test_lora_dpo_raises_margin_and_accuracy_reference_frozen_and_single_copy(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    from kubetune_trainer.reporting import read_metrics
    from kubetune_trainer.train import run_training

    job = make_job("lora", model_dir, prefs, tmp_path / "out", dataset={"validation_split": 0.25},
                   training={"eval_steps": 30})  # fmt: skip
    probe = Probe(model_dir)
    gc.collect()
    before = live_tensor_bytes()
    result = run_training(job, workdir=tmp_path / "work", callbacks=[probe])
    assert result.completed and result.global_step == 30

    logs = train_logs(result)
    assert len(logs) == 30
    first, last5 = logs[0], logs[-5:]
    # step 0: the policy is its reference, so every reward is exactly 0
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    margin = sum(h["rewards/margins"] for h in last5) / 5
    accuracy = sum(h["rewards/accuracies"] for h in last5) / 5
    assert margin > 1.0 and accuracy >= 0.9, (margin, accuracy)
    assert logs[-1]["loss"] < 0.5 * first["loss"]
    ev = [h for h in result.log_history if "eval_rewards/margins" in h][-1]  # the held-out quarter
    assert ev["eval_rewards/margins"] > 1.0 and ev["eval_rewards/accuracies"] >= 0.9, ev

    # metrics.jsonl carries the rewards of every logged step
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 30 and all(all(k in r for k in REWARD_KEYS) for r in records)

    # reference: TRL's frozen copy of the starting adapter on the one shared base
    b, e = probe.begin, probe.end
    assert b["ref_model"] is None and b["adapters"] == ["default", "ref"]
    moved = changed(b["params"], e["params"])
    assert moved and all(".default." in n for n in moved)  # base and reference adapter untouched
    assert not any(".ref." in n or "lora" not in n for n in e["optimized_names"])
    # not loaded twice: one model object, and the tensors alive hold about one model's bytes
    model_bytes = sum(p.numel() * 4 for n, p in b["params"].items() if "lora_" not in n)
    assert b["models"] == 1
    assert b["bytes"] - before < 1.3 * model_bytes, (b["bytes"] - before, model_bytes)
    print(f"lora dpo: {b['bytes'] - before:,} tensor bytes alive, model {model_bytes:,}", file=sys.__stdout__)

    # the export holds the trained adapter only
    adapter = result.exported["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8


def test_full_dpo_reference_is_a_frozen_second_copy(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    from kubetune_trainer.train import run_training

    job = make_job("full", model_dir, prefs, tmp_path / "out", pet_config={"pet_type": "full"},
                   training={"max_steps": 6, "learning_rate": 2e-4})  # fmt: skip
    probe = Probe(model_dir)
    gc.collect()
    before = live_tensor_bytes()
    result = run_training(job, workdir=tmp_path / "work", callbacks=[probe])
    assert result.completed
    logs = train_logs(result)
    assert logs[0]["rewards/margins"] == 0 and logs[-1]["rewards/margins"] > 0.2

    b, e = probe.begin, probe.end
    assert b["ref_model"] is not None and b["models"] == 2
    assert b["ref_grad"] and not any(b["ref_grad"])
    assert not changed(b["ref_params"], e["ref_params"])  # the reference never moved
    assert changed(b["params"], e["params"])  # the policy did
    assert not e["ref_in_optimizer"]
    model_bytes = sum(p.numel() * 4 for p in b["params"].values())
    two_copies = b["bytes"] - before
    print(f"full dpo: {two_copies:,} tensor bytes alive, model {model_bytes:,}", file=sys.__stdout__)
    assert two_copies > 1.9 * model_bytes, (two_copies, model_bytes)  # what the LoRA run stays under 1.3x of
    assert (result.exported["merged"] / "model.safetensors").is_file()


def test_dpo_starts_from_a_kubetune_sft_adapter_or_merged_model(
    model_dir: Path, prefs: Path, tmp_path: Path
) -> None:
    """spec.model.adapter_uri = an SFT run's final/adapter (or model.uri = its final/merged): one line."""
    import torch
    from safetensors.torch import load_file

    from kubetune_trainer.train import run_training

    alpaca = Path(__file__).resolve().parents[1] / "examples/data/alpaca_en_200.json"
    sft = make_job("sft", model_dir, alpaca, tmp_path / "sft", method="sft", dataset={"format": "alpaca"},
                   training={"max_steps": 4, "learning_rate": 5e-3, "seq_length": 96},
                   output={"uri": str(tmp_path / "sft"), "merge_adapter": True})  # fmt: skip
    sft_result = run_training(sft, workdir=tmp_path / "work-sft")
    adapter, merged = sft_result.exported["adapter"], sft_result.exported["merged"]

    probe = Probe(model_dir)
    job = make_job("from-adapter", model_dir, prefs, tmp_path / "dpo-a", model={"adapter_uri": str(adapter)},
                   training={"max_steps": 2})  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work-a", callbacks=[probe])
    assert result.completed
    # the trained adapter started as the SFT adapter ...
    sft_weights = load_file(adapter / "adapter_model.safetensors")
    start = {k: v for k, v in probe.begin["params"].items() if ".default." in k}
    assert len(start) == len(sft_weights)
    for k, v in start.items():
        assert torch.equal(v, sft_weights[k.replace(".default", "")]), k
    # ... and the reference is the SFT model: rewards are exactly 0 at the first step (with the
    # bare base as reference they would not be, the SFT adapter moved the log-probs)
    first = train_logs(result)[0]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0

    job = make_job("from-merged", merged, prefs, tmp_path / "dpo-m", training={"max_steps": 2})
    result = run_training(job, workdir=tmp_path / "work-m")
    assert result.completed and train_logs(result)[0]["rewards/margins"] == 0
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- bad data


@pytest.mark.parametrize("layout", ["columns", "sharegpt"])
def test_preference_rows_without_rejected_are_named_at_load(
    tokenizer: Any, tmp_path: Path, layout: str
) -> None:
    from kubetune_trainer.datasets_build import build_datasets

    if layout == "columns":
        rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "3+3?", "chosen": "6"}]
    else:
        turn = [{"from": "human", "value": "2+2?"}]
        rows = [
            {
                "conversations": turn,
                "chosen": {"from": "gpt", "value": "4"},
                "rejected": {"from": "gpt", "value": "5"},
            },
            {"conversations": turn, "chosen": {"from": "gpt", "value": "4"}},
        ]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps(rows))
    job = make_job("bad", tmp_path, data, tmp_path / "out")
    with pytest.raises(DataError) as err:
        build_datasets(job, tokenizer, seed=0)
    assert "prefs.json row 2: field 'rejected': missing" in str(err.value)

    skip = make_job("skip", tmp_path, data, tmp_path / "out", dataset={"on_bad_row": "skip"})
    built = build_datasets(skip, tokenizer, seed=0)
    assert built.stats.skipped_bad_rows == 1 and len(built.train_dataset) == 1


def test_lora_on_the_output_head_is_refused_in_one_line(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.train import run_training

    job = make_job(
        "head", model_dir, prefs, tmp_path / "out", pet_config={"target_modules": ".*_proj|lm_head"},
        training={"max_steps": 1},
    )  # fmt: skip
    with pytest.raises(
        JobError, match=r"target_modules: method dpo cannot train a LoRA adapter on the output head"
    ):
        run_training(job, workdir=tmp_path / "work")


def test_qlora_dpo_trains_on_the_quantized_base(
    model_dir: Path, prefs: Path, tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """QLoRA 4-bit: the reference is the frozen starting adapter on the one quantized base."""
    from kubetune_trainer.train import run_training

    job = make_job(
        "qlora", model_dir, prefs, tmp_path / "out",
        pet_config={"pet_type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4"}},
        training={"max_steps": 6},
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    logs = train_logs(result)
    assert logs[0]["rewards/margins"] == 0 and logs[-1]["rewards/margins"] > 0.3
    assert logs[-1]["rewards/accuracies"] >= 0.75
    # a 4-bit layer repacked for inference would train through a kernel without autograd (ENVIRONMENT.md)
    assert not [w for w in recwarn if "autograd kernel was not registered" in str(w.message)]
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_full_dpo_with_fsdp_on_two_processes(model_dir: Path, prefs: Path, tmp_path: Path) -> None:
    """kubetune run: 2 torchrun processes (gloo) with strategy fsdp: the policy is sharded (FSDP2 on CPU)
    and the final export gathers it back into one full model."""

    from kubetune_trainer.reporting import read_metrics

    job = make_job(
        "fsdp", model_dir, prefs, tmp_path / "out", pet_config={"pet_type": "full"},
        parallel_config={"strategy": "fsdp", "nproc_per_node": 2},
        training={"max_steps": 6, "learning_rate": 2e-4, "per_device_train_batch_size": 2},
    )  # fmt: skip
    p = kubetune_run(job, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 processes" in p.stderr and "a frozen copy of" in p.stderr
    assert "sharded over 2 processes (FSDP2 on cpu)" in p.stderr
    logs = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(logs) == 6 and logs[0]["rewards/margins"] == 0 and logs[-1]["rewards/margins"] > 0.2
    assert (tmp_path / "out" / "final" / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", ["sharegpt", "messages-template"])
def test_conversation_preference_data_trains(model_dir: Path, tmp_path: Path, layout: str) -> None:
    """Conversations with chosen/rejected final turns, rendered with ChatML or the tokenizer's own
    template plus a system prompt, go through TRL like prompt/chosen/rejected columns."""
    from kubetune_trainer.train import run_training

    rows = []
    for r in (
        json.loads(line) for line in write_preferences(tmp_path / "p.jsonl", 16).read_text().splitlines()
    ):
        if layout == "sharegpt":
            rows.append(
                {
                    "conversations": [{"from": "human", "value": r["prompt"]}],
                    "chosen": {"from": "gpt", "value": r["chosen"]},
                    "rejected": {"from": "gpt", "value": r["rejected"]},
                }
            )
        else:
            rows.append(
                {
                    "messages": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
            )
    data = tmp_path / "conv.json"
    data.write_text(json.dumps(rows))
    dataset = {"apply_chat_template": True, "system_prompt": "Be kind."} if layout != "sharegpt" else {}
    job = make_job(layout, model_dir, data, tmp_path / "out", dataset=dataset, training={"max_steps": 4})
    result = run_training(job, workdir=tmp_path / "work")
    logs = train_logs(result)
    assert result.completed and logs[0]["rewards/margins"] == 0 and logs[-1]["rewards/margins"] > 0.2
