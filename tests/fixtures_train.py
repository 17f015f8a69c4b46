"""Fixtures for the trainer tests: a memorisable dataset, job builders and trained runs shared by tests.

- `memo_data` (session): 4 alpaca rows a tiny model learns by heart in ~30 steps.
- `train_job` (session): builds a FineTuneJob for the tiny Qwen2 model (tests.fixtures_data's
  `tiny_model_dirs`) on `memo_data`, with pet_config/training/output overrides.
- `on_small_disk(mountpoint, size, argv)`: a command line that runs `argv` with a small tmpfs there.
- `trained` (session): `trained(case)` runs one of `METHOD_CASES` through `run_training` once per
  session (in-process) and returns (job, TrainResult); the loss and export tests share the runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MEMO_ROWS = [
    {
        "instruction": "What is the capital of France?",
        "input": "",
        "output": "Paris is the capital of France.",
    },
    {"instruction": "Name a primary color.", "input": "", "output": "Blue is a primary color."},
    {"instruction": "How many legs does a spider have?", "input": "", "output": "A spider has eight legs."},
    {"instruction": "Translate 'cat' to German.", "input": "", "output": "Katze"},
]

# pet_config and learning rate per case; ~30 constant-LR steps on MEMO_ROWS.
METHOD_CASES: dict[str, dict[str, Any]] = {
    "full": {"pet_type": "full"},
    "freeze": {"pet_type": "freeze", "freeze_trainable_layers": 1},
    "lora-regex": {"pet_type": "lora", "target_modules": ".*q_proj|.*v_proj"},
    "lora-list": {"pet_type": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "lora-all-linear": {"pet_type": "lora", "target_modules": "all-linear"},
    "qlora-4bit-nf4": {
        "pet_type": "qlora",
        "target_modules": "all-linear",
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    },
    "qlora-4bit-fp4": {
        "pet_type": "qlora",
        "target_modules": ".*q_proj|.*v_proj",
        "quantization": {"bits": 4, "quant_type": "fp4", "double_quant": False},
    },
    "qlora-8bit": {"pet_type": "qlora", "target_modules": "all-linear", "quantization": {"bits": 8}},
}
_LR = {"full": 3e-3, "freeze": 3e-3}


@pytest.fixture(scope="session")
def memo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("memo") / "memo.json"
    path.write_text(json.dumps(MEMO_ROWS, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def train_job(tiny_model_dirs: dict[str, Path], memo_data: Path) -> Callable[..., Any]:
    from kubetune.spec import FineTuneJob

    def make(
        output: Path | str,
        *,
        pet_config: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
        dataset: dict[str, Any] | None = None,
        merge_adapter: bool = True,
        model_uri: str | None = None,
        name: str = "t",
    ) -> Any:
        spec = {
            "model": {"uri": model_uri or str(tiny_model_dirs["qwen2"])},
            "dataset": {"uri": str(memo_data), "format": "alpaca", **(dataset or {})},
            "pet_config": pet_config or {"pet_type": "lora"},
            "training": {
                "max_steps": 30,
                "learning_rate": 1e-2,
                "per_device_train_batch_size": 4,
                "seq_length": 64,
                "precision": "fp32",
                "lr_scheduler_type": "constant",
                "logging_steps": 1,
                **(training or {}),
            },  # fmt: skip
            "output": {"uri": str(output), "merge_adapter": merge_adapter},
        }
        return FineTuneJob.model_validate(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": name},
                "spec": spec,
            }
        )

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, train_job: Callable[..., Any]) -> Callable[[str], Any]:
    from kubetune_trainer.train import run_training

    done: dict[str, Any] = {}

    def run(case: str) -> tuple[Any, Any]:
        if case not in done:
            base = tmp_path_factory.mktemp(f"run-{case}")
            training: dict[str, Any] = {"learning_rate": _LR.get(case, 1e-2)}
            dataset: dict[str, Any] = {}
            if case.startswith("qlora"):
                # an evaluation between training steps: on AVX512-BF16 CPUs bitsandbytes would repack
                # the 4-bit weights for inference there and break every later training step
                dataset["validation_split"] = 0.25
                training["eval_steps"] = 10
            job = train_job(base / "out", pet_config=METHOD_CASES[case], training=training, dataset=dataset)
            done[case] = (job, run_training(job, workdir=base / "work"))
        return done[case]

    return run


def on_small_disk(mountpoint: Path, size: str, argv: list[str]) -> list[str]:
    """`argv` run with a fresh tmpfs of `size` (e.g. "2m") mounted at `mountpoint`: a real file
    system that fills up. In a user and mount namespace of its own, so it needs no root."""
    import shlex

    mountpoint.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mountpoint))} && exec {shlex.join(argv)}"
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]


def write_job_file(job: Any, path: Path, **spec: Any) -> Path:
    """Write `job` (a FineTuneJob) as YAML, with top-level spec sections (checkpoint=..., storage=...)
    set or merged in; None values are left out."""
    import yaml

    doc = job.model_dump(mode="json", exclude_none=True)
    for key, value in spec.items():
        if value is not None:
            doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path
