"""Where inputs and outputs live: one rule for local paths (pvc:// through $KUBETUNE_PVC_ROOT), one
cache layout for everything fetched from s3://, one output layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune import locations
from kubetune.locations import COMPLETE_MARKER, cache_path, local_path
from kubetune_trainer import data_sources
from kubetune_trainer.errors import JobError
from kubetune_trainer.locations import fetch, read_marker
from kubetune_trainer.model_loading import resolve_model_dir
from tests.fixtures_data import write_rows
from tests.fixtures_train import MEMO_ROWS


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(locations.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(locations.ENV_PVC_ROOT, raising=False)
    assert local_path("/data/x.json") == Path("/data/x.json")
    assert local_path("file:///data/x.json") == Path("/data/x.json")
    assert local_path("pvc://claim/sft/x.json") == Path("/mnt/pvc/claim/sft/x.json")
    monkeypatch.setenv(locations.ENV_PVC_ROOT, str(tmp_path))
    assert local_path("pvc://claim/sft/x.json") == tmp_path / "claim" / "sft" / "x.json"
    assert local_path("s3://bucket/x") is None and local_path("hf://org/name") is None


def test_pvc_model_and_pvc_dataset_train_through_one_rule(
    tiny_model_dirs: Any, train_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pvc:// model and a pvc:// dataset, both under $KUBETUNE_PVC_ROOT: a real (short) training run
    finds both, and writes its pvc:// output there too."""
    from kubetune_trainer.train import run_training

    root = tmp_path / "claims"
    monkeypatch.setenv(locations.ENV_PVC_ROOT, str(root))
    shutil.copytree(tiny_model_dirs["qwen2"], root / "models" / "tiny")
    write_rows(root / "data" / "sft" / "memo.jsonl", MEMO_ROWS)
    job = train_job(
        "pvc://runs/out", model_uri="pvc://models/tiny", training={"max_steps": 3},
        dataset={"uri": "pvc://data/sft/memo.jsonl"}, merge_adapter=False,
    )  # fmt: skip
    result = run_training(job, workdir=tmp_path / "work")
    assert result.global_step == 3
    assert (root / "runs" / "out" / locations.ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_s3_model_and_s3_dataset_share_one_cache_layout(tiny_model_dirs: Any, s3: Any, cache: Path) -> None:
    s3.store("models/tiny").upload_dir(tiny_model_dirs["qwen2"], "")
    s3.store("data").put_bytes("sft/memo.json", json.dumps(MEMO_ROWS).encode())
    model_uri, data_uri = s3.uri("models/tiny"), s3.uri("data/sft/memo.json")

    model = resolve_model_dir(model_uri, s3=s3.settings)
    data = data_sources.resolve(data_uri, s3.settings)

    assert model == cache_path(model_uri)
    assert data.path == cache_path(data_uri) / "memo.json"
    assert model.parent == data.path.parent.parent == cache / locations.CACHE_FETCHED_DIR
    for fetched, uri in ((model, model_uri), (data.path.parent, data_uri)):
        marker = read_marker(fetched)
        assert marker is not None and marker["uri"] == uri
        assert (fetched / COMPLETE_MARKER).is_file()
    assert [r.data for r in data_sources.iter_rows(data_uri, s3.settings)] == MEMO_ROWS


def test_a_fetch_that_fails_its_check_leaves_nothing(tiny_model_dirs: Any, s3: Any, cache: Path) -> None:
    """A truncated safetensors file in the bucket: one line naming the field, no half copy left."""
    good = (tiny_model_dirs["qwen2"] / "model.safetensors").read_bytes()
    store = s3.store("models/broken")
    store.upload_dir(tiny_model_dirs["qwen2"], "")
    store.put_bytes("model.safetensors", good[:-100])
    uri = s3.uri("models/broken")
    with pytest.raises(JobError, match=r"^spec.model.uri: s3://.*/broken: .*truncated safetensors file"):
        resolve_model_dir(uri, s3=s3.settings)
    assert not cache_path(uri).exists()
    assert not [p for p in cache_path(uri).parent.iterdir() if ".part-" in p.name]


def test_a_later_fetch_that_selects_more_fetches_again(s3: Any, cache: Path) -> None:
    store = s3.store("tok")
    store.put_bytes("tokenizer.json", b"{}")
    store.put_bytes("model.safetensors", b"weights")
    uri = s3.uri("tok")
    only_tokenizer = fetch(uri, s3.settings, field="f", select=lambda keys: ["tokenizer.json"])
    assert sorted(p.name for p in only_tokenizer.iterdir() if p.name != COMPLETE_MARKER) == ["tokenizer.json"]
    everything = fetch(uri, s3.settings, field="f")
    assert everything == only_tokenizer == cache_path(uri)
    assert (everything / "model.safetensors").read_bytes() == b"weights"
