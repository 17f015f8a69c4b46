"""Processes that die with their parent: `kubetune run` -> torchrun -> trainer workers.

torchrun starts every worker in a session of its own, and a SIGKILL gives nobody the chance to
forward anything, so neither signals to a process group nor handlers can stop the tree when
`kubetune run` is killed. The kernel can: PR_SET_PDEATHSIG (Linux) delivers a signal to a
process the moment its parent dies, however it died, with nothing to poll. torchrun's agent
(started by `kubetune run` through `launch`'s agent entry) and every worker (started by the
agent from its main thread: the death signal follows the thread that forked) arm it for
themselves at start, and check that the parent did not die before they did. A pipe the child
watches would need torchrun to pass the descriptor on (it closes them) and a reader in every
process; where prctl is missing (macOS) a thread that watches getppid() stands in.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int = signal.SIGKILL, expected_parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent dies (now: if it already did)."""
    parent = os.getppid() if expected_parent is None else expected_parent
    if _prctl_pdeathsig(sig):
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os.kill(os.getpid(), sig)
        return
    _watch_parent(parent, lambda: os.kill(os.getpid(), sig))


def _watch_parent(parent: int, act: Callable[[], None]) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        act()

    threading.Thread(target=watch, name="kubetune-parent-watch", daemon=True).start()


__all__ = ["die_with_parent"]
