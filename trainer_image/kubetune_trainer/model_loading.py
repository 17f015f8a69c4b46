"""Find the base model a FineTuneJob names and load it (and its tokenizer) with transformers.

`spec.model.uri` may be
- a plain path, ``file:///path`` or ``pvc://claim/path``: used in place
  (:func:`kubetune.locations.local_path`: ``$KUBETUNE_PVC_ROOT`` stands in for the claims' mount
  root outside the cluster, as for datasets);
- ``s3://bucket/prefix``: fetched once into :func:`kubetune.locations.cache_path` (under
  ``$KUBETUNE_CACHE_DIR``, default ``~/.cache/kubetune``) by
  :func:`kubetune_trainer.locations.fetch`, which also verifies every safetensors file complete and
  every shard of an index present before the copy counts;
- ``hf://org/name``: fetched with ``huggingface_hub`` where the hub is reachable; otherwise the job
  stops with a one-line message saying to copy the model to s3:// or a PVC.

Weights are read from safetensors only (no pickle). The dtype follows ``training.precision``
(:func:`resolve_precision`); ``trust_remote_code`` is passed only when the spec sets it, and
``training.attn_implementation`` unless it is ``auto`` (:mod:`switches` checked it can run here).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.locations import CACHE_HF_DIR, cache_root
from kubetune.uris import parse_uri
from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import CAUSAL_LM, ModelHead

if TYPE_CHECKING:
    import torch

    from kubetune.spec import FineTuneJobSpec, S3Storage

log = logging.getLogger("kubetune.model")

# What a model directory needs; everything else in an hf:// repo (e.g. .bin, .gguf) is skipped.
_HF_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py", "*.md"]


# ---------------------------------------------------------------- precision and device


@dataclass(frozen=True)
class Precision:
    """What `training.precision` means on this machine."""

    name: str  # fp32 | bf16 | fp16 (auto resolved)
    dtype: torch.dtype  # weights of the (frozen) base model and the compute dtype
    device_type: str  # cuda | cpu


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# CPU flags of native bf16 matrix math (Intel AMX, AVX512-BF16; AMD Zen 4+ has the latter): there
# bf16 runs faster than fp32, elsewhere it is emulated and slower.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU (or the ``/proc/cpuinfo`` text given) has one of :data:`NATIVE_BF16_CPU_FLAGS`."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:  # not Linux: no way to tell, so the safe choice
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return any(f in value.split() for f in NATIVE_BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: str | None = None) -> Precision:
    """`training.precision` to a dtype; a precision this machine cannot run is a JobError. ``auto``:
    bf16 on GPUs that support it and on CPUs with native bf16 (:func:`cpu_has_native_bf16`), else
    fp32. bf16 keeps trainable full/freeze weights and LoRA adapters in fp32 (pet.py) and
    autocasts the compute."""
    import torch

    device = device or device_type()
    bf16_ok = device == "cpu" or (device == "cuda" and torch.cuda.is_bf16_supported())
    if precision == "auto":
        native = cpu_has_native_bf16() if device == "cpu" else bf16_ok
        precision = "bf16" if native else "fp32"
    if precision == "fp16" and device != "cuda":
        raise JobError("training.precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and not bf16_ok:
        raise JobError("training.precision bf16 is not supported by this GPU; use fp16 or fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return Precision(precision, dtype, device)


# ---------------------------------------------------------------- locating the model


def resolve_model_dir(
    uri: str,
    *,
    s3: S3Storage | None = None,
    revision: str | None = None,
    field: str = "spec.model.uri",
    require_config: bool = True,
) -> Path:
    """A local directory in Hugging Face layout for `uri`: a local or pvc:// directory in place, an
    s3:// prefix fetched into the cache (every safetensors file checked complete, every shard an
    index names present), an hf:// repo through huggingface_hub."""
    try:
        u = parse_uri(uri)
    except ValueError as e:
        raise JobError(f"{field}: {e}") from None
    if u.scheme == "hf":
        path = _download_hf(u.path, revision, field)
    else:
        from kubetune_trainer.locations import to_local

        try:
            path = to_local(uri, s3, field=field, verify=_model_problems)
        except JobError as e:  # a model is a directory: say so
            raise JobError(str(e).replace("no such file or directory", "no such directory")) from None
    if not path.is_dir():
        raise JobError(f"{field}: {uri}: not a directory")
    if require_config and not (path / "config.json").is_file():
        raise JobError(f"{field}: {uri}: not a Hugging Face model directory (no config.json)")
    return path


