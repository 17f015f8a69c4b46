"""Fixtures for the data pipeline tests: the offline tiny tokenizer/models and FineTuneJob builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DATA = REPO / "examples" / "data"
SHARED_DATA = Path("/work/shared/data")


def make_job(
    dataset: dict[str, Any],
    *,
    method: str = "sft",
    training: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    model_uri: str = "/nonexistent/model",
) -> Any:
    from kubetune.spec import FineTuneJob

    spec: dict[str, Any] = {
        "model": {"uri": model_uri},
        "dataset": dataset,
        "method": method,
        "training": {"seq_length": 512, **(training or {})},
        "output": {"uri": "/tmp/kubetune-test-out"},
    }
    if storage:
        spec["storage"] = storage
    return FineTuneJob.model_validate(
        {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "t"}, "spec": spec}
    )


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as .json (array), .jsonl, .csv, .parquet by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(suffix)
    return path


@pytest.fixture(autouse=False)
def data_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from kubetune.conventions import ENV_CACHE_DIR

    d = tmp_path / "cache"
    monkeypatch.setenv(ENV_CACHE_DIR, str(d))
    return d


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from kubetune_trainer.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_trainer.tiny import build_tiny_model

    base = tmp_path_factory.mktemp("tiny-models")
    return {
        arch: build_tiny_model(
            base / arch, arch=arch, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2
        )
        for arch in ("qwen2", "llama")
    }


@pytest.fixture(scope="session")
def load_tiny() -> Callable[..., Any]:
    cache: dict[tuple[str, str, float], Any] = {}

    def load(path: Path, attn: str, sharpen: float = 1.0) -> Any:
        """The tiny model in eval mode; `sharpen` scales every weight matrix so that a random model's
        predictions depend strongly on context (a leak between packed samples then moves the loss a lot)."""
        import torch
        from transformers import AutoModelForCausalLM

        key = (str(path), attn, sharpen)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
            model.eval()
            if sharpen != 1.0:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.dim() == 2:
                            p.mul_(sharpen)
            # as in training (model_loading does it): with a KV cache transformers does not look for
            # packed sequences in position_ids (masking_utils._preprocess_mask_arguments)
            model.config.use_cache = False
            cache[key] = model
        return cache[key]

    return load
