"""``parallel_config.strategy: fsdp``: FSDP2 through the Trainer, on GPUs and on CPU (gloo) alike.

The Trainer's FSDP goes through accelerate, which turns its FSDP plugin on only for accelerator
types (MULTI_GPU, MULTI_XPU, ...), never for MULTI_CPU. PyTorch's FSDP2 (`fully_shard`) and
torch.distributed.checkpoint run on CPU over gloo as they do on GPUs over NCCL, so on a CPU gang
`enable_on_cpu` (called by trainer_class.py) switches accelerate's state to FSDP after the Trainer
built its Accelerator: the same code path (`fully_shard` per decoder layer, DCP sharded saves and
loads) then runs on both.

Checkpoints are sharded (SHARDED_STATE_DICT): every rank writes its own shard of the weights
(``pytorch_model_fsdp_0/__<rank>_0.distcp``) and of the optimizer state (``optimizer_0/``), and
rank 0 the ``.metadata`` that maps them; no rank ever holds the full state to save it. The final
export gathers a full state dict once (`Accelerator.get_state_dict`).
"""

from __future__ import annotations

from typing import Any

MODEL_DIR = "pytorch_model_fsdp_0"
OPTIMIZER_DIR = "optimizer_0"


def fsdp_config(*, activation_checkpointing: bool) -> dict[str, Any]:
    """TrainingArguments.fsdp_config: FSDP2, one shard unit per decoder layer (_no_split_modules)."""
    return {
        "version": 2,
        "state_dict_type": "SHARDED_STATE_DICT",
        "activation_checkpointing": activation_checkpointing,
    }


def enable_on_cpu(trainer: Any) -> bool:
    """Switch a CPU gang's Accelerator to FSDP when the arguments ask for it; True if it did."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin_args = trainer.args.fsdp_plugin_args
    state = trainer.accelerator.state
    if plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # what accelerate itself records for a GPU FSDP gang: every AcceleratorState made later in this
    # process copies distributed_type from PartialState's shared state
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


__all__ = ["MODEL_DIR", "OPTIMIZER_DIR", "enable_on_cpu", "fsdp_config"]
