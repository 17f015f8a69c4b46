"""`kubetune plan`: will a job fit in its GPUs' (or pods') memory? The arithmetic, without torch.

The trainer package (kubetune_trainer/plan.py) builds the job's model on the meta device and
measures what its tensors will hold: every weight, adapter, gradient and optimizer-state tensor
as (dim 0, bytes per dim-0 row) pairs, so sharding over any number of processes is exact here.
This module adds what depends on the batch, not on tensors:

activations, per process, micro-batch ``b``, ``seq_length`` ``s``, ``L`` decoder layers of width
``h`` and MLP width ``i``, compute dtype of ``d`` bytes, output vocabulary ``V``::

    layers  = b * s * h * L * F * d        F = 10 + 3 * i / h   (elements kept per hidden unit)
    norms   = b * s * h * L * 4 * 4        the RMS/LayerNorms compute in fp32 (input, normalised)
    lora    = b * s * L * O * d            the adapters' scaled outputs (O: out_features of the
                                           adapted linears per layer)
    logits  = b * s * V * 4 * 2            fp32 logits and their log-softmax (or its gradient)

F counts what a decoder layer saves for backward: about 10 h (attention: q, k, v, rotary outputs,
the attention output, the projection input) and about 3 i (MLP: gate, its activation, up, their
product; the input is the norm's). With ``gradient_checkpointing`` each layer keeps only its
input (``b * s * h * d``) and one layer at a time is recomputed in backward::

    checkpointed = b * s * h * L * d + b * s * (h * F * d + h * 4 * 4 + O * d) + logits

``gradient_checkpointing: offload`` (GPUs) moves those layer inputs to pinned host memory as they
are saved and brings one back per layer in backward, so the GPU keeps about two of them::

    offloaded = 2 * b * s * h * d + b * s * (h * F * d + h * 4 * 4 + O * d) + logits

The figures are fitted on transformers' Qwen2/Llama layers (SDPA attention) on CPU and hold within
25% of the measured peak of live activation tensors there (tests/test_plan.py); flash
attention on GPUs keeps a little less, a fused cross-entropy (Liger) far less logits.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kubetune import methods

GIB = 2**30

# Marketing names of GPUs without their memory in the product label (nvidia.com/gpu.product as
# GPU feature discovery writes it; names that include e.g. "80GB" are read from the name).
GPU_MEMORY_BY_PRODUCT = {
    "H200": 141 * 10**9,
    "H100": 80 * GIB,
    "GH200": 96 * GIB,
    "B200": 180 * 10**9,
    "L40S": 48 * GIB,
    "L40": 48 * GIB,
    "L4": 24 * GIB,
    "A10G": 24 * GIB,
    "A10": 24 * GIB,
    "T4": 16 * GIB,
    "V100": 16 * GIB,
}
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # GPU feature discovery: MiB per GPU
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
RUNTIME_OVERHEAD = GIB  # CUDA context, kernels and allocator slack (GPU) / Python and libraries (CPU)


Rows = list[tuple[int, int]]  # per tensor: (size of dim 0, bytes per dim-0 row)


def sharded_bytes(rows: Rows, world: int) -> int:
    """Bytes one of `world` processes holds when FSDP2 shards every tensor on dim 0 (padded)."""
    return sum(-(-dim0 // world) * row for dim0, row in rows)


@dataclass(frozen=True)
class ModelShape:
    """What the activation formula needs from the model (read from the meta model, not guessed)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    lora_out_features: int = 0  # per layer: out_features of the adapted linears


