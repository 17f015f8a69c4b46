"""The trainer survives failure, end to end: torchrun gangs (gloo on CPU), a real S3 server, a tiny model.

Every run is the real pod command, `python -m kubetune_trainer.supervise -- torchrun ... -m
kubetune_trainer --config job.yaml`, with checkpoints and output in SeaweedFS. A relaunch gets a
fresh KUBETUNE_CACHE_DIR (a new pod: nothing local survives), so it can only resume from S3.
Steps are slowed (tests.fixtures_cli.step_delay_env) so that a kill lands mid-training.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.conventions import EXIT_PREEMPTED, EXIT_USER_ERROR
from kubetune_trainer import checkpoints as ck
from tests.fixtures_cli import step_delay_env
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 16
EVERY = 4
STEP_DELAY = 0.25
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, num_layers=2)


class Env:
    """Paths, bucket and helpers shared by the runs of one test."""

    def __init__(self, server: Any, bucket: str, tmp: Path, model: Path) -> None:
        self.server, self.bucket, self.tmp, self.model = server, bucket, tmp, model
        self.launches = 0

    def uri(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"

    def store(self, path: str) -> Any:
        from kubetune_trainer.store import open_store

        creds = {"aws_access_key_id": self.server.env["AWS_ACCESS_KEY_ID"],
                 "aws_secret_access_key": self.server.env["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
        return open_store(self.uri(path), self.server.settings(), credentials=creds)

    def job(
        self, name: str, *, max_steps: int = MAX_STEPS, endpoint: str | None = None, **checkpoint: Any
    ) -> Path:
        doc = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"uri": str(self.model)},
                "dataset": {
                    "uri": str(Path(__file__).resolve().parents[1] / "examples/data/alpaca_en_200.json"),
                    "format": "alpaca",
                },
                "pet_config": {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.1},
                "training": {
                    "learning_rate": 3e-3,
                    "max_steps": max_steps,
                    "per_device_train_batch_size": 2,
                    "seq_length": 128,
                    "precision": "fp32",
                    "logging_steps": 1,
                },
                "checkpoint": {"every_steps": EVERY, "keep_last": 2, **checkpoint},
                "storage": {"s3": {"endpoint": endpoint or self.server.endpoint}},
                "output": {"uri": self.uri(f"jobs/{name}")},
            },
        }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def launch(
        self,
        config: Path,
        *,
        nproc: int = 2,
        nnodes: int = 1,
        node_rank: int = 0,
        rdzv_port: int | None = None,
        delay: float = STEP_DELAY,
        cache: str | None = None,
        max_restarts: int = 0,
    ) -> subprocess.Popen:
        """Start one 'pod': supervise -> torchrun -> trainer processes."""
        self.launches += 1
        cache_dir = self.tmp / (cache or f"pod-{self.launches}")
        env = dict(os.environ)
        env.update(self.server.env)
        env.update(
            {
                "KUBETUNE_CACHE_DIR": str(cache_dir),
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env = step_delay_env(delay, env) if delay else env
        cmd = [
            sys.executable,
            "-m",
            "kubetune_trainer.supervise",
            "--",
            sys.executable,
            "-m",
            "torch.distributed.run",
        ]
        if nnodes == 1:
            cmd += ["--standalone", "--nproc-per-node", str(nproc)]
        else:
            cmd += [
                "--nnodes", str(nnodes), "--nproc-per-node", str(nproc), "--node-rank", str(node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}",
                "--rdzv-id", f"test-{rdzv_port}",
            ]  # fmt: skip
        cmd += ["--max-restarts", str(max_restarts), "-m", "kubetune_trainer", "--config", str(config)]
        log = open(self.tmp / f"launch-{self.launches}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        p.log_path = log.name  # type: ignore[attr-defined]
        return p


def wait(p: subprocess.Popen, timeout: float = 240) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p.pid)
        raise AssertionError(f"run did not finish in {timeout}s:\n{tail(p)}") from None


def tail(p: subprocess.Popen, n: int = 60) -> str:
    lines = Path(p.log_path).read_text(errors="replace").splitlines()  # type: ignore[attr-defined]
    return "\n".join(lines[-n:])


def kill_tree(pid: int) -> None:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def worker_pids(p: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the trainer processes under a launch."""
    import psutil

    out = {}
    for child in psutil.Process(p.pid).children(recursive=True):
        try:
            environ = child.environ()
            if "RANK" in environ and "kubetune_trainer" in " ".join(child.cmdline()):
                out[int(environ["RANK"])] = child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def wait_until(predicate: Any, timeout: float, what: str, procs: tuple = ()) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"run ended (rc {p.returncode}) before {what}:\n{tail(p)}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def committed_steps(env: Env, name: str) -> list[int]:
    return [c.step for c in ck.list_committed(env.store(f"jobs/{name}/checkpoints"))]


