"""Trainer callbacks the training tests share (a module of its own: importing transformers is slow,
and the fixtures modules load for every test)."""

from __future__ import annotations

import os
import time
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


class StepDelay(TrainerCallback):
    """Sleep $KUBETUNE_TEST_STEP_DELAY seconds after every step (tests/step_delay/sitecustomize.py adds
    it to every Trainer of a process started with tests.fixtures_cli.step_delay_env)."""

    def __init__(self) -> None:
        self.seconds = float(os.environ.get("KUBETUNE_TEST_STEP_DELAY") or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        time.sleep(self.seconds)
        return control
