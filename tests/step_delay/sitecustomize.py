"""Test-only plugin: every training step sleeps $KUBETUNE_TEST_STEP_DELAY seconds, so a kill lands
mid-training. Python imports this module at start-up in processes that have this directory on
PYTHONPATH (tests.fixtures_cli.step_delay_env sets both): the trainer's torchrun workers, the
kubelet stand-in's pods. Once transformers.trainer is imported, tests.callbacks.StepDelay joins its
DEFAULT_CALLBACKS (every Trainer, TRL's included, runs it first); the product has no such hook."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

_REPO = str(Path(__file__).resolve().parents[2])


class _AfterTrainerImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)  # once; and find the real module below without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            if _REPO not in sys.path:
                sys.path.append(_REPO)
            from tests.callbacks import StepDelay

            module.DEFAULT_CALLBACKS.append(StepDelay)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if float(os.environ.get("KUBETUNE_TEST_STEP_DELAY") or 0) > 0:
    sys.meta_path.insert(0, _AfterTrainerImport())