def progress(env: Env, name: str) -> dict:
    return json.loads(env.store(f"jobs/{name}").get_bytes("progress.json"))


def step_losses(env: Env, name: str) -> dict[int, float]:
    """Per-step training loss of a finished job, from its last committed checkpoint's trainer_state."""
    store = env.store(f"jobs/{name}/checkpoints")
    last = ck.latest_committed(store)
    assert last is not None
    state = json.loads(store.get_bytes(f"{last.name}/trainer_state.json"))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def final_weights(env: Env, name: str) -> dict[str, Any]:
    from safetensors.torch import load

    return load(env.store(f"jobs/{name}").get_bytes("final/adapter/adapter_model.safetensors"))


def assert_same_run(env: Env, name: str, ref: str, after_step: int) -> None:
    got, want = step_losses(env, name), step_losses(env, ref)
    assert sorted(got) == list(range(1, MAX_STEPS + 1)) == sorted(want)
    resumed = [s for s in got if s > after_step]
    assert resumed, "nothing was trained after the resume point"
    for s in resumed:
        assert abs(got[s] - want[s]) <= REL_TOL * abs(want[s]), (s, got[s], want[s])
    import torch

    a, b = final_weights(env, name), final_weights(env, ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k


def relaunch_until_done(env: Env, config: Path, tries: int = 3, **kw: Any) -> subprocess.Popen:
    """Relaunch like the operator does; a gloo start-up hiccup (see ENVIRONMENT.md) gets another try."""
    for _ in range(tries):
        p = env.launch(config, **kw)
        if wait(p) == 0:
            return p
        if "connectFullMesh" not in tail(p, 400) and "Connection refused" not in tail(p, 400):
            raise AssertionError(f"relaunch failed (rc {p.returncode}):\n{tail(p)}")
    raise AssertionError(f"relaunch failed {tries} times:\n{tail(p)}")


def relaunch_gang_until_done(gang: Any, tries: int = 3) -> list[subprocess.Popen]:
    """Relaunch a multi-node gang (`gang()` starts every node) until all nodes exit 0; a rendezvous
    or gloo start-up hiccup gets another try."""
    for _ in range(tries):
        nodes = gang()
        if [wait(p) for p in nodes] == [0] * len(nodes):
            return nodes
        text = "\n".join(tail(p, 200) for p in nodes)
        assert "connectFullMesh" in text or "Connection refused" in text or "rendezvous" in text.lower(), text
    raise AssertionError(f"multi-node relaunch failed {tries} times")


@pytest.fixture(scope="module")
def ref_env(s3_server, tiny_model, tmp_path_factory) -> Env:
    """One uninterrupted 2-process run: the losses and weights every resumed run must reproduce."""
    env = Env(s3_server, s3_server.new_bucket(), tmp_path_factory.mktemp("ref"), tiny_model)
    p = relaunch_until_done(env, env.job("ref"), delay=0)
    assert "resumed_from" not in tail(p, 400) or progress(env, "ref")["resumed_from"] is None
    return env


@pytest.fixture
def env(ref_env, s3_server, tiny_model, tmp_path) -> Env:
    return Env(s3_server, ref_env.bucket, tmp_path, tiny_model)


def test_reference_run_commits_checkpoints_and_progress(ref_env):
    p = progress(ref_env, "ref")
    assert p["state"] == "done" and p["step"] == MAX_STEPS and p["total_steps"] == MAX_STEPS
    assert p["last_checkpoint"]["step"] == MAX_STEPS and p["world_size"] == 2
    assert committed_steps(ref_env, "ref") == [12, 16]  # keep_last 2; the last step is a checkpoint too
    m = ck.latest_committed(ref_env.store("jobs/ref/checkpoints")).manifest
    assert {
        "rng_state_0.pth",
        "rng_state_1.pth",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
    } <= set(m.files)
    assert "adapter_model.safetensors" in m.files and m.world_size == 2


def test_kill_9_one_rank_then_relaunch_resumes_exactly(env):
    config = env.job("kill")
    p = env.launch(config)
    wait_until(lambda: any(s >= 8 for s in committed_steps(env, "kill")), 120, "checkpoint step 8", (p,))
    pids = wait_until(lambda: worker_pids(p).get(1) and worker_pids(p), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    rc = wait(p)
    assert rc not in (0, EXIT_PREEMPTED), tail(p)
    assert max(committed_steps(env, "kill")) < MAX_STEPS
    p2 = relaunch_until_done(env, config)
    resumed = progress(env, "kill")["resumed_from"]
    assert resumed is not None and resumed["step"] >= 8, tail(p2)
    assert f"resuming from {resumed['uri']}" in tail(p2, 400)
    assert_same_run(env, "kill", "ref", resumed["step"])
    # the relaunch (a new pod) continued the job's metrics.jsonl from the store: one line per step
    rows = [json.loads(x) for x in env.store("jobs/kill").get_bytes("metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))


def test_kill_9_one_rank_torchrun_restarts_it_in_the_pod(env):
    """The fast path: torchrun --max-restarts restarts the workers, which resume from S3 themselves."""
    config = env.job("inpod")
    # a first restart sometimes fails to connect gloo (ENVIRONMENT.md): allow a second one
    p = env.launch(config, max_restarts=2)
    wait_until(lambda: any(s >= 8 for s in committed_steps(env, "inpod")), 120, "checkpoint step 8", (p,))
    pids = wait_until(lambda: worker_pids(p).get(1) and worker_pids(p), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    assert wait(p) == 0, tail(p)
    resumed = progress(env, "inpod")["resumed_from"]
    assert resumed is not None and resumed["step"] >= 8, tail(p)
    assert_same_run(env, "inpod", "ref", resumed["step"])


def test_two_nodes_kill_one_node_then_relaunch(env):
    config = env.job("nodes")

    def gang(port: int) -> list[subprocess.Popen]:
        return [
            env.launch(config, nproc=1, nnodes=2, node_rank=r, rdzv_port=port, cache=f"node{r}-{port}")
            for r in (0, 1)
        ]

    nodes = gang(free_port())
    wait_until(
        lambda: any(s >= 8 for s in committed_steps(env, "nodes")), 150, "checkpoint step 8", tuple(nodes)
    )
    # every rank's RNG state is in the checkpoint, though node 0 only has rank 0's on its disk
    latest = ck.latest_committed(env.store("jobs/nodes/checkpoints"))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(latest.manifest.files)
    # c10d rendezvous hands out ranks by arrival: kill the worker of whichever launch has global rank 1
    rank1 = wait_until(lambda: {**worker_pids(nodes[0]), **worker_pids(nodes[1])}.get(1), 10, "rank 1's pid")
    os.kill(rank1, signal.SIGKILL)
    for p in nodes:
        assert wait(p, 120) != 0
    relaunch_gang_until_done(lambda: gang(free_port()))
    resumed = progress(env, "nodes")["resumed_from"]
    assert resumed is not None and resumed["step"] >= 8
    assert_same_run(env, "nodes", "ref", resumed["step"])


def test_sigterm_saves_commits_within_grace_and_exits_preempted(env):
    grace = 15
    config = env.job("term", sigterm_grace_seconds=grace)
    p = env.launch(config)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "term")), 120, "checkpoint step 4", (p,))
    time.sleep(3 * STEP_DELAY)  # mid-way between checkpoints
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)  # what the kubelet does to the pod's PID 1
    rc = wait(p, 60)
    elapsed = time.monotonic() - t0
    assert rc == EXIT_PREEMPTED, tail(p)
    assert elapsed < grace, elapsed
    steps = committed_steps(env, "term")
    stop = max(steps)
    assert 4 < stop < MAX_STEPS, steps
    assert f"checkpoint step {stop} committed" in tail(p, 400)
    pr = progress(env, "term")
    assert pr["state"] == "preempted" and pr["last_checkpoint"]["step"] == stop
    relaunch_until_done(env, config)
    assert progress(env, "term")["resumed_from"]["step"] == stop
    assert_same_run(env, "term", "ref", stop)


def test_ctrl_c_saves_commits_says_so_and_a_rerun_resumes_exactly(env):
    config = env.job("ctrlc")
    p = env.launch(config)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "ctrlc")), 120, "checkpoint step 4", (p,))
    time.sleep(3 * STEP_DELAY)  # mid-way between checkpoints
    p.send_signal(signal.SIGINT)  # what Ctrl-C sends the foreground process; torchrun passes it on
    wait(p, 60)
    stop = max(committed_steps(env, "ctrlc"))
    assert 4 < stop < MAX_STEPS
    assert f"kubetune: interrupted: at step {stop}; checkpoint {stop} committed; run again to resume" in tail(
        p
    )
    assert "KeyboardInterrupt" not in tail(p, 400)
    relaunch_until_done(env, config)
    assert progress(env, "ctrlc")["resumed_from"]["step"] == stop
    assert_same_run(env, "ctrlc", "ref", stop)


