"""Trainer callbacks the training tests share (a module of its own: importing transformers is slow,
and the fixtures modules load for every test)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class StopAt(TrainerCallback):
    """Save and stop at `step`, as a preempted run does (the rest of the run is a resume)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control
