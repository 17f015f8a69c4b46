"""A job killed (kill -9 of the trainer) and resumed is ONE run in every tracker: a real MLflow tracking
server started here (sqlite backend), TensorBoard event files read with TensorBoard's own reader, and a
W&B offline run. The runs are the real pod command (supervise -> torchrun -> trainer) of the resilience
harness (tests/test_resilience_e2e.py), with the output and checkpoints in SeaweedFS; the relaunch is a
fresh "pod" (empty local cache), so the run ids and the event files can only come from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.fixtures_resilience import (
    MAX_STEPS,
    Env,
    committed_steps,
    progress,
    relaunch_until_done,
    step_losses,
    tail,
    wait,
    wait_until,
    worker_pids,
)
from tests.fixtures_s3 import free_port

pytestmark = pytest.mark.slow

EXPERIMENT = "kubetune-e2e"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a sqlite backend store, as a team would run it; yields its URL."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            return False

    try:
        wait_until(healthy, 120, "the MLflow server")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker (a new session: only them)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # uvicorn waits for the idle keep-alive connections
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, num_layers=2)


def logged_steps(logdir: Path) -> list[int]:
    """Steps of train/loss in a TensorBoard log dir so far (TensorBoard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.is_dir():
        return []
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")] if "train/loss" in acc.Tags()["scalars"] else []


def tracked_job(env: Env, name: str, mlflow_url: str) -> Path:
    path = env.job(name)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["tracking"] = {
        "tensorboard": True,
        "mlflow": {"tracking_uri": mlflow_url, "experiment": EXPERIMENT},
        "wandb": {"project": "kubetune-e2e", "mode": "offline"},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_killed_and_resumed_job_is_one_run_in_mlflow_tensorboard_and_wandb(
    s3_server: Any, tiny_model: Path, mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = Env(s3_server, s3_server.new_bucket(), tmp_path, tiny_model)
    config = tracked_job(env, "kill", mlflow_server)
    p = env.launch(config, nproc=1, delay=0.5)  # steps slow enough to stop it between two commits
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "kill")), 180, "checkpoint step 4", (p,))
    local_tb = tmp_path / "pod-1/work/kill/output/tensorboard"
    pid = wait_until(lambda: worker_pids(p).get(0), 10, "the trainer's pid")
    client = MlflowClient(mlflow_server)

    def on_mlflow() -> int:  # the last step whose loss reached the MLflow server
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        return max(
            (m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")), default=0
        )

    while True:  # kill it with steps on MLflow past its newest commit: the resumed run repeats them
        wait_until(
            lambda: min((logged_steps(local_tb) or [0])[-1], on_mlflow()) > max(committed_steps(env, "kill")),
            60, "a step on TensorBoard and MLflow past the checkpoint", (p,),
        )  # fmt: skip
        os.kill(pid, signal.SIGSTOP)  # frozen, its uploader too: what it logged and committed holds still
        killed_at, committed = logged_steps(local_tb)[-1], max(committed_steps(env, "kill"))
        if min(killed_at, on_mlflow()) > committed:
            # the pod dies: its trainer mid-run and all it started (W&B's service process too)
            pod = [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
            for proc in pod:
                os.kill(proc, signal.SIGKILL)
            break
        os.kill(pid, signal.SIGCONT)  # a commit came first: try again further on
    assert wait(p) != 0
    psutil.wait_procs([q for q in map(_process, pod) if q is not None], timeout=30)
    first_ids = json.loads(env.store("jobs/kill").get_bytes("tracking.json"))
    p2 = relaunch_until_done(env, config, nproc=1, delay=0)
    resumed = progress(env, "kill")["resumed_from"]
    assert resumed is not None and resumed["step"] == committed, (resumed, committed, tail(p2))
    losses = step_losses(env, "kill")  # what the trainer logged, from its last checkpoint
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))

    # MLflow: one run in the experiment, every step 1..N, continued (not restarted) after the kill
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    run = runs[0]
    assert run.info.run_id == first_ids["mlflow"]["run_id"]
    assert (run.info.run_name, run.info.status) == ("kill", "FINISHED")
    assert run.data.tags["kubetune.job"] == "kill" and run.data.params["max_steps"] == str(MAX_STEPS)
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = Counter(m.step for m in history)
    # every step once: no gap, and the steps the killed attempt logged past its checkpoint (the
    # resumed one repeats them) are not logged again
    assert steps == Counter(range(1, MAX_STEPS + 1)), (steps, committed, killed_at)
    for m in history:
        assert m.value == pytest.approx(losses[m.step], rel=1e-4), (m.step, m.value, losses[m.step])

    # TensorBoard: the job's one log dir in the store; its reader sees every step once
    tb = env.store("jobs/kill").download_dir("tensorboard", tmp_path / "tensorboard")
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # a writer per attempt, one log dir
    acc = EventAccumulator(str(tb))
    acc.Reload()
    scalars = acc.Scalars("train/loss")
    # the killed attempt's file holds steps up to killed_at; the resumed writer purged those past the commit
    assert [e.step for e in scalars] == list(range(1, MAX_STEPS + 1))
    assert all(e.value == pytest.approx(losses[e.step], rel=1e-4) for e in scalars)

    # W&B offline: the killed attempt's run dir (it went to the store with its committed checkpoint)
    # and the resumed one (uploaded with the output) carry the same run id
    wid = first_ids["wandb"]["run_id"]
    killed = list((tmp_path / "pod-1/work/kill/output/wandb").glob(f"offline-run-*-{wid}"))
    assert len(killed) == 1 and (killed[0] / f"run-{wid}.wandb").is_file(), killed
    keys = env.store("jobs/kill").list("wandb/")
    uploaded = sorted(k.split("/")[1] for k in keys if k.endswith(f"/run-{wid}.wandb"))
    assert len(uploaded) == 2 and killed[0].name in uploaded, keys
    assert all(name.endswith(f"-{wid}") for name in uploaded)
    assert json.loads(env.store("jobs/kill").get_bytes("tracking.json")) == first_ids
    print(
        f"killed at step {killed_at}, after checkpoint {committed}; MLflow run {run.info.run_id}: "
        f"{len(history)} loss points over {len(steps)} steps; TensorBoard {len(scalars)} steps",
        file=sys.__stdout__,
    )
