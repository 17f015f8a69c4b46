"""Which weights train: `spec.pet_config` (a separate axis from `spec.method`, the training recipe)
applied to a loaded model.

- ``full`` (and ``none``): every weight trains.
- ``freeze``: only the last ``freeze_trainable_layers`` decoder layers train, or, when
  ``freeze_trainable_modules`` is set, the modules it names. A pattern matches a module when it is
  the module's full name (``model.norm``), a dotted suffix of it (``lm_head``, ``mlp.down_proj``)
  or a regular expression matching the whole name (``model\\.layers\\.[23]\\..*``); a parameter
  trains when its module or any module above it matches.
- ``lora``: peft LoRA adapters on a frozen base; ``target_modules`` is a regex over module names
  (``'.*q_proj|.*v_proj'``, matched against the whole name with RE2, in linear time), a list of
  names (each matching a name or its last components) or ``all-linear`` (every linear layer but
  the output head).
- ``qlora``: the base is loaded quantized by bitsandbytes (4-bit NF4/FP4, optional double
  quantization, or 8-bit), prepared with peft's ``prepare_model_for_kbit_training``, then LoRA.

LoRA and QLoRA adapters take peft's variants: ``use_dora`` (DoRA: a trained magnitude vector per
adapted weight, ``lora_magnitude_vector``), ``use_rslora`` (scaling alpha/sqrt(r) instead of alpha/r)
and ``init_lora_weights`` (``gaussian``; ``pissa`` and ``olora`` start A and B from an SVD / QR of
each weight and take that part out of the base weight). A PiSSA/OLoRA adapter only means something
on the changed base, so :func:`apply_pet` keeps the adapter as initialised and the export hands it
to peft (:func:`initial_adapter_dir`), which writes final/adapter as a plain LoRA adapter of the
unchanged base (rank 2r: the trained adapter minus the initial one).

Full and freeze keep trainable weights in fp32 when the model is loaded in bf16/fp16 (mixed
precision then autocasts), so optimizer updates are not lost to rounding; LoRA adapters are fp32
through peft's own autocast of adapter dtypes.

:func:`plan_pet` runs before anything heavy: where this machine cannot run the pet_type (no
bitsandbytes, no bitsandbytes backend for the device) it raises a one-line :class:`JobError`, so a
run never fails with a stack trace half-way into loading.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import CAUSAL_LM, ModelHead

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.model_loading import Precision

log = logging.getLogger("kubetune.pet")


@dataclass(frozen=True)
class PetPlan:
    """What `plan_pet` decided, before the model is loaded."""

    pet_type: str  # full | freeze | lora | qlora
    description: str  # for the start-up line, e.g. "qlora (4-bit nf4, double quant, rank 8)"
    quantization_config: Any = None  # transformers.BitsAndBytesConfig for qlora

    @property
    def uses_adapter(self) -> bool:
        return self.pet_type in ("lora", "qlora")


# ---------------------------------------------------------------- before loading


def plan_pet(spec: FineTuneJobSpec, precision: Precision) -> PetPlan:
    """Check this machine can run the job's pet_config and build what loading needs."""
    pc = spec.pet_config
    pet = "full" if pc.pet_type == "none" else pc.pet_type
    if spec.training.optimizer == "adamw_8bit":
        _import_bitsandbytes("training.optimizer adamw_8bit")
    if pet == "full":
        return PetPlan("full", "full (every weight trains)")
    if pet == "freeze":
        what = (
            f"modules {', '.join(pc.freeze_trainable_modules)}"
            if pc.freeze_trainable_modules
            else f"last {pc.freeze_trainable_layers} layers"
        )
        return PetPlan("freeze", f"freeze (only the {what} train)")
    lora = f"rank {pc.lora_rank}, alpha {pc.lora_alpha}, target_modules {_show_targets(pc.target_modules)}"
    variants = [
        *(["DoRA"] if pc.use_dora else []),
        *(["rsLoRA"] if pc.use_rslora else []),
        *([f"init {pc.init_lora_weights}"] if pc.init_lora_weights is not True else []),
    ]
    if variants:
        lora += f", {', '.join(variants)}"
    if pet == "lora":
        return PetPlan("lora", f"lora ({lora})")
    q = pc.quantization
    assert q is not None  # the spec's cross-field rules require it for qlora
    if q.bits == 4:
        desc = f"4-bit {q.quant_type}{', double quant' if q.double_quant else ''}"
    else:
        desc = "8-bit"
    _probe_bitsandbytes(q.bits, q.quant_type, q.double_quant, precision, desc)
    return PetPlan("qlora", f"qlora ({desc}; {lora})", quantization_config(spec, precision))


