"""method kto: TRL's KTOTrainer on the SFT paths (run_training, model loading, pet_config, callbacks, export).

KTO reads replies labelled one by one (unpaired_preference: prompt, completion, label) or preference
pairs split into a desirable and an undesirable reply. The tiny random Qwen2 learns in 30 steps to
reward the correct answer over the refusal: rewards/chosen (desirable) rises above rewards/rejected
(undesirable) from exactly 0 at step 0 (the policy starts equal to its reference). The reference is
the starting adapter, frozen, with LoRA, and a frozen second copy with full fine-tuning.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from kubetune.validate import SpecError, load_jobs_text
from tests.fixtures_preference import (
    changed,
    live_models,
    make_job,
    snapshot,
    write_preferences,
    write_unpaired,
)


def kto_job(name: str, model: Path, data: Path, out: Path, **spec: Any) -> Any:
    return make_job(name, model, data, out, method="kto", **spec)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("kto-model") / "tiny")


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_unpaired(tmp_path_factory.mktemp("kto-data") / "unpaired.jsonl", 64)


class Probe(TrainerCallback):
    """The KTO trainer's policy and reference at the start and the end of training."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.begin: dict[str, Any] = {}
        self.end: dict[str, Any] = {}

    @staticmethod
    def trainer(model: Any) -> Any:
        from trl import KTOTrainer

        (found,) = [o for o in gc.get_objects() if isinstance(o, KTOTrainer) and o.model is model]
        return found

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        ref = self.trainer(model).ref_model
        self.begin = {
            "models": len(live_models(self.model_dir)),
            "ref_model": ref,
            "adapters": sorted(getattr(model, "peft_config", {})),
            "params": snapshot(model.named_parameters()),
            "ref_params": snapshot(ref.named_parameters()) if ref is not None else {},
            "ref_grad": [p.requires_grad for p in ref.parameters()] if ref is not None else [],
        }

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kw: Any
    ) -> None:
        ref = self.trainer(model).ref_model
        optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.end = {
            "params": snapshot(model.named_parameters()),
            "ref_params": snapshot(ref.named_parameters()) if ref is not None else {},
            "ref_in_optimizer": ref is not None and any(id(p) in optimized for p in ref.parameters()),
        }


def kto_logs(result: Any) -> list[dict]:
    return [h for h in result.log_history if "loss" in h and "kl" in h]


def test_kto_config_is_every_methods_arguments_plus_the_kto_fields(tmp_path: Path) -> None:
    """KTOConfig built from the keyword arguments: transformers' defaults where KTOConfig's differ (its
    1e-6 learning rate, gradient checkpointing), the kto fields, and TRL's in-order sampling (the KL
    term pairs batch neighbours)."""
    from transformers import TrainingArguments
    from trl import KTOConfig

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments, training_kwargs

    job = kto_job(
        "args", tmp_path, tmp_path / "d.jsonl", tmp_path / "out",
        training={"kto_beta": 0.3, "kto_desirable_weight": 1.5, "kto_undesirable_weight": 0.5, "seq_length": 96},
    )  # fmt: skip
    fp32 = resolve_precision("fp32")
    base = TrainingArguments(**training_kwargs(job.spec, tmp_path / "ck", precision=fp32, has_eval=False))
    cfg = training_arguments(job.spec, tmp_path / "ck", precision=fp32, has_eval=False)
    assert type(cfg) is KTOConfig
    for f in dataclasses.fields(TrainingArguments):
        if f.name != "train_sampling_strategy":
            assert getattr(cfg, f.name) == getattr(base, f.name), f.name
    assert cfg.train_sampling_strategy == "sequential" and base.train_sampling_strategy == "random"
    assert cfg.learning_rate == 2e-3 and cfg.gradient_checkpointing is False
    assert (cfg.beta, cfg.desirable_weight, cfg.undesirable_weight, cfg.max_length) == (0.3, 1.5, 0.5, 96)


