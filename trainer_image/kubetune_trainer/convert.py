"""`kubetune export SOURCE DEST`: a job's adapter or checkpoint as a plain Hugging Face model.

SOURCE is found by what it holds (:func:`locate`), locally or in an object store (s3:// sources are
fetched into the cache with the store code the trainer uses, checkpoints verified against their
manifest):

- an adapter directory (``adapter_config.json``; ``final/adapter``): merged onto its base, the one
  the adapter records (``base_model_name_or_path``) or ``--base``, with peft's ``merge_and_unload``
  through :func:`kubetune_trainer.export.merge_onto_base`, as the training run's own ``final/merged``;
- a model directory (``config.json`` + safetensors; ``final/merged``): saved again (``--dtype``,
  ``--max-shard-size``);
- a checkpoint directory: a committed ``step-N`` (its ``COMMITTED`` manifest records the job's model,
  pet_config and data settings) or a Trainer ``checkpoint-N``. LoRA checkpoints hold an adapter (merged
  as above); full and freeze ones the model; FSDP ones (``pytorch_model_fsdp_0/``, one
  torch.distributed.checkpoint shard per rank) are put back together into one state dict with
  ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` and loaded into the recorded base;
- a job output (``spec.output.uri``): its ``final/adapter``, else ``final/merged``, else its newest
  committed checkpoint (``checkpoints/``).

DEST gets safetensors in Hugging Face layout plus the tokenizer (with the chat template the job
trained with, when the checkpoint records it), loadable by ``AutoModelForCausalLM.from_pretrained``
(a reward model's by ``AutoModelForSequenceClassification``, its score head kept: :func:`head_of`);
``--adapter`` writes a LoRA source's adapter alone instead. DEST may be s3://.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kubetune import methods
from kubetune.conventions import ADAPTER_DIR, CHECKPOINTS_DIR, COMMITTED_FILE, MERGED_DIR
from kubetune.uris import parse_uri
from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import CAUSAL_LM, ModelHead

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec, S3Storage
    from kubetune_trainer.store import ObjectStore

log = logging.getLogger("kubetune.convert")

FSDP_MODEL_DIR = "pytorch_model_fsdp_0"  # kubetune_trainer.fsdp.MODEL_DIR (kept light: no torch import)
DTYPES = ("auto", "fp32", "bf16", "fp16")

Kind = Literal["model", "adapter", "checkpoint"]


@dataclass
class Source:
    """What SOURCE turned out to be, fetched to a local directory."""

    kind: Kind
    uri: str  # the directory it was found at
    path: Path  # its local copy
    recorded: dict[str, Any] = field(default_factory=dict)  # the job's settings a checkpoint recorded

    @property
    def is_fsdp(self) -> bool:
        return (self.path / FSDP_MODEL_DIR / ".metadata").is_file()

    @property
    def has_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    def base_models(self, override: str | None) -> list[str]:
        """Where the base model may be: --base alone if given, else what the adapter records (peft's
        ``base_model_name_or_path``), then the job's spec.model.uri a checkpoint records."""
        if override:
            return [override]
        out = []
        config = self.path / "adapter_config.json"
        if config.is_file():
            recorded = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
            if recorded:
                out.append(str(recorded))
        uri = (self.recorded.get("model") or {}).get("uri")
        if uri and uri not in out:
            out.append(str(uri))
        return out

    def base_model(self, override: str | None) -> str | None:
        found = self.base_models(override)
        return found[0] if found else None

    def spec(self) -> FineTuneJobSpec | None:
        """The job's spec as far as the checkpoint recorded it (model, data, method, pet_config,
        training), or None when nothing is recorded (an adapter or model directory)."""
        return spec_from_recorded(self.recorded) if self.recorded else None


