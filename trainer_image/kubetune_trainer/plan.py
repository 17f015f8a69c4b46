"""`kubetune plan JOB`: the memory one training process will need, before anything is applied.

The model is built from its config.json on the meta device (accelerate's `init_empty_weights`,
transformers' `from_config`): no weights are read and a 70B model takes a second. Then the same
code the trainer runs shapes it: transformers' bitsandbytes quantizer replaces the linear layers
for QLoRA and bitsandbytes quantizes each meta weight (the packed 4-bit or int8 data and its
quantization state: absmax, nested absmax, code maps, offsets), the trainer's own
``apply_pet`` sets what trains (full, freeze, LoRA through peft, QLoRA through peft's
``prepare_model_for_kbit_training``), and the optimizer class and arguments the Trainer would
choose take one step on meta gradients, so its state tensors exist as they will. Summing those
tensors gives the weights, adapter, gradient and optimizer terms exactly as a real run on CPU
holds them (tests/test_plan.py compares them byte for byte). Activations, sharding and the
verdict are arithmetic in :mod:`kubetune.plan`.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import methods
from kubetune import plan as core
from kubetune.uris import parse_uri
from kubetune_trainer.errors import JobError

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob, FineTuneJobSpec

from kubetune_trainer import pet

# ---------------------------------------------------------------- the model's config


def model_config(spec: FineTuneJobSpec) -> Any:
    """The model's transformers config, read without its weights; one-line JobError if unseen."""
    from transformers import AutoConfig

    uri = spec.model.uri
    if uri is None:
        raise JobError("spec.model.uri: not set (a spec.model.name needs its profile: pass --profile)")
    u = parse_uri(uri)
    with tempfile.TemporaryDirectory(prefix="kubetune-plan-") as tmp:
        if u.scheme == "hf":
            where = _hf_config(u.path, spec.model.revision, Path(tmp))
        elif u.scheme == "s3":
            where = _s3_config(uri, spec, Path(tmp))
        else:
            from kubetune.locations import local_path

            where = local_path(u)
            assert where is not None
            if not (where / "config.json").is_file():
                raise JobError(
                    f"spec.model.uri: {uri}: no config.json there on this machine; kubetune plan reads the "
                    "model's config.json (a pvc:// model: set $KUBETUNE_PVC_ROOT to where the claim is)"
                )
        try:
            return AutoConfig.from_pretrained(where, trust_remote_code=spec.model.trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise JobError(f"spec.model.uri: {uri}: cannot read its config.json: {_first_line(e)}") from None


def _hf_config(repo_id: str, revision: str | None, tmp: Path) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, "config.json", revision=revision, local_dir=tmp, etag_timeout=5)
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: one line
        raise JobError(
            f"spec.model.uri: hf://{repo_id}: cannot read its config.json from the Hugging Face Hub "
            f"({type(e).__name__}: {_first_line(e)}); plan a local copy of the model instead"
        ) from None
    return tmp


def _s3_config(uri: str, spec: FineTuneJobSpec, tmp: Path) -> Path:
    from kubetune_trainer.store import open_store

    try:
        open_store(uri, spec.storage.s3).get_file("config.json", tmp / "config.json")
    except Exception as e:  # noqa: BLE001 - no credentials, denied, absent: one line
        raise JobError(
            f"spec.model.uri: {uri}: cannot read config.json ({type(e).__name__}: {_first_line(e)}); "
            "kubetune plan reads it with this machine's S3 credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY)"
        ) from None
    return tmp


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------- precision on the target


@dataclass(frozen=True)
class _Precision:  # what model_loading.Precision holds, for a device that may not be this one
    name: str
    dtype: Any
    device_type: str


def target_precision(precision: str, device: str) -> Any:
    """`training.precision` on the job's device: auto is bf16 on a GPU (Ampere and later, what
    clusters offer), on CPU what this machine's CPU would do."""
    import torch

    if device == "cpu":
        from kubetune_trainer.model_loading import resolve_precision

        return resolve_precision(precision, "cpu")
    name = "bf16" if precision == "auto" else precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return _Precision(name, dtype, device)


# ---------------------------------------------------------------- the meta model