@dataclass(frozen=True)
class Measured:
    """The tensors of one process before sharding (from the trainer's meta model)."""

    weights: Rows  # base weights, buffers and quantization state
    adapter: Rows  # LoRA adapters
    gradients: Rows  # one per trainable tensor, in its dtype
    optimizer: Rows  # optimizer state after one step
    layer_weights: int  # bytes of the largest decoder layer's weights (an FSDP unit)
    layer_gradients: int  # bytes of that layer's trainable weights' gradients
    reference: int  # dpo: the frozen reference (a second base, or a copy of the adapter)
    autocast_copies: int  # bf16/fp16 copies of fp32 trainable linear weights autocast keeps in a forward
    shape: ModelShape
    total_params: int
    trainable_params: int
    compute_bytes: int  # bytes per element of the compute dtype (2 bf16/fp16, 4 fp32)
    description: str = ""  # e.g. "Qwen2ForCausalLM, lora rank 8, bf16"
    notes: dict[str, str] = field(default_factory=dict)  # per term, e.g. {"weights": "bf16"}


@dataclass(frozen=True)
class Setup:
    """The spec fields the estimate reads (what a suggestion changes)."""

    batch: int
    accumulation: int
    seq_length: int
    gradient_checkpointing: bool
    nnodes: int
    nproc_per_node: int
    strategy: str  # ddp | fsdp
    method: str = "sft"
    device: str = "cuda"
    offload: bool = False  # gradient_checkpointing: offload (the layer inputs in host memory)

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq_length: int,
    compute_bytes: int,
    checkpointing: bool,
    offload: bool = False,
) -> int:
    """The activation formula of the module docstring (on the device; `offload` under checkpointing)."""
    tokens = batch * seq_length
    h, L = shape.hidden, shape.layers
    factor = 10 + 3 * shape.intermediate / h
    layer = tokens * (h * (factor * compute_bytes + 4 * 4) + shape.lora_out_features * compute_bytes)
    logits = tokens * shape.vocab * 4 * 2
    if checkpointing:
        kept = min(2, L) if offload else L  # layer inputs on the device
        return int(tokens * h * kept * compute_bytes + layer + logits)
    return int(L * layer + logits)


@dataclass
class Estimate:
    terms: dict[str, int]  # term -> bytes per process, in table order
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def estimate(m: Measured, s: Setup) -> Estimate:
    """Bytes per process for `m` trained as `s`."""
    world = s.world
    fsdp = s.strategy == "fsdp" and world > 1
    w = world if fsdp else 1
    batch = s.batch * (2 if methods.method(s.method).preference else 1)  # chosen and rejected in one forward
    offloaded = s.gradient_checkpointing and s.offload
    terms = {
        "weights": sharded_bytes(m.weights, w),
        "adapter": sharded_bytes(m.adapter, w),
        "gradients": sharded_bytes(m.gradients, w),
        "optimizer": sharded_bytes(m.optimizer, w),
        "activations": activation_bytes(
            m.shape, batch, s.seq_length, m.compute_bytes, s.gradient_checkpointing, offloaded
        ),
    }
    notes = {k: v + (f", sharded over {world}" if fsdp and k in terms else "") for k, v in m.notes.items()}
    notes |= {
        "activations": f"batch {s.batch}{' x 2 (chosen, rejected)' if methods.method(s.method).preference else ''} x "
        f"{s.seq_length} tokens, {'with' if s.gradient_checkpointing else 'no'} gradient checkpointing"
        + (
            f", layer inputs offloaded ({show(batch * s.seq_length * m.shape.hidden * m.shape.layers * m.compute_bytes)}"
            " of host memory)"
            if offloaded
            else ""
        ),
    }
    if m.autocast_copies:
        terms["autocast copies"] = m.autocast_copies // w
        notes["autocast copies"] = "16-bit copies of the fp32 trainable weights, held through each forward"
    if m.reference:
        terms["dpo reference"] = m.reference // w
    if fsdp:
        # the gathered layer being computed and the next one prefetched, and one layer's gradients
        terms["fsdp buffers"] = 2 * m.layer_weights + m.layer_gradients
        notes["fsdp buffers"] = "two decoder layers gathered, one layer's gradients"
    elif world > 1:
        terms["ddp buckets"] = sharded_bytes(m.gradients, 1)
        notes["ddp buckets"] = "DDP's copy of the gradients for all-reduce"
    terms["runtime"] = RUNTIME_OVERHEAD
    notes["runtime"] = (
        "CUDA context, kernels, allocator slack (rough)"
        if s.device == "cuda"
        else "Python, torch and the libraries (rough)"
    )
    return Estimate(terms, notes)