def quantization_config(spec: FineTuneJobSpec, precision: Precision) -> Any:
    """transformers' BitsAndBytesConfig for `pet_config.quantization`."""
    import torch
    from transformers import BitsAndBytesConfig

    q = spec.pet_config.quantization
    assert q is not None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = precision.dtype if q.compute_dtype == "auto" else getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def _show_targets(t: str | list[str]) -> str:
    return ",".join(t) if isinstance(t, list) else t


def _import_bitsandbytes(what: str) -> Any:
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - ImportError, or a backend that fails while importing
        raise JobError(
            f"{what} needs bitsandbytes, which cannot be imported here ({type(e).__name__}: "
            f"{_first_line(e)}); install bitsandbytes, or use pet_type lora"
        ) from None
    return bitsandbytes


def _probe_bitsandbytes(
    bits: int, quant_type: str, double_quant: bool, precision: Precision, desc: str
) -> None:
    """A tiny quantized matmul with backward on the training device, or a one-line JobError."""
    import torch

    what = f"spec.pet_config.pet_type qlora ({desc})"
    bnb = _import_bitsandbytes(what)
    device = precision.device_type  # "cuda": the current GPU, which run_training made this rank's own
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                64, 64, bias=False, compute_dtype=precision.dtype, quant_type=quant_type,
                compress_statistics=double_quant,
            )  # fmt: skip
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, dtype=precision.dtype, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("the backward pass gave no finite gradient")
    except Exception as e:  # noqa: BLE001 - any backend failure means: this machine cannot run it
        raise JobError(
            f"{what} cannot run on this machine ({device}): bitsandbytes failed a test matmul "
            f"({type(e).__name__}: {_first_line(e)}); use pet_type lora, or a machine bitsandbytes supports"
        ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:240]


# ---------------------------------------------------------------- after loading