def meta_model(spec: FineTuneJobSpec, config: Any, precision: Any) -> tuple[Any, Any]:
    """(model, PetPlan): the job's model on the meta device as the trainer would hold it."""
    import torch
    from accelerate import init_empty_weights

    from kubetune_trainer import recipes

    pc = spec.pet_config
    pet_type = "full" if pc.pet_type == "none" else pc.pet_type
    qc = pet.quantization_config(spec, precision) if pet_type == "qlora" else None
    head = recipes.get(spec.method).head  # a causal LM, or e.g. a reward model's classifier
    # what from_pretrained sets on the config (num_labels ...) from_config does not take as arguments
    if head.init_kwargs:
        config = copy.deepcopy(config)
        for key, value in head.init_kwargs.items():
            setattr(config, key, value)
    with init_empty_weights():
        model = head.model_class().from_config(
            config, dtype=precision.dtype, trust_remote_code=spec.model.trust_remote_code
        )
    model.config.use_cache = False
    if qc is not None:
        _quantize_on_meta(model, qc, precision.dtype)
    plan = pet.PetPlan(pet_type, pet_type, qc)
    torch.manual_seed(0)  # adapter init on meta draws nothing, but peft may touch the RNG
    model = pet.apply_pet(model, spec, plan, head=head)
    if qc is not None:
        _first_forward_casts(model)
    return model, plan


def _first_forward_casts(model: Any) -> None:
    """bitsandbytes' Linear4bit casts its bias to its compute dtype in its first forward (after
    peft's preparation made it fp32): what a training run holds from its first step on."""
    import bitsandbytes as bnb

    for module in model.modules():
        if (
            isinstance(module, bnb.nn.Linear4bit)
            and module.bias is not None
            and module.compute_dtype is not None
        ):
            module.bias.data = module.bias.data.to(module.compute_dtype)


