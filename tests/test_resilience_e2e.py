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
import time
from pathlib import Path

import pytest
import yaml

from kubetune.conventions import EXIT_PREEMPTED, EXIT_USER_ERROR
from kubetune_trainer import checkpoints as ck
from tests.fixtures_resilience import (
    MAX_STEPS,
    STEP_DELAY,
    Env,
    assert_same_run,
    committed_steps,
    kill_tree,
    progress,
    relaunch_gang_until_done,
    relaunch_until_done,
    tail,
    wait,
    wait_until,
    worker_pids,
)
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, num_layers=2)


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