def spec_from_recorded(fields: dict[str, Any]) -> FineTuneJobSpec:
    """A FineTuneJobSpec from a checkpoint manifest's ``spec_fields`` (FineTuneJobSpec.training_fields)."""
    from pydantic import ValidationError

    from kubetune.spec import FineTuneJobSpec

    doc = {k: fields[k] for k in ("model", "dataset", "method", "pet_config", "training") if k in fields}
    doc["parallel_config"] = {"strategy": fields.get("parallel_strategy", "ddp")}
    doc["output"] = {"uri": "/nonexistent"}  # required by the spec, unused here

    def clean(v: Any) -> Any:  # the dump writes every default (None included); the spec wants them unset
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if x is not None}
        return v

    try:
        return FineTuneJobSpec.model_validate(clean(doc))
    except ValidationError as e:
        raise JobError(
            f"the checkpoint's recorded job settings do not validate: {e.errors()[0]['msg']}"
        ) from None


# ---------------------------------------------------------------- finding SOURCE


def _open(uri: str, s3: S3Storage | None) -> ObjectStore:
    from kubetune_trainer.store import StoreError, open_store

    try:
        parse_uri(uri)
        return open_store(uri, s3)
    except (ValueError, StoreError) as e:
        raise JobError(f"{uri}: {e}") from None


def _join(uri: str, key: str) -> str:
    return f"{uri.rstrip('/')}/{key}" if key else uri


def locate(
    uri: str, *, s3: S3Storage | None = None, prefer: Literal["merged", "adapter"] = "adapter"
) -> Source:
    """Find what `uri` holds (see the module docstring) and fetch it; a job output gives its
    final/`prefer` first, then the other final/ directory, then its newest committed checkpoint."""
    from kubetune_trainer.store import StoreError

    store = _open(uri, s3)
    try:
        keys = set(store.list(""))
    except StoreError as e:
        raise JobError(f"{uri}: {e}") from None
    if not keys:
        raise JobError(f"{uri}: no such directory (or nothing in it)")
    kind = _kind_of(keys)
    if kind is not None:
        return _fetch(store, uri, "", kind, s3)
    order = [MERGED_DIR, ADAPTER_DIR] if prefer == "merged" else [ADAPTER_DIR, MERGED_DIR]
    for sub in order:
        found = _kind_of({k[len(sub) + 1 :] for k in keys if k.startswith(sub + "/")})
        if found is not None:
            source = _fetch(store, uri, sub, found, s3)
            source.recorded = _recorded_of_newest(store, keys)
            return source
    for prefix in (CHECKPOINTS_DIR + "/", ""):  # a job output, or its checkpoints directory itself
        newest = _newest_committed(store, prefix, keys)
        if newest is not None:
            return _fetch(store, uri, prefix + newest, "checkpoint", s3)
    trainer_ckpts = sorted(
        {k.split("/", 1)[0] for k in keys if k.startswith("checkpoint-") and "/" in k},
        key=lambda n: int(n.split("-", 1)[1]) if n.split("-", 1)[1].isdigit() else -1,
    )
    if trainer_ckpts:
        return _fetch(store, uri, trainer_ckpts[-1], "checkpoint", s3)
    raise JobError(
        f"{uri}: neither a model, an adapter, a checkpoint nor a job output (no config.json, "
        "adapter_config.json, COMMITTED, final/ or checkpoints/ there)"
    )


def _kind_of(keys: set[str]) -> Kind | None:
    if COMMITTED_FILE in keys or "trainer_state.json" in keys or f"{FSDP_MODEL_DIR}/.metadata" in keys:
        return "checkpoint"
    if "adapter_config.json" in keys:
        return "adapter"
    if "config.json" in keys and any(k.endswith(".safetensors") and "/" not in k for k in keys):
        return "model"
    return None


def _newest_committed(store: ObjectStore, prefix: str, keys: set[str]) -> str | None:
    from kubetune_trainer import checkpoints as ck

    if not any(k.startswith(prefix) and k.endswith("/" + COMMITTED_FILE) for k in keys):
        return None
    newest = ck.latest_committed(store.sub(prefix.rstrip("/")) if prefix else store)
    return newest.name if newest else None


