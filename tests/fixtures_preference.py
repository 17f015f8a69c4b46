"""Helpers for the preference-method tests (dpo, kto, orpo, simpo, reward, the staged e2e runs):
preference and unpaired data, the FineTuneJob builder, and what is alive or changed during training.

- `write_preferences(path, n)`: prompt/chosen/rejected rows, a correct answer preferred to a refusal.
- `write_unpaired(path, n)`: the same as prompt/completion/label rows (KTO's unpaired_preference).
- `make_job(name, model, data, out, **spec)`: a 30-step LoRA dpo FineTuneJob (override method etc.).
- `live_tensor_bytes()`, `live_models(model_dir)`: tensors and causal LMs alive in this process.
- `snapshot(named_parameters)`, `changed(before, after)`: which parameters training changed.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune.spec import FineTuneJob


def write_preferences(path: Path, n: int, seed: int = 0) -> Path:
    """prompt/chosen/rejected rows: a helpful, correct answer is preferred to a refusal."""
    rng = random.Random(seed)
    things = ["apples", "books", "cats", "chairs", "stars", "coins", "trees", "birds", "boats", "shoes"]
    rows = []
    for _ in range(n):
        a, b, t = rng.randint(1, 20), rng.randint(1, 20), rng.choice(things)
        rows.append(
            {
                "prompt": f"I have {a} {t} and get {b} more. How many {t} do I have?",
                "chosen": f"Sure! You have {a + b} {t}.",
                "rejected": "No idea, count them yourself.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_job(name: str, model_path: Path, data: Path, out: Path, **spec: Any) -> FineTuneJob:
    training = {
        "max_steps": 30, "learning_rate": 2e-3, "per_device_train_batch_size": 4, "seq_length": 64,
        "precision": "fp32", "lr_scheduler_type": "constant", "logging_steps": 1,
        **spec.pop("training", {}),
    }  # fmt: skip
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model_path), **spec.pop("model", {})},
            "dataset": {"uri": str(data), **spec.pop("dataset", {})},
            "method": "dpo",
            "pet_config": {
                "pet_type": "lora",
                "lora_rank": 8,
                "lora_alpha": 16,
                **spec.pop("pet_config", {}),
            },
            "training": training,
            "checkpoint": {"every_steps": 1000},
            "output": {"uri": str(out)},
            **spec,
        },
    }
    return FineTuneJob.model_validate(doc)


def kubetune_run(job: FineTuneJob, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`kubetune run` of `job` in a fresh process (its own cache under tmp_path, one thread per rank)."""
    import yaml

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kubetune", "run", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_unpaired(path: Path, n: int, seed: int = 0) -> Path:
    """prompt/completion/label rows from write_preferences' pairs: row i keeps the correct answer
    (label true) for even i, the refusal (label false) for odd i."""
    pairs = [json.loads(line) for line in write_preferences(path, n, seed).read_text().splitlines()]
    rows = [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, p in enumerate(pairs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable in this process."""
    import torch

    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def live_models(model_dir: Path) -> list[Any]:
    """Whole causal LMs (not their inner decoder stacks) loaded from `model_dir`, alive now."""
    from transformers import PreTrainedModel

    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if isinstance(o, PreTrainedModel)
        and type(o).__name__.endswith("ForCausalLM")
        and getattr(o.config, "_name_or_path", None) == str(model_dir)
    ]


def snapshot(named: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in named}


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    import torch

    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}
