"""kubetune's Trainer: transformers' Trainer (or TRL's DPOTrainer) with two fixes that resume needs.

- strategy fsdp shards on CPU gangs too (fsdp.enable_on_cpu);
- a run resumed at its last step (the final checkpoint of a pod lost during export) stops there:
  the Trainer only checks max_steps after a step, so it would train one step past the end.
"""

from __future__ import annotations

from typing import Any, TypeVar

from kubetune_trainer.fsdp import enable_on_cpu

T = TypeVar("T", bound=type)


def kubetune_trainer(base: T) -> T:
    """A subclass of `base` (a transformers Trainer class) with the fixes above."""

    class KubetuneTrainer(base):  # type: ignore[misc, valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            enable_on_cpu(self)

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

    KubetuneTrainer.__name__ = KubetuneTrainer.__qualname__ = base.__name__
    return KubetuneTrainer  # type: ignore[return-value]


__all__ = ["kubetune_trainer"]
