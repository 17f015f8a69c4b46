"""Running the real `kubetune` command (the installed console script) the way users do.

- `kubetune(*args, cwd=..., env=..., timeout=...)`: run it to the end; a CompletedProcess (text).
- `start_kubetune(*args, ...)`: start it in the background (its own session, so a test can kill
  it alone), output to a log file; `.log_text()` reads what it printed so far.
- `process_tree(pid)`: every live descendant of a process, found through /proc (torchrun starts
  its workers in sessions of their own, so process groups do not find them).
- `cli_env(tmp)`: the environment for a run that keeps its caches under `tmp`.
- `step_delay_env(seconds, env)`: `env` for processes whose training steps each take `seconds` longer
  (tests/step_delay/sitecustomize.py), so a kill lands mid-training.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

KUBETUNE = str(Path(sys.executable).parent / "kubetune")


def cli_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, KUBETUNE_CACHE_DIR=str(tmp / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KUBETUNE_ATTEMPT"):
        env.pop(k, None)
    env.update(extra)
    return env


STEP_DELAY_DIR = str(Path(__file__).resolve().parent / "step_delay")


def step_delay_env(seconds: float, env: dict[str, str] | None = None) -> dict[str, str]:
    """What to add to (or set in) a process environment so that every training step sleeps `seconds`."""
    base = dict(env or {})
    path = base.get("PYTHONPATH", os.environ.get("PYTHONPATH", "") if env is None else "")
    base["PYTHONPATH"] = os.pathsep.join(p for p in (STEP_DELAY_DIR, path) if p)
    base["KUBETUNE_TEST_STEP_DELAY"] = str(seconds)
    return base


def kubetune(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KUBETUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


class Background(subprocess.Popen):
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_kubetune(*args: str, cwd: Path, env: dict[str, str], log: Path) -> Background:
    with open(log, "wb") as out:
        p = Background(
            [KUBETUNE, *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    p.log_path = log
    return p


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # exited, not yet reaped: not running anything
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    """The live descendants of `pid` (not `pid` itself)."""
    kids = _children()
    out, todo = [], list(kids.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return sorted(out)


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out
