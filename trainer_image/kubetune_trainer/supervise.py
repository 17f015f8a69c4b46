"""The trainer pod's entry command: ``python -m kubetune_trainer.supervise -- torchrun ...``.

torchrun does not pass a worker's exit status through: a gang that stopped on SIGTERM after
committing a checkpoint (workers exit 75) leaves torchrun with its own failure code. This wrapper

- runs the command after ``--`` as a child, with $KUBETUNE_PREEMPT_MARKER naming a fresh file
  that the trainer writes once a preemption checkpoint is committed (resilience.py), and
  $KUBETUNE_USER_ERROR_MARKER one it writes its one-line reason to on a user error (__main__.py);
- forwards SIGTERM, SIGINT and SIGHUP to it (the kubelet signals only the container's PID 1);
- gives torchrun time to let its workers save: sets TORCH_ELASTIC_SHUTDOWN_TIMEOUT (how long
  torchrun waits for workers after forwarding SIGTERM before SIGKILL) to the job's
  checkpoint.sigterm_grace_seconds + 10 unless already set;
- makes in-pod worker restarts reliable: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless set (see main);
- reaps orphans (it may run as PID 1);
- exits 0 when the child did, EXIT_USER_ERROR (65: bad spec, data or credentials; retrying
  cannot help) when it failed and the user-error marker is there, EXIT_PREEMPTED (75,
  "preempted, resumable") when it failed and the preemption marker is there, else the child's
  status (128 + N for a signal N).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from kubetune.conventions import ENV_PREEMPT_MARKER, ENV_USER_ERROR_MARKER, EXIT_PREEMPTED, EXIT_USER_ERROR

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_DEFAULT_GRACE = 25


def _grace_seconds(cmd: list[str]) -> int:
    """checkpoint.sigterm_grace_seconds of the job the command names with --config (default 25)."""
    for i, arg in enumerate(cmd):
        path = cmd[i + 1] if arg == "--config" and i + 1 < len(cmd) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path:
            try:
                from kubetune.validate import load_job

                return load_job(path).spec.checkpoint.sigterm_grace_seconds
            except Exception:  # the trainer reports a bad file itself
                return _DEFAULT_GRACE
    return _DEFAULT_GRACE


def exit_status(returncode: int, preempted: bool, user_error: bool = False) -> int:
    if returncode == 0:
        return 0
    if user_error:
        return EXIT_USER_ERROR
    if preempted:
        return EXIT_PREEMPTED
    return 128 - returncode if returncode < 0 else returncode


class Markers:
    """The files a trainer gang leaves for whoever started torchrun (this wrapper, `kubetune run`)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kubetune-supervise-"))
        self.preempt = self.dir / "preempted"
        self.user_error = self.dir / "user-error"

    def child_env(self, cmd: list[str], env: dict[str, str]) -> dict[str, str]:
        env = dict(env)
        env[ENV_PREEMPT_MARKER] = str(self.preempt)
        env[ENV_USER_ERROR_MARKER] = str(self.user_error)
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(_grace_seconds(cmd) + 10))
        return env

    def read(self) -> tuple[bool, str | None]:
        """(preempted, the user error's one-line reason or None), and the files are removed."""
        preempted = self.preempt.exists()
        reason = None
        if self.user_error.exists():
            reason = self.user_error.read_text(encoding="utf-8", errors="replace").strip() or "user error"
        for f in (self.preempt, self.user_error):
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass
        return preempted, reason


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m kubetune_trainer.supervise -- torchrun ARGS..."
    if args[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__.splitlines()[2]}")
        return 0
    if "--" in args:
        args = args[args.index("--") + 1 :]
    if not args:
        print(usage, file=sys.stderr)
        return 2
    markers = Markers()
    env = markers.child_env(args, dict(os.environ))
    # Workers restarted by torchrun --max-restarts often failed to connect gloo ("connectFullMesh
    # failed ... Connection refused": stale addresses in the rendezvous store the agent shares with
    # its workers) and could then hang; with a fresh store per worker group (hosted by rank 0 at
    # MASTER_ADDR = its pod FQDN, a free port) restarts connected every time in our tests.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")

    child = subprocess.Popen(args, env=env)
    got: list[int] = []

    def forward(signum: int, frame: object) -> None:
        got.append(signum)
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    status = _wait(child.pid)
    child.returncode = status
    preempted, user_error = markers.read()
    code = exit_status(status, preempted, user_error is not None)
    if got or preempted or (user_error and status):
        print(
            f"kubetune supervise: {args[0]} exited {status}"
            + (f"; user error: {user_error}" if user_error and status else "")
            + ("; a preemption checkpoint was committed" if preempted else "")
            + f"; exit {code}",
            file=sys.stderr,
            flush=True,
        )
    return code


def _wait(pid: int) -> int:
    """Wait for `pid`, reaping any other child (orphans re-parented to us as PID 1) meanwhile."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        if done == pid:
            return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
