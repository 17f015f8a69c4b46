"""One writer per output, and a `kubetune run` whose processes die with it.

The lease (`<output>/LEASE`) against the real stores (SeaweedFS for s3://, a directory for
file://), then whole `kubetune run` process trees: a second writer is refused in one line while
the first trains, a SIGKILL of `kubetune run` takes its worker (and torchrun, with several processes) down with it, and a
relaunch takes the dead holder's lease over at once and resumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune.conventions import EXIT_USER_ERROR
from kubetune_trainer.lease import (
    DEFAULT_LEASE_SECONDS,
    LEASE_FILE,
    Lease,
    LeaseHeld,
    LeaseRecord,
    lease_seconds,
)
from tests.fixtures_cli import alive, cli_env, kubetune, process_tree, start_kubetune, step_delay_env
from tests.fixtures_train import write_job_file

BACKENDS = ["file", "s3"]


@pytest.fixture(params=BACKENDS)
def output(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """(output URI, its store, extra env for subprocesses, spec.storage or None) per backend."""
    if request.param == "file":
        from kubetune_trainer.store import open_store

        uri = str(tmp_path / "out")
        return uri, open_store(uri), {}, None
    s3 = request.getfixturevalue("s3")
    return s3.uri("jobs/w"), s3.store("jobs/w"), s3.env, {"s3": {"endpoint": s3.endpoint}}


# ---------------------------------------------------------------- the lease itself


def test_the_lease_lasts_60_seconds_unless_the_environment_shortens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer.store import open_store

    monkeypatch.delenv("KUBETUNE_LEASE_SECONDS", raising=False)
    assert lease_seconds() == DEFAULT_LEASE_SECONDS == 60
    lease = Lease.acquire(open_store(str(tmp_path)), job="w", renew=False)
    assert lease.record.expires_at - lease.record.renewed_at == 60
    monkeypatch.setenv("KUBETUNE_LEASE_SECONDS", "5")
    assert lease_seconds() == 5


def test_of_concurrent_writers_exactly_one_gets_the_lease(output: Any) -> None:
    _, store, _, _ = output
    won: list[Lease] = []
    refused: list[str] = []
    start = threading.Barrier(6)

    def writer() -> None:
        start.wait()
        try:
            won.append(Lease.acquire(store, job="w", renew=False))
        except LeaseHeld as e:
            refused.append(str(e))

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert all("another run is writing this output (job w attempt 0" in r for r in refused)


def test_a_later_attempt_takes_over_at_once_and_the_earlier_one_learns_it_lost(output: Any) -> None:
    _, store, _, _ = output
    first = Lease.acquire(store, job="w", attempt=1, renew=False)
    with pytest.raises(LeaseHeld):  # the same attempt twice: a duplicated pod
        Lease.acquire(store, job="w", attempt=1, renew=False)
    second = Lease.acquire(store, job="w", attempt=2, renew=False)
    assert second.took_over is not None and "attempt 2 replaces attempt 1" in second.took_over
    assert first.renew() is False
    assert first.lost is not None and "now held by job w attempt 2" in first.lost
    assert second.renew() is True
    first.release()  # never releases someone else's lease
    assert LeaseRecord.from_json(store.get_bytes(LEASE_FILE)).attempt == 2


def test_a_holder_on_another_host_is_waited_for_until_its_lease_expires(output: Any) -> None:
    _, store, _, _ = output
    now = time.time()
    other = dict(
        job="w", attempt=0, host="elsewhere", boot_id="b", pid_ns="p", pid=1, pid_start="1", run_id="r",
        acquired_at=now, renewed_at=now, expires_at=now + 45,
    )  # fmt: skip
    store.put_bytes(LEASE_FILE, LeaseRecord(**other).to_json())
    with pytest.raises(LeaseHeld) as e:
        Lease.acquire(store, job="w", renew=False)
    assert "pid 1 on elsewhere" in str(e.value) and "valid until 20" in str(e.value)
    store.put_bytes(LEASE_FILE, LeaseRecord(**{**other, "expires_at": now - 1}).to_json())
    lease = Lease.acquire(store, job="w", renew=False)
    assert lease.took_over is not None and "expired" in lease.took_over


def test_a_released_lease_is_free_and_renewing_moves_the_expiry(output: Any) -> None:
    _, store, _, _ = output
    lease = Lease.acquire(store, job="w", renew=False, seconds=60)
    before = lease.record.expires_at
    assert lease.renew() and lease.record.expires_at >= before
    assert LeaseRecord.from_json(store.get_bytes(LEASE_FILE)).expires_at == lease.record.expires_at
    lease.release()
    assert LeaseRecord.from_json(store.get_bytes(LEASE_FILE)).released
    again = Lease.acquire(store, job="w", renew=False)
    assert again.took_over is None


# ---------------------------------------------------------------- whole `kubetune run` trees


def _committed(store: Any) -> list[str]:
    return [k for k in store.list("checkpoints/") if k.endswith("/COMMITTED")]


def _wait(what: str, cond: Any, timeout: float, proc: Any = None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}:\n{proc.log_text()[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(
                f"timed out waiting for {what}" + (f":\n{proc.log_text()[-3000:]}" if proc else "")
            )
        time.sleep(0.2)


def test_a_second_writer_is_refused_and_kill_9_of_kubetune_run_ends_the_tree_and_frees_the_output(
    output: Any, train_job: Any, tmp_path: Path
) -> None:
    uri, store, extra_env, storage = output
    job = write_job_file(
        train_job(uri, name="w", training={"max_steps": 30}), tmp_path / "job.yaml",
        checkpoint={"every_steps": 2}, storage=storage,
    )  # fmt: skip
    env = cli_env(tmp_path, **extra_env)
    first = start_kubetune(
        "run",
        str(job),
        cwd=tmp_path,
        env=step_delay_env(2, env),
        log=tmp_path / "first.log",
    )
    try:
        _wait("a committed checkpoint", lambda: _committed(store), 300, first)

        second = kubetune("run", str(job), cwd=tmp_path, env=env, timeout=300)
        assert second.returncode == EXIT_USER_ERROR, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("kubetune run: error: spec.output.uri ")
        assert "another run is writing this output (job w attempt 0, pid " in last
        assert f"on {socket.gethostname()}" in last and "valid until 20" in last
        assert "Traceback" not in second.stderr and "ChildFailedError" not in second.stderr
        log = Path(last.rsplit("full log: ", 1)[1].rstrip(")"))
        assert "kubetune: error: spec.output.uri " in log.read_text()  # all the trainer said is kept there

        assert first.poll() is None, "the first writer must still be training"
        tree = process_tree(first.pid)
        assert len(tree) >= 1, "the worker (one process: kubetune run starts it without torchrun)"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        _wait("the worker to die with kubetune run", lambda: alive(tree) == [], 30)
    finally:
        for p in [first.pid, *process_tree(first.pid)]:
            with_suppressed_kill(p)
    steps = sorted(_committed(store))
    lease = json.loads(store.get_bytes(LEASE_FILE))
    assert not lease["released"]  # killed: nobody released it

    third = kubetune("run", str(job), cwd=tmp_path, env=env, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "took over the lease" in third.stderr and "(its process is gone)" in third.stderr
    resumed = int(steps[-1].split("/")[1].split("-")[1])
    assert f"resuming from {uri.rstrip('/')}/checkpoints/step-{resumed:08d}" in third.stderr
    assert "kubetune: done: 30 steps" in third.stderr
    assert json.loads(store.get_bytes(LEASE_FILE))["released"]


def with_suppressed_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_second_ctrl_c_stops_the_whole_tree_at_once(train_job: Any, tmp_path: Path) -> None:
    job = write_job_file(
        train_job(tmp_path / "out", name="c", training={"max_steps": 200}), tmp_path / "job.yaml",
        checkpoint={"every_steps": 2, "sigterm_grace_seconds": 60},
    )  # fmt: skip
    env = step_delay_env(1, cli_env(tmp_path))
    run = start_kubetune("run", str(job), cwd=tmp_path, env=env, log=tmp_path / "run.log")
    try:
        _wait("training", lambda: "step 2/200" in run.log_text(), 300, run)
        tree = process_tree(run.pid)
        os.killpg(run.pid, signal.SIGINT)  # what a terminal does: the foreground group
        _wait("the first Ctrl-C to be passed on", lambda: "Ctrl-C again" in run.log_text(), 30, run)
        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=30) == 130
        _wait("the tree to be gone", lambda: alive(tree) == [], 30)
    finally:
        for p in [run.pid, *process_tree(run.pid)]:
            with_suppressed_kill(p)
    assert run.log_text().strip().splitlines()[-1].startswith("kubetune run: stopped at once (second Ctrl-C)")
