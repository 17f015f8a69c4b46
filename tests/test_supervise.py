"""The pod entry wrapper: signal forwarding and the exit status that tells the operator 'preempted'."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from kubetune.conventions import EXIT_PREEMPTED, EXIT_USER_ERROR
from kubetune_trainer.supervise import exit_status

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    mode = sys.argv[1]
    def on_term(signum, frame):
        if mode == "commit":
            open(os.environ["KUBETUNE_PREEMPT_MARKER"], "w").write("x")
        sys.exit(1)  # torchrun reports a failure whatever its workers said
    signal.signal(signal.SIGTERM, on_term)
    print("timeout", os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"], flush=True)
    if mode.startswith("exit"):
        sys.exit(int(mode[4:]))
    if mode == "usererror":
        open(os.environ["KUBETUNE_USER_ERROR_MARKER"], "w").write("spec.model.uri: no such directory")
        sys.exit(1)  # torchrun's own code for any failed worker
    time.sleep(60)
    """
)


def supervise(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer.supervise", "--", sys.executable, "-c", CHILD, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(("code", "want"), [(0, 0), (3, 3)])
def test_exit_status_passes_through(code, want):
    p = supervise(f"exit{code}")
    out, _ = p.communicate(timeout=60)
    assert p.returncode == want
    assert "timeout 35" in out  # default grace 25 s + 10


@pytest.mark.parametrize(("mode", "want"), [("commit", EXIT_PREEMPTED), ("nocommit", 1)])
def test_sigterm_is_forwarded_and_a_committed_save_exits_preempted(mode, want):
    p = supervise(mode)
    assert p.stdout is not None
    assert p.stdout.readline().startswith("timeout")  # the child runs and has its handler
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == want, err
    assert f"exit {want}" in err


def test_grace_comes_from_the_job(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        textwrap.dedent(
            """
            apiVersion: kubetune.io/v1alpha1
            kind: FineTuneJob
            metadata: {name: g}
            spec:
              model: {uri: /m}
              dataset: {uri: /d.json}
              output: {uri: /o}
              checkpoint: {sigterm_grace_seconds: 40}
            """
        )
    )
    p = supervise("exit0", "--config", str(job))
    out, _ = p.communicate(timeout=60)
    assert "timeout 50" in out


def test_a_user_error_passes_through_as_65_with_its_reason():
    p = supervise("usererror")
    _, err = p.communicate(timeout=60)
    assert p.returncode == EXIT_USER_ERROR
    assert "user error: spec.model.uri: no such directory; exit 65" in err


def test_exit_status_rules():
    assert exit_status(0, True) == 0  # finished anyway
    assert exit_status(1, True) == EXIT_PREEMPTED
    assert exit_status(-9, False) == 137
    assert exit_status(2, False) == 2
    assert exit_status(1, True, user_error=True) == EXIT_USER_ERROR  # retrying cannot help