def test_lora_kto_on_unpaired_rows_rewards_the_desirable_replies(
    model_dir: Path, unpaired: Path, tmp_path: Path
) -> None:
    from kubetune_trainer.reporting import read_metrics
    from kubetune_trainer.train import run_training

    job = kto_job("lora", model_dir, unpaired, tmp_path / "out", dataset={"format": "unpaired_preference"},
                  pet_config={"lora_dropout": 0.0}, training={"per_device_train_batch_size": 8})  # fmt: skip
    probe = Probe(model_dir)
    result = run_training(job, workdir=tmp_path / "work", callbacks=[probe])
    assert result.completed and result.global_step == 30
    logs = kto_logs(result)
    assert len(logs) == 30
    first, last5 = logs[0], logs[-5:]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0  # the policy is its reference
    margin = sum(h["rewards/margins"] for h in last5) / 5
    print(f"kto: loss {first['loss']:.3f} -> {logs[-1]['loss']:.3f}, margin 0 -> {margin:.3f}")
    assert margin > 1.0, [h["rewards/margins"] for h in logs]
    assert sum(h["loss"] for h in last5) / 5 < 0.7 * first["loss"]

    # the reference is TRL's frozen copy of the starting adapter on the one base; only `default` trains
    assert probe.begin["ref_model"] is None and probe.begin["adapters"] == ["default", "ref"]
    moved = changed(probe.begin["params"], probe.end["params"])
    assert moved and all(".default." in n for n in moved)
    # metrics.jsonl carries the rewards and KTO's kl with every logged loss (progress.json:
    # tests/test_stages_resume_e2e.py)
    records = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 30 and all("kl" in r and "rewards/chosen" in r for r in records)
    # the export holds the trained adapter only
    adapter = result.exported["adapter"]
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()


def test_preference_pairs_are_split_into_desirable_and_undesirable_rows(
    tokenizer: Any, tmp_path: Path
) -> None:
    from kubetune_trainer import recipes

    prefs = write_preferences(tmp_path / "prefs.jsonl", 10)
    long = {"prompt": "count " * 200, "chosen": "ok", "rejected": "no"}  # no room left for a reply: left out
    prefs.write_text(prefs.read_text() + json.dumps(long) + "\n")
    job = kto_job("pairs", tmp_path, prefs, tmp_path / "out")
    data = recipes.get("kto").build_data(job, tokenizer, seed=42)
    rows = data.train_dataset.to_list()
    assert len(rows) == data.stats.sequences == 20 and sum(r["label"] for r in rows) == 10
    assert data.stats.no_trainable == 2
    by_reply = {(r["completion"].split("<|im_end|>")[0], r["label"]) for r in rows}
    assert ("No idea, count them yourself.", False) in by_reply
    assert all(label for reply, label in by_reply if reply.startswith("Sure!"))
    # shuffled once, seeded: desirable and undesirable replies mixed, the same order every build
    labels = [r["label"] for r in rows]
    assert labels != sorted(labels) and labels != sorted(labels, reverse=True)
    assert recipes.get("kto").build_data(job, tokenizer, seed=42).train_dataset.to_list() == rows
    # kubetune inspect-data: the prompt, then each reply under its label
    (ex1, first), (ex2, second) = recipes.get("kto").preview(job, tokenizer, 2)
    assert ex1 is ex2 and list(first) == ["prompt", "desirable (label true)"]
    assert list(second) == ["prompt", "undesirable (label false)"] and first["prompt"] == second["prompt"]
    assert second["undesirable (label false)"].startswith("No idea")