def _recorded_of_newest(store: ObjectStore, keys: set[str]) -> dict[str, Any]:
    """The job settings of the output's newest committed checkpoint ({} without one)."""
    from kubetune_trainer import checkpoints as ck

    name = _newest_committed(store, CHECKPOINTS_DIR + "/", keys)
    if name is None:
        return {}
    manifest = ck.read_manifest(store.sub(CHECKPOINTS_DIR), name)
    return dict((manifest.extra if manifest else {}).get("spec_fields") or {})


def _fetch(store: ObjectStore, uri: str, sub: str, kind: Kind, s3: S3Storage | None) -> Source:
    from kubetune_trainer import checkpoints as ck
    from kubetune_trainer.store import LocalStore

    where = _join(uri, sub)
    recorded: dict[str, Any] = {}
    here = store.sub(sub) if sub else store
    manifest = None
    if kind == "checkpoint" and here.exists(COMMITTED_FILE):
        try:
            manifest = ck.Manifest.from_json(here.get_bytes(COMMITTED_FILE))
        except (ValueError, KeyError) as e:
            raise JobError(f"{where}: unreadable {COMMITTED_FILE} manifest ({e})") from None
        recorded = dict(manifest.extra.get("spec_fields") or {})
    if isinstance(store, LocalStore):
        path = store.root / sub if sub else store.root
        if manifest is not None:
            problems = ck.verify_local(path, manifest)
            if problems:
                raise JobError(f"{where}: the checkpoint does not match its manifest: {problems[0]}")
        return Source(kind, where, path, recorded)
    if manifest is not None:  # fetched once into the cache, every file checked against the manifest
        from kubetune.locations import cache_path

        name = sub.rsplit("/", 1)[-1] if sub else parse_uri(uri).path.rstrip("/").rsplit("/", 1)[-1]
        parent_key = sub.rsplit("/", 1)[0] if "/" in sub else ""
        parent = store.sub(parent_key) if parent_key else store
        if not sub:  # SOURCE is the step directory itself: its parent is one level up
            parent = _open(where.rstrip("/").rsplit("/", 1)[0], s3)
        step = ck.parse_step_name(name)
        ckpt = ck.Checkpoint(step if step is not None else manifest.step, name, where, manifest)
        try:
            path = ck.download(parent, ckpt, cache_path(where).parent / cache_path(where).name)
        except ck.CorruptCheckpoint as e:
            raise JobError(str(e)) from None
        return Source(kind, where, path, recorded)
    from kubetune_trainer.model_loading import resolve_model_dir

    path = resolve_model_dir(where, s3=s3, field="SOURCE", require_config=False)
    return Source(kind, where, path, recorded)


# ---------------------------------------------------------------- loading


