"""Where base models come from: paths, file://, pvc://, s3:// (a real S3 server), hf:// offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune.locations import COMPLETE_MARKER, cache_path
from kubetune_trainer.errors import JobError
from kubetune_trainer.model_loading import (
    check_safetensors,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    resolve_precision,
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_plain_path_and_file_uri(tiny_model_dirs: Any) -> None:
    d = tiny_model_dirs["llama"]
    assert resolve_model_dir(str(d)) == d
    assert resolve_model_dir(f"file://{d}") == d


def test_pvc_uri_is_the_mounted_claim(
    tiny_model_dirs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "mnt" / "models" / "tiny")
    assert resolve_model_dir("pvc://models/tiny") == tmp_path / "mnt" / "models" / "tiny"
    with pytest.raises(JobError, match=r"pvc://models/other: no such directory \(is the claim mounted"):
        resolve_model_dir("pvc://models/other")


def test_missing_or_foreign_directories_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(JobError, match=r"^spec.model.uri: .*/nope: no such directory$"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="not a Hugging Face model directory"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_s3_model_downloads_once_verified_and_loads(tiny_model_dirs: Any, s3: Any, cache: Path) -> None:
    from kubetune.spec import FineTuneJobSpec

    s3.store("models/tiny").upload_dir(tiny_model_dirs["qwen2"], "")
    uri = s3.uri("models/tiny")
    local = resolve_model_dir(uri, s3=s3.settings)
    assert local == cache_path(uri) and local.is_relative_to(cache)
    manifest = json.loads((local / COMPLETE_MARKER).read_text())
    assert manifest["uri"] == uri and manifest["files"]["model.safetensors"] > 0
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": uri}, "dataset": {"uri": "/d.json"}, "output": {"uri": "/o"}}
    )
    model = load_model(local, spec, resolve_precision("fp32"))
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.use_cache is False
    assert load_tokenizer(spec, local).pad_token is not None

    s3.store("models/tiny").delete_prefix("")  # cached: no second download
    assert resolve_model_dir(uri, s3=s3.settings) == local


def test_s3_prefix_without_a_model_is_a_clear_error(s3: Any, cache: Path) -> None:
    with pytest.raises(JobError, match=r"^spec.model.uri: s3://.*/nothing: no such object or prefix$"):
        resolve_model_dir(s3.uri("nothing"), s3=s3.settings)


def test_truncated_safetensors_is_detected(tiny_model_dirs: Any, tmp_path: Path) -> None:
    good = tiny_model_dirs["qwen2"] / "model.safetensors"
    check_safetensors(good)
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(JobError, match="truncated safetensors file"):
        check_safetensors(bad)
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(JobError, match="not a valid safetensors file"):
        check_safetensors(bad)


def test_hf_uri_without_the_hub_says_what_to_do(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(JobError) as err:
        resolve_model_dir("hf://Qwen/Qwen2.5-0.5B")
    msg = str(err.value)
    assert msg.startswith(
        "spec.model.uri: hf://Qwen/Qwen2.5-0.5B could not be fetched from the Hugging Face Hub"
    )
    assert "copy the model to s3:// or a PVC" in msg and "\n" not in msg


def test_weights_must_be_safetensors(tiny_model_dirs: Any, tmp_path: Path) -> None:
    from kubetune.spec import FineTuneJobSpec

    d = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dirs["qwen2"], d)
    (d / "model.safetensors").unlink()
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": str(d)}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}}
    )
    with pytest.raises(JobError, match="has no \\*.safetensors weights; kubetune loads safetensors only"):
        load_model(d, spec, resolve_precision("fp32"))


def test_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kubetune_trainer import model_loading

    monkeypatch.setattr(model_loading, "cpu_has_native_bf16", lambda: False)  # a CPU without AMX/AVX512-BF16
    assert resolve_precision("auto", "cpu").dtype == torch.float32
    monkeypatch.undo()
    assert resolve_precision("bf16", "cpu").dtype == torch.bfloat16
    with pytest.raises(JobError, match="training.precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda").name == "bf16"