def test_sigterm_when_the_commit_cannot_finish_exits_before_the_grace_ends(env, throttled_s3):
    """A link too slow for the SIGTERM checkpoint: the worker leaves by itself before the grace
    ends (torchrun would SIGKILL it later, the kubelet sooner), saying what was not committed."""
    grace = 10
    link = throttled_s3(0)  # full speed until the SIGTERM
    config = env.job("slowterm", endpoint=link.endpoint, sigterm_grace_seconds=grace)
    p = env.launch(config, nproc=1)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "slowterm")), 120, "checkpoint step 4", (p,))
    before = max(committed_steps(env, "slowterm"))
    link.proxy.rate = 2_000  # bytes/s: the next checkpoint takes minutes
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = wait(p, 60)
    elapsed = time.monotonic() - t0
    assert rc not in (0, EXIT_PREEMPTED), tail(p)  # nothing new committed: not "preempted, resumable"
    assert elapsed < grace, (elapsed, tail(p))
    text = tail(p, 400)
    assert "NOT committed; last committed checkpoint: " in text, text
    assert max(committed_steps(env, "slowterm")) == before  # what was committed is still there


def test_s3_down_ten_seconds_during_training(env):
    """Training carries on while S3 is unreachable; the upload is retried and commits afterwards."""
    config = env.job("outage", max_steps=MAX_STEPS)
    p = env.launch(config, delay=0.5)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "outage")), 120, "checkpoint step 4", (p,))
    env.server.proxy.pause()
    try:
        metrics = env.tmp / f"pod-{env.launches}" / "work" / "outage" / "output" / "metrics.jsonl"
        n0 = len(metrics.read_text().splitlines())
        time.sleep(10)
        n1 = len(metrics.read_text().splitlines())
        assert p.poll() is None, tail(p)
        assert n1 - n0 >= 5, (n0, n1)  # steps kept coming while the store was unreachable
    finally:
        env.server.proxy.resume()
    assert wait(p) == 0, tail(p)
    assert "retry" in tail(p, 600)
    steps = committed_steps(env, "outage")
    # saved during the outage: committed after it, unless a newer one was queued meanwhile (a failing
    # upload gives way to the newer checkpoint); the last one always commits
    assert steps[-1] == MAX_STEPS and len(steps) == 2, steps
    assert progress(env, "outage")["state"] == "done"