def resolve_dtype(name: str, source: Source, base_dir: Path | None) -> Any:
    """--dtype to a torch dtype; auto: the precision the job trained in where recorded, else the
    dtype the model's config.json names, else float32."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name != "auto":
        return table[name]
    recorded = (source.recorded.get("training") or {}).get("precision")
    if recorded in table:
        return table[recorded]
    for d in (source.path, base_dir):
        config = d / "config.json" if d is not None else None
        if config is not None and config.is_file():
            doc = json.loads(config.read_text(encoding="utf-8"))
            named = doc.get("dtype") or doc.get("torch_dtype")
            if isinstance(named, str) and hasattr(torch, named):
                return getattr(torch, named)
    return torch.float32


def base_model_dir(source: Source, base: str | None, s3: S3Storage | None) -> Path:
    """The base model a LoRA or FSDP source needs, local (fetched if it is s3:// or hf://)."""
    from kubetune_trainer.model_loading import resolve_model_dir

    refs = source.base_models(base)
    if not refs:
        raise JobError(f"{source.uri}: no base model recorded; pass --base MODEL")
    field = "--base" if base else f"{source.uri}: the base model"
    for ref in refs:
        local = Path(ref).expanduser()
        if local.is_dir():
            return local
        if "://" in ref:
            return resolve_model_dir(ref, s3=s3, field=field)
        if not ref.startswith(("/", ".", "~")) and ref.count("/") == 1:  # peft records hub models by id
            return resolve_model_dir(f"hf://{ref}", s3=s3, field=field)
    if base:
        raise JobError(f"--base: {base}: no such directory")
    raise JobError(f"{source.uri}: its base model is not here ({', '.join(refs)}); pass --base MODEL")


def load_tokenizer_for(source: Source, base_dir: Path | None) -> Any:
    """The tokenizer saved with the source, else the recorded tokenizer_uri's, else the base's; with the
    chat template the job trained with when a checkpoint records the job's data settings."""
    from transformers import AutoTokenizer

    candidates = [source.path]
    recorded_tok = (source.recorded.get("model") or {}).get("tokenizer_uri")
    if recorded_tok and Path(recorded_tok).expanduser().is_dir():
        candidates.append(Path(recorded_tok).expanduser())
    if base_dir is not None:
        candidates.append(base_dir)
    for d in candidates:
        if (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(d)
            break
    else:
        raise JobError(f"{source.uri}: no tokenizer found with it or its base model")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    spec = source.spec()
    if spec is not None and methods.method(spec.method).chat:
        from kubetune_trainer.chat_render import training_chat_template

        tok.chat_template = training_chat_template(
            tok,
            apply_chat_template=spec.dataset.apply_chat_template,
            system_prompt=spec.dataset.system_prompt,
        )
    return tok


def head_of(source: Source) -> ModelHead:
    """What the source loads as: the head of the method that trained it (a reward model's sequence
    classifier, its score head kept), else what its files say (the adapter's peft task type, the
    model's architecture), else a causal LM."""
    from kubetune_trainer import recipes

    spec = source.spec()
    if spec is not None:
        return recipes.get(spec.method).head
    heads = [r.head for r in recipes.registry().values()]
    if source.has_adapter:
        task = _read_json(source.path / "adapter_config.json").get("task_type")
        return next((h for h in heads if h.peft_task_type == task), CAUSAL_LM)
    architectures = _read_json(source.path / "config.json").get("architectures") or []
    return next(
        (h for h in heads if any(a.endswith(h.auto_class.removeprefix("AutoModel")) for a in architectures)),
        CAUSAL_LM,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _pet_plan(source: Source, dtype: Any) -> Any:
    """What merging needs of the job's pet plan: the quantization a QLoRA job trained against."""
    from kubetune_trainer.pet import PetPlan, plan_pet

    spec = source.spec()
    precision = _precision(dtype)
    if spec is not None and spec.pet_config.pet_type == "qlora":
        return plan_pet(spec, precision)
    return PetPlan("lora", "lora")


def _precision(dtype: Any) -> Any:
    import torch

    from kubetune_trainer.model_loading import Precision, device_type

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    return Precision(name, dtype, device_type())


def _fsdp_state_dict(source: Source) -> dict[str, Any]:
    """The full model state dict from an FSDP checkpoint's shards (no process group needed)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="kubetune-dcp-") as tmp:
        target = Path(tmp) / "full.pt"
        dcp_to_torch_save(source.path / FSDP_MODEL_DIR, target)
        state = torch.load(target, weights_only=True, map_location="cpu")
    return state.get("model", state)  # accelerate saves {"model": state_dict}


def load_model(
    source: Source, *, base: str | None, s3: S3Storage | None, dtype: Any
) -> tuple[Any, Path | None]:
    """The source as a ready transformers model (LoRA merged) and the base directory it used, if any."""
    from kubetune_trainer.export import merge_onto_base

    head = head_of(source)
    if source.kind == "model" or (source.kind == "checkpoint" and (source.path / "config.json").is_file()
                                  and not source.has_adapter and not source.is_fsdp):  # fmt: skip
        model = head.model_class().from_pretrained(source.path, dtype=dtype, use_safetensors=True)
        return model, None
    base_dir = base_model_dir(source, base, s3)
    if source.is_fsdp:
        return _load_fsdp(source, base_dir, dtype, head), base_dir
    if not source.has_adapter:
        raise JobError(f"{source.uri}: a checkpoint with neither model weights, an adapter nor FSDP shards")
    model = merge_onto_base(base_dir, source.path, _pet_plan(source, dtype), _precision(dtype), head=head)
    return model, base_dir


def _load_fsdp(source: Source, base_dir: Path, dtype: Any, head: ModelHead) -> Any:
    import torch

    state = _fsdp_state_dict(source)
    model = head.model_class().from_pretrained(
        base_dir, **head.init_kwargs, dtype=torch.float32, use_safetensors=True
    )
    spec = source.spec()
    if spec is not None and spec.pet_config.pet_type in ("lora", "qlora"):
        from kubetune_trainer.pet import PetPlan, apply_pet

        model = apply_pet(
            model, spec, PetPlan("lora", "lora"), head=head
        )  # the same adapters, on the full base
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embed_tokens) are saved once
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise JobError(
            f"{source.uri}: the FSDP shards do not fit the base model {base_dir} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pass the base it trained from with --base"
        )
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.to(dtype)


# ---------------------------------------------------------------- export


def export(
    source_uri: str,
    dest: str,
    *,
    base: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | None = None,
    adapter_only: bool = False,
    s3: S3Storage | None = None,
) -> Path | str:
    """`kubetune export`: write SOURCE as a Hugging Face model (or, `adapter_only`, its adapter) at DEST."""
    if dtype not in DTYPES:
        raise JobError(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dest_scheme = parse_uri(dest).scheme
    if dest_scheme == "hf":
        raise JobError("DEST: a Hugging Face hub id cannot be written; use a directory or s3://")
    local_dest = _local_dest(dest) if dest_scheme == "file" else None
    source = locate(source_uri, s3=s3, prefer="adapter")
    with tempfile.TemporaryDirectory(prefix="kubetune-export-") as tmp:
        out = local_dest or Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        if adapter_only:
            _write_adapter(source, base, s3, out)
        else:
            _write_model(source, base, s3, dtype, max_shard_size, out)
        if local_dest is not None:
            return local_dest
        store = _open(dest, s3)
        if store.list(""):
            raise JobError(f"DEST: {dest} is not empty; export into a new prefix")
        store.upload_dir(out, "")
        return dest


def _local_dest(dest: str) -> Path:
    from kubetune.locations import local_path

    path = local_path(dest)
    assert path is not None
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise JobError(f"DEST: {dest} exists and is not an empty directory; export into a new one")
    return path


def _write_model(
    source: Source, base: str | None, s3: S3Storage | None, dtype: str, max_shard_size: str | None, out: Path
) -> None:
    base_dir = None if source.kind == "model" else _maybe_base(source, base, s3)
    torch_dtype = resolve_dtype(dtype, source, base_dir)
    model, base_dir = load_model(source, base=base, s3=s3, dtype=torch_dtype)
    model.config.use_cache = True
    tokenizer = load_tokenizer_for(source, base_dir)
    if model.config.pad_token_id is None and head_of(source) != CAUSAL_LM:
        model.config.pad_token_id = tokenizer.pad_token_id  # a classifier scores the last non-pad token
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    log.info("exported %s to %s", source.uri, out)


def _maybe_base(source: Source, base: str | None, s3: S3Storage | None) -> Path | None:
    try:
        return base_model_dir(source, base, s3)
    except JobError:
        return None  # a full checkpoint needs none


def _write_adapter(source: Source, base: str | None, s3: S3Storage | None, out: Path) -> None:
    from kubetune_trainer.export import base_model_reference

    if not source.has_adapter:
        raise JobError(f"--adapter: {source.uri} holds no LoRA adapter (adapter_config.json)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (source.path / name).is_file():
            raise JobError(f"{source.uri}: {name} is missing")
        shutil.copyfile(source.path / name, out / name)
    ref = source.base_model(base)
    if ref:  # what peft loads the adapter onto
        config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base_model_reference(ref)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    load_tokenizer_for(source, _maybe_base(source, base, s3)).save_pretrained(out)


__all__ = [
    "DTYPES",
    "Source",
    "export",
    "head_of",
    "load_model",
    "load_tokenizer_for",
    "locate",
    "spec_from_recorded",
]