def _quantize_on_meta(model: Any, qc: Any, dtype: Any) -> None:
    """What transformers' bitsandbytes loading does, on meta tensors: its quantizer replaces the
    linear layers, then each weight is quantized by bitsandbytes' own functions (their meta
    kernels give the packed data and quantization state their real shapes)."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except Exception as e:  # noqa: BLE001
        raise JobError(
            f"spec.pet_config.pet_type qlora: kubetune plan needs bitsandbytes to size the quantized "
            f"weights ({type(e).__name__}: {_first_line(e)})"
        ) from None
    import torch
    from transformers.quantizers import AutoHfQuantizer

    # bitsandbytes caches its 8-bit code map on the device of the first tensor it quantizes:
    # make that cache a real CPU tensor before it sees a meta one
    F.name2qmap.setdefault("dynamic", F.create_dynamic_map())
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map={"": "cpu"}, checkpoint_files=None)
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            data, state = F.quantize_4bit(
                w.data.to(dtype), blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                quant_type=w.quant_type, quant_storage=w.quant_storage,
            )  # fmt: skip
            w.data, w.quant_state, w.bnb_quantized = data, state, True
        elif isinstance(module, bnb.nn.Linear8bitLt):
            cb, scb, _ = F.int8_vectorwise_quant(w.data.to(torch.float16))
            w.data, w.SCB = cb, scb
    quantizer.postprocess_model(model)
    quantizer._process_model_after_weight_loading(model)  # sets is_loaded_in_4bit / 8bit as loading does


# ---------------------------------------------------------------- tensors to rows


def _rows(tensors: list[Any]) -> core.Rows:
    rows = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if nbytes:
            dim0 = t.shape[0] if t.dim() else 1
            rows.append((dim0, nbytes // dim0))
    return rows


def quant_state_tensors(param: Any) -> list[Any]:
    """The tensors a bitsandbytes weight keeps beside its data (4-bit QuantState, 8-bit SCB)."""
    out = []
    qs = getattr(param, "quant_state", None)
    while qs is not None:
        out += [t for t in (qs.absmax, qs.code, getattr(qs, "offset", None)) if t is not None]
        qs = getattr(qs, "state2", None)
    scb = getattr(param, "SCB", None)
    if scb is not None:
        out.append(scb)
    return out


def split_tensors(model: Any) -> dict[str, list[Any]]:
    """weights (base parameters, buffers, quantization state) and adapter (LoRA) tensors, each once."""
    seen: set[int] = set()
    out: dict[str, list[Any]] = {"weights": [], "adapter": []}

    def add(kind: str, t: Any) -> None:
        if t is None:
            return
        key = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            out[kind].append(t)

    for name, p in model.named_parameters():
        add("adapter" if ".lora_" in name else "weights", p)
        for t in quant_state_tensors(p):
            add("weights", t)
    for _, b in model.named_buffers():
        add("weights", b)
    return out


def optimizer_state_tensors(optimizer: Any) -> list[Any]:
    return [v for state in optimizer.state.values() for v in state.values() if hasattr(v, "element_size")]


def meta_optimizer(model: Any, spec: FineTuneJobSpec) -> Any:
    """The optimizer the Trainer builds for `spec`, after one step on meta gradients."""
    import torch
    from transformers import Trainer, TrainingArguments

    from kubetune_trainer.train import optimizer_name  # spec.training.optimizer -> TrainingArguments.optim

    t = spec.training
    with tempfile.TemporaryDirectory(prefix="kubetune-plan-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, optim=optimizer_name(t.optimizer, "cuda"), learning_rate=t.learning_rate,
            weight_decay=t.weight_decay, use_cpu=True, report_to=[],
        )  # fmt: skip
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs.pop("fused", None)  # the fused kernels refuse meta tensors; their state is the same
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise JobError("spec.pet_config: nothing trains (no trainable parameter)")
    optimizer = cls([{"params": params}], **kwargs)
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer.step()
    return optimizer


# ---------------------------------------------------------------- measuring


def measure(spec: FineTuneJobSpec, config: Any, device: str) -> core.Measured:
    """The tensor terms of one process (before sharding) and the model's shape."""
    import torch

    precision = target_precision(spec.training.precision, device)
    model, plan = meta_model(spec, config, precision)
    groups = split_tensors(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.empty_like(p) for p in trainable]
    optimizer = meta_optimizer(model, spec)
    opt_state = optimizer_state_tensors(optimizer)

    stack, n_layers = pet.decoder_layers(model)
    layer0 = model.get_submodule(f"{stack}.0")
    layer_params = list(layer0.parameters())
    layer_weights = sum(core.sharded_bytes(_rows([p, *quant_state_tensors(p)]), 1) for p in layer_params)
    layer_grads = sum(p.numel() * p.element_size() for p in layer_params if p.requires_grad)

    adapted = [m for m in layer0.modules() if getattr(m, "lora_A", None)]  # peft's LoRA layers
    compute_bytes = torch.empty((), dtype=precision.dtype).element_size()
    autocast = 0
    if compute_bytes < 4:  # autocast runs each linear on a 16-bit copy of its fp32 trainable weight
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        autocast = sum(
            m.weight.numel() * compute_bytes
            for m in linears
            if m.weight.requires_grad and m.weight.dtype == torch.float32
        )
    out_emb = model.get_output_embeddings()
    vocab = out_emb.weight.shape[0] if out_emb is not None else config.vocab_size
    hidden = config.hidden_size
    shape = core.ModelShape(
        hidden=hidden,
        layers=n_layers,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        vocab=vocab,
        lora_out_features=sum(m.out_features for m in adapted),
    )
    total, n_trainable = pet.count_parameters(model)[::-1]
    reference = 0
    # TRL's reference: a frozen copy of the adapter, or the base again
    if methods.method(spec.method).reference_model:
        if plan.uses_adapter:
            reference = core.sharded_bytes(_rows(groups["adapter"]), 1)
        else:
            base = total * torch.empty((), dtype=precision.dtype).element_size()
            reference = base + sum(b.numel() * b.element_size() for b in model.buffers())
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return core.Measured(
        weights=_rows(groups["weights"]),
        adapter=_rows(groups["adapter"]),
        gradients=_rows(grads),
        optimizer=_rows(opt_state),
        layer_weights=layer_weights,
        layer_gradients=layer_grads,
        reference=reference,
        autocast_copies=autocast,
        shape=shape,
        total_params=total,
        trainable_params=n_trainable,
        compute_bytes=compute_bytes,
        description=f"{arch}, {describe(spec)}, {precision.name} on {device}",
        notes={
            "weights": _dtypes(groups["weights"])
            + (
                ", linears in " + describe(spec).split("(")[-1].rstrip(")")
                if plan.quantization_config is not None
                else ""
            ),
            "adapter": _dtypes(groups["adapter"]),
            "gradients": _dtypes(grads),
            "optimizer": f"{spec.training.optimizer}: {_dtypes(opt_state)}",
        },
    )