def _model_problems(root: Path) -> list[str]:
    """What is wrong with a fetched model beyond object sizes: a safetensors file that does not hold
    all its tensors, a shard its index names that is not there."""
    problems = []
    for f in sorted(root.rglob("*.safetensors")):
        try:
            check_safetensors(f)
        except JobError as e:
            problems.append(str(e))
    for index in root.glob("*.safetensors.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            problems.append(f"{index.name} names shards that are missing: {', '.join(missing)}")
    return problems


def check_safetensors(path: Path) -> None:
    """Raise JobError unless `path` is a complete safetensors file (header parses, data all there)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise JobError(f"{path.name}: not a valid safetensors file ({e})") from None
    if 8 + n + end != size:
        raise JobError(f"{path.name}: truncated safetensors file ({size} bytes, needs {8 + n + end})")


def _download_hf(repo_id: str, revision: str | None, field: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise JobError(f"{field}: hf://{repo_id} needs huggingface_hub") from None
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_root() / CACHE_HF_DIR, allow_patterns=_HF_PATTERNS
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise JobError(
            f"{field}: hf://{repo_id} could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {reason}); where the hub is not reachable, copy the model to "
            "s3:// or a PVC and use that URI"
        ) from None
    return Path(path)


# ---------------------------------------------------------------- loading


def load_tokenizer(spec: FineTuneJobSpec, model_dir: Path) -> Any:
    """The tokenizer from `model.tokenizer_uri` or the model directory; pad falls back to eos."""
    from transformers import AutoTokenizer

    where = model_dir
    if spec.model.tokenizer_uri:
        where = resolve_model_dir(
            spec.model.tokenizer_uri,
            s3=spec.storage.s3,
            revision=spec.model.revision,
            field="spec.model.tokenizer_uri",
            require_config=False,
        )
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot load a tokenizer from {where}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    model_dir: Path,
    spec: FineTuneJobSpec,
    precision: Precision,
    *,
    quantization_config: Any = None,
    device: str | None = None,
    head: ModelHead | None = None,
) -> Any:
    """`AutoModelForCausalLM` (or the Auto class of the method's `head`, e.g. a sequence classifier
    with a new score head for a reward model) from safetensors, in the precision's dtype.

    A quantized model is placed on `device` while loading (bitsandbytes quantizes there); others
    load on CPU and the Trainer moves them.
    """
    if not any(model_dir.glob("*.safetensors")):
        raise JobError(
            f"spec.model.uri: {model_dir} has no *.safetensors weights; kubetune loads safetensors only "
            "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    kwargs: dict[str, Any] = {
        "dtype": precision.dtype,
        "use_safetensors": True,
        "trust_remote_code": spec.model.trust_remote_code,
        **(head or CAUSAL_LM).init_kwargs,
    }
    if spec.training.attn_implementation != "auto":  # auto: transformers' own choice (sdpa where supported)
        kwargs["attn_implementation"] = spec.training.attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device or precision.device_type}
    try:
        model = (head or CAUSAL_LM).model_class().from_pretrained(model_dir, **kwargs)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "trust_remote_code" in msg:
            raise JobError(
                f"spec.model.uri: {model_dir} needs its own Python code; set spec.model.trust_remote_code: true "
                "if you trust it"
            ) from None
        raise
    model.config.use_cache = False  # no KV cache while training
    return model
