"""What a start of the trainer costs before it trains: one line at the first step of every start.

    startup: first step (step 11) 9.8 s after this process started, 12.1 s after kubetune run did;
    RSS before training 612 MiB (peak 640 MiB)

Logged by rank 0 from a transformers ``TrainerCallback`` (:func:`startup_callback`, added by
``__main__.run_job``): the worker's age comes from the kernel's record of when the process started
(``/proc``), the launcher's from ``$KUBETUNE_LAUNCHED_AT`` (set by ``kubetune run``); the memory is
the resident set when training begins, after the model, the data and the trainer are built.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("kubetune.startup")

ENV_LAUNCHED_AT = "KUBETUNE_LAUNCHED_AT"  # time.time() when `kubetune run` started


def process_started_at() -> float | None:
    """When this process started (epoch seconds), from /proc; None where /proc does not say."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
        btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def memory_mib() -> tuple[float | None, float | None]:
    """(resident set now, its peak) of this process in MiB, from /proc/self/status."""
    values: dict[str, float] = {}
    try:
        for line in open("/proc/self/status"):
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError):
        pass
    return values.get("VmRSS"), values.get("VmHWM")


def describe(step: int, now: float, started: float | None, launched: float | None, rss: tuple) -> str:
    parts = [f"startup: first step (step {step})"]
    if started is not None:
        parts.append(f" {now - started:.1f} s after this process started")
    if launched is not None:
        parts.append(f", {now - launched:.1f} s after kubetune run did")
    now_rss, peak = rss
    if now_rss is not None:
        parts.append(f"; RSS before training {now_rss:.0f} MiB (peak {peak:.0f} MiB)")
    return "".join(parts)


def startup_callback() -> Any:
    """A TrainerCallback that logs :func:`describe` once, at the first step this process trains."""
    from transformers import TrainerCallback

    class StartupReport(TrainerCallback):
        def __init__(self) -> None:
            self.rss: tuple = (None, None)
            self.done = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.rss = memory_mib()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.done or not state.is_world_process_zero:
                return
            self.done = True
            launched = os.environ.get(ENV_LAUNCHED_AT)
            log.info(
                "%s",
                describe(
                    state.global_step, time.time(), process_started_at(),
                    float(launched) if launched else None, self.rss,
                ),
            )  # fmt: skip

    return StartupReport()


__all__ = ["ENV_LAUNCHED_AT", "describe", "memory_mib", "process_started_at", "startup_callback"]