def test_resume_on_a_different_nproc_per_node(env):
    config = env.job("reshape")
    p = env.launch(config, nproc=2)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "reshape")), 120, "checkpoint step 4", (p,))
    kill_tree(p.pid)
    p.wait()
    p2 = relaunch_until_done(env, config, nproc=1, delay=0)
    resumed = progress(env, "reshape")["resumed_from"]
    assert resumed["step"] >= 4
    assert "written by 2 processes and this run has 1" in tail(p2, 400)
    assert progress(env, "reshape")["state"] == "done"
    assert max(committed_steps(env, "reshape")) == MAX_STEPS
    assert ck.latest_committed(env.store("jobs/reshape/checkpoints")).manifest.world_size == 1


def test_spec_change_is_refused_with_a_clear_message(env):
    env.job("spec")  # written so a first run has the same name
    config = env.job("spec", max_steps=4)
    assert wait(env.launch(config, nproc=1, delay=0)) == 0
    doc = yaml.safe_load(config.read_text())
    doc["spec"]["pet_config"]["lora_rank"] = 4  # changes what a checkpoint means
    config.write_text(yaml.safe_dump(doc))
    p = env.launch(config, nproc=1, delay=0)
    assert wait(p) == EXIT_USER_ERROR  # retrying cannot help: the operator fails the job at once
    text = tail(p, 200)
    assert "different spec (spec.pet_config.lora_rank 8 -> 4)" in text
    assert "on_spec_change: start_over" in text
    doc["spec"]["checkpoint"]["on_spec_change"] = "start_over"
    config.write_text(yaml.safe_dump(doc))
    p = env.launch(config, nproc=1, delay=0)
    assert wait(p) == 0, tail(p)
    assert progress(env, "spec")["resumed_from"] is None
    committed = ck.list_committed(env.store("jobs/spec/checkpoints"))
    assert [c.manifest.spec_hash for c in committed] == [committed[-1].manifest.spec_hash]  # old ones pruned