def test_full_kto_reference_is_a_frozen_second_copy(model_dir: Path, unpaired: Path, tmp_path: Path) -> None:
    from kubetune_trainer.train import run_training

    job = kto_job("full", model_dir, unpaired, tmp_path / "out", pet_config={"pet_type": "full"},
                  training={"max_steps": 4, "learning_rate": 2e-4})  # fmt: skip
    probe = Probe(model_dir)
    result = run_training(job, workdir=tmp_path / "work", callbacks=[probe])
    assert result.completed
    b, e = probe.begin, probe.end
    assert b["ref_model"] is not None and b["models"] == 2 and not any(b["ref_grad"])
    assert not changed(b["ref_params"], e["ref_params"]) and changed(b["params"], e["params"])
    assert not e["ref_in_optimizer"]
    assert (result.exported["merged"] / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "row,words",
    [
        (
            {"prompt": "2+2?", "completion": "4", "label": "yes"},
            "field 'label': expected true or false, got a string 'yes'",
        ),
        ({"prompt": "2+2?", "label": True}, "completion"),
        ({"completion": "4", "label": True}, "prompt"),
    ],
)
def test_a_bad_unpaired_row_is_named_at_load(tokenizer: Any, tmp_path: Path, row: dict, words: str) -> None:
    from kubetune_trainer import recipes
    from kubetune_trainer.data_sources import DataError

    data = tmp_path / "d.jsonl"
    good = {"prompt": "3+3?", "completion": "6", "label": True}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    job = kto_job("bad", tmp_path, data, tmp_path / "out", dataset={"format": "unpaired_preference"})
    with pytest.raises(DataError, match="row 2") as err:
        recipes.get("kto").build_data(job, tokenizer, seed=0)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_one_kind_of_reply_and_a_batch_of_one_are_refused_in_one_line(tokenizer: Any, tmp_path: Path) -> None:
    from kubetune_trainer import recipes
    from kubetune_trainer.data_sources import DataError
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments

    data = tmp_path / "good.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}?", "completion": "ok", "label": True}) + "\n" for i in range(4))
    )
    job = kto_job("one-kind", tmp_path, data, tmp_path / "out")
    with pytest.raises(
        DataError, match="method kto needs desirable and undesirable replies; none is undesirable"
    ):
        recipes.get("kto").build_data(job, tokenizer, seed=0)
    small = kto_job("b1", tmp_path, data, tmp_path / "out", training={"per_device_train_batch_size": 1})
    with pytest.raises(
        JobError, match=r"^spec.training.per_device_train_batch_size: method kto needs at least 2"
    ):
        training_arguments(small.spec, tmp_path / "ck", precision=resolve_precision("fp32"), has_eval=False)


def test_kto_and_orpo_with_fsdp_are_refused_at_admission() -> None:
    """Refused by `kubetune validate` and by the CRD's CEL rule with the same line (tests/test_crd.py
    evaluates every rule both ways); QLoRA goes the DPO way (pet.py, TRL keeps the adapter in bf16)."""
    for method in ("kto", "orpo"):
        doc = f"""
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {{name: j}}
spec:
  model: {{uri: s3://models/base}}
  dataset: {{uri: s3://datasets/prefs.jsonl, format: preference}}
  method: {method}
  pet_config: {{pet_type: full}}
  parallel_config: {{strategy: fsdp}}
  output: {{uri: s3://runs/j}}
"""
        with pytest.raises(SpecError) as err:
            load_jobs_text(doc, "job.yaml")
        lines = [str(p) for p in err.value.problems]
        assert (
            len(lines) == 1
            and "spec.parallel_config.strategy: strategy fsdp is not supported with method" in lines[0]
        )
        assert f"{method}: " in lines[0] and "use ddp" in lines[0], lines
        assert load_jobs_text(doc.replace("strategy: fsdp", "strategy: ddp"), "job.yaml")


def test_qlora_kto_trains_on_the_quantized_base(model_dir: Path, unpaired: Path, tmp_path: Path) -> None:
    """QLoRA 4-bit: the policy adapter and TRL's reference adapter share one quantized base."""
    from kubetune_trainer.train import run_training

    job = kto_job(
        "qlora", model_dir, unpaired, tmp_path / "out", dataset={"format": "unpaired_preference"},
        pet_config={"pet_type": "qlora", "lora_dropout": 0.0, "quantization": {"bits": 4, "quant_type": "nf4"}},
        training={"max_steps": 8, "per_device_train_batch_size": 8},
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    logs = kto_logs(result)
    assert result.completed and len(logs) == 8
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"] + 0.3, logs
    assert (result.exported["adapter"] / "adapter_model.safetensors").is_file()
