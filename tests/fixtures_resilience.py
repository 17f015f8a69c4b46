"""Running trainer "pods" on this machine for the end-to-end resilience tests: `Env` (a bucket, a tiny
model, job files; `launch` starts `supervise -> torchrun -> trainer` as the pod command does, steps
slowed by tests.fixtures_cli.step_delay_env), waiting and killing helpers, and what a run left in the
store (committed steps, progress.json, per-step losses, final weights, `assert_same_run`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer import checkpoints as ck
from tests.fixtures_cli import step_delay_env

MAX_STEPS = 16
EVERY = 4
STEP_DELAY = 0.25
REL_TOL = 1e-4


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