def _dtypes(tensors: list[Any]) -> str:
    """The dtypes of `tensors`, largest share first: 'bf16 97%, fp32 3%'."""
    by: dict[str, int] = {}
    for t in tensors:
        name = str(t.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp")
        by[name] = by.get(name, 0) + t.numel() * t.element_size()
    total = sum(by.values()) or 1
    parts = sorted(by.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / total:.0%}" if len(parts) > 1 else k for k, v in parts) or "none"


def describe(spec: FineTuneJobSpec) -> str:
    pc = spec.pet_config
    if pc.pet_type in ("lora", "qlora"):
        what = f"{pc.pet_type} rank {pc.lora_rank}"
        if pc.pet_type == "qlora" and pc.quantization is not None:
            q = pc.quantization
            what += f" ({q.bits}-bit{' ' + q.quant_type if q.bits == 4 else ''})"
        return what
    return "full" if pc.pet_type == "none" else pc.pet_type


# ---------------------------------------------------------------- the plan


def setup_of(spec: FineTuneJobSpec, device: str) -> core.Setup:
    t, pc = spec.training, spec.parallel_config
    nproc = pc.nproc_per_node or (spec.resources.gpus if device == "cuda" and spec.resources.gpus else 1)
    return core.Setup(
        batch=t.per_device_train_batch_size,
        accumulation=t.gradient_accumulation_steps,
        seq_length=t.seq_length,
        gradient_checkpointing=bool(t.gradient_checkpointing),
        offload=t.gradient_checkpointing == "offload",
        nnodes=pc.nnodes,
        nproc_per_node=nproc,
        strategy=pc.strategy,
        method=spec.method,
        device=device,
    )


def budget_of(spec: FineTuneJobSpec, gpu_memory: str | None, device: str, nproc: int) -> core.Budget:
    if gpu_memory:
        try:
            return core.Budget(core.parse_memory(gpu_memory), f"--gpu-memory {gpu_memory}")
        except ValueError as e:
            raise JobError(f"--gpu-memory: {e}") from None
    if device == "cuda":
        sel = spec.resources.node_selector
        size = core.gpu_memory_from_selector(sel)
        if size is not None:
            label = core.GPU_MEMORY_LABEL if core.GPU_MEMORY_LABEL in sel else core.GPU_PRODUCT_LABEL
            return core.Budget(size, f"{label}={sel[label]} in resources.node_selector")
        return core.Budget(
            None,
            "GPU memory unknown: pass --gpu-memory, or name the GPU in resources.node_selector "
            f"({core.GPU_PRODUCT_LABEL} or {core.GPU_MEMORY_LABEL})",
        )
    memory = spec.resources.memory
    return core.Budget(core.parse_memory(memory) // nproc, f"resources.memory {memory} / {nproc} process(es)")


def alternatives(spec: FineTuneJobSpec, config: Any, device: str) -> dict[str, core.Measured]:
    """The model measured with a lighter pet_config, for the suggestions."""
    from kubetune.spec import Quantization

    out: dict[str, core.Measured] = {}
    pc = spec.pet_config
    if pc.pet_type in ("none", "full", "freeze"):
        lora = pc.model_copy(update={"pet_type": "lora"})
        out[f"pet_type: lora (rank {pc.lora_rank})"] = measure(
            spec.model_copy(update={"pet_config": lora}), config, device
        )
    if pc.pet_type != "qlora":
        q = pc.model_copy(update={"pet_type": "qlora", "quantization": Quantization()})
        try:
            out[f"pet_type: qlora (4-bit nf4, rank {pc.lora_rank})"] = measure(
                spec.model_copy(update={"pet_config": q}), config, device
            )
        except JobError:  # no bitsandbytes here: no QLoRA line
            pass
    return out


def plan_job(
    job: FineTuneJob, *, gpu_memory: str | None = None, tflops: float | None = None
) -> dict[str, Any]:
    """Everything `kubetune plan` reports, as a dict (its --json)."""
    from kubetune_trainer.train import quiet_known_noise

    quiet_known_noise()
    spec = job.spec
    device = "cuda" if gpu_memory or spec.resources.gpus > 0 else "cpu"
    config = model_config(spec)
    m = measure(spec, config, device)
    s = setup_of(spec, device)
    est = core.estimate(m, s)
    budget = budget_of(spec, gpu_memory, device, s.nproc_per_node)
    sugg: list[core.Suggestion] = []
    if budget.bytes is not None and est.total > budget.bytes:
        sugg = core.suggestions(m, s, budget.bytes, alternatives=alternatives(spec, config, device))
    extra: dict[str, Any] = {"job": job.metadata.name, "device": device}
    if tflops:
        extra["step_seconds"] = core.step_seconds(m, s, tflops)
        extra["tflops"] = tflops
    return core.plan_dict(m, s, est, budget, sugg, **extra)


__all__ = ["measure", "meta_model", "model_config", "plan_job", "split_tensors", "quant_state_tensors"]