def apply_pet(
    model: Any,
    spec: FineTuneJobSpec,
    plan: PetPlan,
    *,
    adapter_dir: Path | None = None,
    scratch: Path | None = None,
    head: ModelHead | None = None,
) -> Any:
    """Set what trains on a loaded model; LoRA/QLoRA return a peft model.

    `adapter_dir`: an existing adapter (spec.model.adapter_uri, resolved) to keep training instead
    of new adapters. `scratch`: where a PiSSA/OLoRA adapter's initial state is kept for the export (a
    temporary directory when None). `head` (the method's recipe's): the adapter's peft task type and
    the modules that train in full with LoRA and freeze alike (a reward model's new score head).
    """
    pc = spec.pet_config
    head = head or CAUSAL_LM
    if plan.pet_type == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        _upcast_trainable(model)
        return model
    if plan.pet_type == "freeze":
        _freeze(model, pc.freeze_trainable_layers, pc.freeze_trainable_modules)
        for name, p in model.named_parameters():  # a new head trains whatever else is frozen
            if any(_module_matches(name.rsplit(".", 1)[0], m) for m in head.modules_to_save):
                p.requires_grad_(True)
        _upcast_trainable(model)
        return model

    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if plan.pet_type == "qlora":
        keep_4bit_layers_trainable(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(spec.training.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if adapter_dir is not None:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        _check_adapter_variant(peft_model.peft_config["default"], spec)
        return peft_model
    config = LoraConfig(
        r=pc.lora_rank,
        lora_alpha=pc.lora_alpha,
        lora_dropout=pc.lora_dropout,
        target_modules=resolve_target_modules(model, pc.target_modules),
        bias="none",
        use_dora=pc.use_dora,
        use_rslora=pc.use_rslora,
        init_lora_weights=pc.init_lora_weights,
        task_type=head.peft_task_type,
        modules_to_save=list(head.modules_to_save) or None,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise JobError(
            f"spec.pet_config.target_modules {_show_targets(pc.target_modules)!r}: {_first_line(e)} "
            f"(linear modules of this model end in: {', '.join(linear_module_suffixes(model))})"
        ) from None
    if pc.init_lora_weights in _MUTATING_INITS:
        _keep_initial_adapter(peft_model, scratch)
    return peft_model


# inits that take their part out of the base weights: the adapter is converted at export
_MUTATING_INITS = ("pissa", "olora")
_INITIAL_ADAPTER_ATTR = "kubetune_initial_adapter"


def _keep_initial_adapter(peft_model: Any, scratch: Path | None) -> None:
    """Save the adapter as initialised, with a plain-LoRA config (what peft's conversion expects: loading
    it must not decompose the already changed base again)."""
    import tempfile

    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="initial-adapter-", dir=scratch)) / "initial"
    cfg = peft_model.peft_config["default"]
    init, cfg.init_lora_weights = cfg.init_lora_weights, True
    try:
        peft_model.save_pretrained(str(where), safe_serialization=True, save_embedding_layers=False)
    finally:
        cfg.init_lora_weights = init
    setattr(peft_model, _INITIAL_ADAPTER_ATTR, where)


def initial_adapter_dir(model: Any) -> Path | None:
    """The initial state of a PiSSA/OLoRA adapter (peft's ``path_initial_model_for_weight_conversion``),
    or None for adapters that need no conversion."""
    return getattr(model, _INITIAL_ADAPTER_ATTR, None)


def _check_adapter_variant(config: Any, spec: FineTuneJobSpec) -> None:
    """An adapter continued from model.adapter_uri keeps its own DoRA / rsLoRA: a spec saying otherwise is
    refused rather than ignored."""
    pc = spec.pet_config
    for field, ours in (("use_dora", pc.use_dora), ("use_rslora", pc.use_rslora)):
        theirs = bool(getattr(config, field, False))
        if theirs != ours:
            raise JobError(
                f"spec.pet_config.{field} is {str(ours).lower()} but the adapter at spec.model.adapter_uri was "
                f"trained with {field} {str(theirs).lower()}: set {field}: {str(theirs).lower()}"
            )


def resolve_target_modules(model: Any, target_modules: str | list[str]) -> str | list[str]:
    """A target_modules regex as the names of the modules it matches in full, found with RE2.

    peft would run a string through Python's backtracking ``re.fullmatch`` against every module
    name, and a pattern such as ``(.*.*)*q_projX`` never returns; RE2 answers in linear time.
    Lists and ``all-linear`` go to peft as they are.
    """
    if not isinstance(target_modules, str) or target_modules == "all-linear":
        return target_modules
    from kubetune.spec import compile_module_regex

    regex = compile_module_regex(target_modules)
    names = [name for name, _ in model.named_modules() if name]
    chosen = [name for name in names if regex.fullmatch(name)]
    if not chosen:
        raise JobError(
            f"spec.pet_config.target_modules {target_modules!r}: matches no module of this model "
            f"(linear modules of this model end in: {', '.join(linear_module_suffixes(model))})"
        )
    # peft matches a list entry by whole name or dotted suffix; where a chosen name is also the
    # suffix of a module the regex left out, an escaped alternation keeps peft exact (and linear).
    left_out = set(names) - set(chosen)
    suffixes = {o.split(".", i)[-1] for o in left_out for i in range(1, o.count(".") + 1)}
    if suffixes & set(chosen):
        return "|".join(re.escape(name) for name in chosen)
    return chosen


def keep_4bit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, `Linear4bit` running in eval mode without grad (an evaluation pass)
    rewrites its weight into an inference-only layout; every later training step then goes through
    a kernel with no autograd ("autograd kernel was not registered") and training silently breaks.
    Evaluation in the CPU's own layout is a little slower; training stays correct.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def linear_module_suffixes(model: Any) -> list[str]:
    """Distinct last name components of the model's linear layers (for error messages)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def decoder_layers(model: Any) -> tuple[str, int]:
    """(dotted name, count) of the model's stack of decoder layers: its longest ModuleList."""
    import torch

    best: tuple[str, int] = ("", 0)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > best[1]:
            best = (name, len(m))
    if not best[1]:
        raise JobError("spec.pet_config.pet_type freeze: cannot find the model's decoder layers")
    return best


def _module_matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    from kubetune.spec import compile_module_regex

    try:
        return compile_module_regex(pattern).fullmatch(name) is not None  # RE2: a pattern cannot hang
    except ValueError:
        return False


def _freeze(model: Any, trainable_layers: int, patterns: list[str]) -> None:
    if patterns:
        modules = [name for name, _ in model.named_modules() if name]
        matched = {p: [n for n in modules if _module_matches(n, p)] for p in patterns}
        unmatched = [p for p, found in matched.items() if not found]
        if unmatched:
            raise JobError(
                f"spec.pet_config.freeze_trainable_modules: {', '.join(map(repr, unmatched))} match no module; "
                f"module names look like {', '.join(modules[i] for i in (0, len(modules) // 2, -1))}"
            )
        chosen = sorted({n for found in matched.values() for n in found})
    else:
        stack, n = decoder_layers(model)
        if trainable_layers > n:
            raise JobError(
                f"spec.pet_config.freeze_trainable_layers: {trainable_layers} is more than the model's {n} layers"
            )
        chosen = [f"{stack}.{i}" for i in range(n - trainable_layers, n)]
    prefixes = tuple(c + "." for c in chosen)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))


def _upcast_trainable(model: Any) -> None:
    import torch

    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts as the parameters it stands for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            storage = getattr(p, "quant_storage", None)
            n *= 2 * (storage.itemsize if storage is not None else 1)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
