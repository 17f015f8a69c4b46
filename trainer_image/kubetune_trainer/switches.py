"""Whether this machine can run the job's kernel and memory switches, asked before anything heavy.

- ``training.attn_implementation``: ``flash_attention_2`` needs a CUDA GPU, the flash-attn package
  (transformers' ``is_flash_attn_2_available``) and bf16/fp16 weights; ``flex_attention`` a torch
  that has ``torch.nn.attention.flex_attention`` (transformers' ``is_torch_flex_attn_available``)
  and a CUDA GPU (FlexAttention has no backward pass on CPU).
- ``training.liger_kernel``: Liger's kernels are Triton kernels for CUDA GPUs and need the
  liger-kernel package (transformers' ``is_liger_kernel_available``).
- ``training.gradient_checkpointing: offload``: transformers keeps the checkpointed layers' saved
  inputs in pinned host memory (torch ``save_on_cpu``); that frees GPU memory, and on a CPU there
  is nothing to free (the activations are in host memory already), so it is refused there.

:func:`check_switches` raises one :class:`JobError` line per job, naming the field, what is
missing here and what to set instead; ``kubetune run`` calls it before torchrun starts and the
trainer before it loads the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kubetune_trainer.errors import JobError

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.model_loading import Precision


def attn_implementation_problem(name: str, precision: Precision) -> str | None:
    """Why `training.attn_implementation` `name` cannot run here, or None."""
    if name not in ("flash_attention_2", "flex_attention"):
        return None  # without importing transformers: kubetune run asks this before its trainer starts
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    field = f"training.attn_implementation {name}"
    if name == "flash_attention_2":
        missing = []
        if precision.device_type != "cuda":
            missing.append(f"this machine has no CUDA GPU (it trains on {precision.device_type})")
        if not is_flash_attn_2_available():
            missing.append("the flash-attn package is not installed (pip install flash-attn)")
        if missing:
            return f"{field} needs a CUDA GPU and the flash-attn package: {'; '.join(missing)}; use sdpa"
        if precision.name == "fp32":
            return f"{field} runs in bf16 or fp16 only: set training.precision bf16, or use sdpa"
    if name == "flex_attention":
        if not is_torch_flex_attn_available():
            import torch

            return f"{field} needs torch's flex_attention (torch >= 2.5), this is torch {torch.__version__}; use sdpa"
        if precision.device_type != "cuda":
            return (
                f"{field} trains on CUDA GPUs only (torch's FlexAttention has no backward pass on "
                f"{precision.device_type}); use sdpa"
            )
    return None


def liger_kernel_problem(precision: Precision) -> str | None:
    """Why `training.liger_kernel` cannot run here, or None."""
    from transformers.utils import is_liger_kernel_available

    missing = []
    if precision.device_type != "cuda":
        missing.append(
            f"this machine has no CUDA GPU for its Triton kernels (it trains on {precision.device_type})"
        )
    if not is_liger_kernel_available():
        missing.append("the liger-kernel package is not installed (pip install liger-kernel)")
    if not missing:
        return None
    return f"training.liger_kernel needs a CUDA GPU and the liger-kernel package: {'; '.join(missing)}; set it to false"


def offload_problem(precision: Precision) -> str | None:
    """Why `training.gradient_checkpointing: offload` cannot run here, or None."""
    if precision.device_type == "cuda":
        return None
    return (
        "training.gradient_checkpointing offload moves saved activations from the GPU to host memory; this "
        f"machine trains on {precision.device_type}, where they are in host memory already: use true"
    )


def switch_problems(spec: FineTuneJobSpec, precision: Precision) -> list[str]:
    """One line per switch of `spec.training` this machine cannot run."""
    t = spec.training
    problems = [attn_implementation_problem(t.attn_implementation, precision)]
    if t.liger_kernel:
        problems.append(liger_kernel_problem(precision))
    if t.gradient_checkpointing == "offload":
        problems.append(offload_problem(precision))
    return [p for p in problems if p]


def check_switches(spec: FineTuneJobSpec, precision: Precision) -> None:
    """A JobError (the problems on one line) where this machine cannot run the job's switches."""
    problems = switch_problems(spec, precision)
    if problems:
        raise JobError("; and ".join(problems))


__all__ = [
    "attn_implementation_problem", "check_switches", "liger_kernel_problem", "offload_problem", "switch_problems",
]  # fmt: skip