# ---------------------------------------------------------------- budget


def parse_memory(text: str) -> int:
    """'80GiB', '80Gi', '80GB', '81559Mi', '8e10' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([KMGTP]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"{text!r} is not a memory size such as 80GiB, 80Gi or 24GB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGTP".find(unit) + 1 if unit else 0
    return int(number * ((1024 if binary else 1000) ** power))


def gpu_memory_from_selector(selector: dict[str, str]) -> int | None:
    """GPU memory per device from a node selector's GPU feature discovery labels, if it says."""
    if GPU_MEMORY_LABEL in selector:
        try:
            return int(selector[GPU_MEMORY_LABEL]) * 2**20
        except ValueError:
            return None
    product = selector.get(GPU_PRODUCT_LABEL)
    if not product:
        return None
    named = re.search(r"(\d+)\s*GB", product, re.IGNORECASE)
    if named:
        return int(named.group(1)) * GIB
    for name, size in sorted(GPU_MEMORY_BY_PRODUCT.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"(^|[-_ ]){name}($|[-_ ])", product, re.IGNORECASE):
            return size
    return None


@dataclass(frozen=True)
class Budget:
    bytes: int | None
    source: str  # what it was read from, for the verdict line


def show(n: int | float) -> str:
    """Bytes as GiB / MiB / KiB, three significant figures."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def verdict(total: int, budget: Budget) -> str:
    if budget.bytes is None:
        return f"{show(total)} per process; {budget.source}"
    free = budget.bytes - total
    word = "fits" if free >= 0 else "does not fit"
    return (
        f"{word}: {show(total)} of {show(budget.bytes)} per process ({budget.source}), "
        f"{abs(free) / budget.bytes:.0%} {'headroom' if free >= 0 else 'over'}"
    )


# ---------------------------------------------------------------- suggestions


@dataclass(frozen=True)
class Suggestion:
    change: str  # the spec change, as the user writes it
    total: int
    fits: bool

    def line(self, budget: int) -> str:
        word = "fits" if self.fits else "still does not fit"
        return f"{self.change}: {show(self.total)} of {show(budget)} ({word})"


def suggestions(
    m: Measured,
    s: Setup,
    budget: int,
    *,
    alternatives: dict[str, Measured] | None = None,
    max_nodes: int = 512,
) -> list[Suggestion]:
    """One change each that brings the job under `budget` (or the closest it gets).

    `alternatives`: the model measured with another ``pet_config`` (e.g. ``"pet_type: qlora
    (4-bit nf4)"`` -> its Measured), which only the trainer can build.
    """
    out: list[Suggestion] = []

    def add(change: str, mm: Measured, ss: Setup) -> None:
        total = estimate(mm, ss).total
        out.append(Suggestion(change, total, total <= budget))

    for b in range(s.batch - 1, 0, -1):  # the largest micro-batch that fits, same effective batch
        ss = replace(s, batch=b, accumulation=s.accumulation * math.ceil(s.batch / b))
        if estimate(m, ss).total <= budget or b == 1:
            add(f"per_device_train_batch_size: {b}, gradient_accumulation_steps: {ss.accumulation}", m, ss)
            break
    if not s.gradient_checkpointing:
        add("gradient_checkpointing: true", m, replace(s, gradient_checkpointing=True))
    if s.device == "cuda" and not (s.gradient_checkpointing and s.offload):
        add("gradient_checkpointing: offload", m, replace(s, gradient_checkpointing=True, offload=True))
    for change, mm in (alternatives or {}).items():
        add(change, mm, s)
    if s.strategy != "fsdp" and s.world > 1:
        add(f"strategy: fsdp (over the {s.world} processes)", m, replace(s, strategy="fsdp"))
    for n in range(s.nnodes + 1, max_nodes + 1):
        ss = replace(s, nnodes=n, strategy="fsdp")
        if estimate(m, ss).total <= budget or n == max_nodes:
            if estimate(m, ss).total <= budget:
                add(f"strategy: fsdp, nnodes: {n} ({n * s.nproc_per_node} processes)", m, ss)
            break
    return out


def plan_dict(
    m: Measured, s: Setup, est: Estimate, budget: Budget, sugg: list[Suggestion], **extra: Any
) -> dict[str, Any]:
    """What `kubetune plan --json` prints."""
    return {
        "model": {
            "description": m.description,
            "total_params": m.total_params,
            "trainable_params": m.trainable_params,
            "shape": asdict(m.shape),
        },
        "setup": asdict(s),
        "terms": est.terms,
        "notes": est.notes,
        "total": est.total,
        "budget": budget.bytes,
        "budget_source": budget.source,
        "fits": None if budget.bytes is None else est.total <= budget.bytes,
        "suggestions": [asdict(x) for x in sugg],
        **extra,
    }


def step_seconds(m: Measured, s: Setup, tflops: float) -> float:
    """Rough seconds per optimizer step at `tflops` achieved TFLOP/s per process: 6 FLOPs per token
    per trainable parameter, 4 per frozen one (forward and input gradients), 12 * L * h * seq for
    attention, 2 more per parameter for the recomputed forward under gradient checkpointing."""
    frozen = m.total_params - m.trainable_params
    per_token = 6 * m.trainable_params + 4 * frozen + 12 * m.shape.layers * m.shape.hidden * s.seq_length
    if s.gradient_checkpointing:
        per_token += 2 * m.total_params
    tokens = s.batch * s.seq_length * s.accumulation * (2 if methods.method(s.method).preference else 1)
    return tokens * per_token / (tflops * 1e12)


def render(plan: dict[str, Any]) -> str:
    """The text `kubetune plan` prints: a header, the table of terms, the verdict, suggestions."""
    s, model = plan["setup"], plan["model"]
    world = s["nnodes"] * s["nproc_per_node"]
    lines = [
        f"{plan['job']}: {model['description']}; {model['total_params'] / 1e9:.3g}B parameters, "
        f"{model['trainable_params'] / 1e6:.3g}M trainable; {s['nnodes']} node(s) x {s['nproc_per_node']} "
        f"process(es) ({world}, {s['strategy']})",
        "",
        "| term | per process | |",
        "|---|---:|---|",
    ]
    for name, n in plan["terms"].items():
        lines.append(f"| {name} | {show(n)} | {plan['notes'].get(name, '')} |")
    lines.append(f"| total | {show(plan['total'])} | |")
    lines.append("")
    budget = Budget(plan["budget"], plan["budget_source"])
    lines.append(verdict(plan["total"], budget))
    if "step_seconds" in plan:
        lines.append(
            f"step time: about {plan['step_seconds']:.3g} s at {plan['tflops']:g} TFLOP/s per process"
        )
    if plan["suggestions"]:
        lines.append("to make it fit, one change each:")
        for x in plan["suggestions"]:
            lines.append("  " + Suggestion(**x).line(plan["budget"]))
    return "\n".join(lines)


__all__ = [
    "Budget",
    "Estimate",
    "Measured",
    "ModelShape",
    "Setup",
    "Suggestion",
    "activation_bytes",
    "estimate",
    "gpu_memory_from_selector",
    "parse_memory",
    "plan_dict",
    "render",
    "step_seconds",
    "sharded_bytes",
    "suggestions",
    "verdict",
]
