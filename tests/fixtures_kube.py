"""Fixtures for operator tests: an API server (tests/kube_api.py) with the FineTuneJob CRD, a kubelet
stand-in (tests/kubelet.py), and the operator itself, in-process (KopfRunner) or as a process; for the
end-to-end tests, `real_kubelet` (pods run their real command, steps slowed) and `lora_job` (a
two-node LoRA FineTuneJob on the tiny model with S3 checkpoints), with `s3_secret` (creates the
`s3-credentials` Secret it names)."""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from tests.fixtures_cli import step_delay_env
from tests.kube_api import RunningAPI
from tests.kubelet import Kubelet, wait_for

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT / "crds" / "finetunejob.yaml"
FAKE_TRAINER = ROOT / "tests" / "fake_trainer.py"

# The operator reads these when kubetune_operator.handlers is imported: fast loops for tests.
os.environ.setdefault("KUBETUNE_RECONCILE_INTERVAL", "0.5")
os.environ.setdefault("KUBETUNE_PROGRESS_INTERVAL", "0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_trainer(pod: dict) -> list[str]:
    """The kubelet runs this instead of torchrun (the config path is rewritten like any mount path)."""
    return [sys.executable, str(FAKE_TRAINER), "--config", "/etc/kubetune/job.yaml"]


def job_doc(name: str, output: Path, nnodes: int = 2, steps: int = 20, every: int = 5, **spec: Any) -> dict:
    """A FineTuneJob for the fake trainer: file:// output, quick restarts."""
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": "s3://data/alpaca.json"},
            "output": {"uri": f"file://{output}"},
            "parallel_config": {"nnodes": nnodes},
            "training": {"max_steps": steps},
            "checkpoint": {"every_steps": every},
            "restart_policy": {"max_restarts": 3, "backoff_seconds": 0, "max_backoff_seconds": 1},
        },
    }
    for key, value in spec.items():
        doc["spec"][key] = {**doc["spec"].get(key, {}), **value} if isinstance(value, dict) else value
    return doc


@dataclass
class Cluster:
    api: RunningAPI
    kubeconfig: Path
    client: kubernetes.client.ApiClient
    workdir: Path

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.client)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client)

    def create_job(self, doc: dict) -> dict:
        return self.custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", "default", "finetunejobs", doc
        )

    def patch_job(self, name: str, patch: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(
            "kubetune.io", "v1alpha1", "default", "finetunejobs", name, patch
        )

    def delete_job(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            "kubetune.io", "v1alpha1", "default", "finetunejobs", name
        )

    def job(self, name: str) -> dict | None:
        with contextlib.suppress(kubernetes.client.ApiException):
            return self.custom.get_namespaced_custom_object(
                "kubetune.io", "v1alpha1", "default", "finetunejobs", name
            )
        return None

    def status(self, name: str) -> dict:
        return copy.deepcopy((self.job(name) or {}).get("status") or {})

    def pods(self, job: str) -> list[dict]:
        return self.api.api.objects(_res("v1", "pods"), "default", f"kubetune.io/job={job}")

    def events(self, job: str) -> list[tuple[str, str]]:
        items = sorted(
            self.api.api.objects(_res("v1", "events"), "default"), key=lambda e: e.get("eventTime") or ""
        )
        return [(e["type"], e["reason"]) for e in items if e["involvedObject"].get("name") == job]

    def wait_phase(self, name: str, *phases: str, timeout: float = 60) -> dict:
        return wait_for(
            lambda: (s := self.status(name)).get("phase") in phases and s,
            timeout,
            what=lambda: (
                f"{name} in {phases} (now {self.status(name).get('phase')}: {self.status(name).get('message')})"
            ),
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )


def _res(group_version: str, plural: str) -> Any:
    import kmock

    return kmock.resource(group_version, plural)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with RunningAPI() as api:
        api.api.install_crd(CRD)
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        yield Cluster(api, kubeconfig, client, tmp_path)


@pytest.fixture
def kubelet(cluster: Cluster) -> Iterator[Kubelet]:
    with Kubelet(cluster.api.url, cluster.workdir / "node", command_for=fake_trainer,
                 extra_env={"FAKE_STEP_SECONDS": "0.05"}) as k:  # fmt: skip
        yield k


OPERATOR_ARGS = ["run", "--standalone", "-A", "-m", "kubetune_operator.handlers"]


@pytest.fixture
def operator(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The operator in this process (kopf.testing.KopfRunner)."""
    from kopf.testing import KopfRunner

    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    with KopfRunner(OPERATOR_ARGS, timeout=120) as runner:
        yield runner
    assert runner.exception is None, runner.output[-5000:]


@dataclass
class OperatorProcess:
    """`kopf run` of the operator as a separate process (so a test can kill -9 it)."""

    cluster: Cluster
    log: Path
    metrics_port: int
    liveness_port: int
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**self.cluster.env(), "KUBETUNE_METRICS_PORT": str(self.metrics_port)}
        args = [
            sys.executable,
            "-m",
            "kopf",
            *OPERATOR_ARGS,
            f"--liveness=http://127.0.0.1:{self.liveness_port}/healthz",
        ]
        self.proc = subprocess.Popen(args, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def operator_process(cluster: Cluster) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, cluster.workdir / "operator.log", free_port(), free_port())
    op.start()
    try:
        yield op
    finally:
        op.stop()


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------- the real trainer in pods


@pytest.fixture
def real_kubelet(cluster: Cluster) -> Iterator[Kubelet]:
    """Pods run their own command (the rendered torchrun line), slowed so a kill lands mid-training."""
    env = {**step_delay_env(0.3), "OMP_NUM_THREADS": "1"}
    with Kubelet(cluster.api.url, cluster.workdir / "node", extra_env=env, ports={29500: free_port()}) as k:
        yield k


def lora_job(name: str, model: Path, s3: Any) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"uri": str(ROOT / "examples/data/alpaca_en_200.json"), "format": "alpaca"},
            "pet_config": {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0},
            "training": {
                "learning_rate": 3e-3,
                "max_steps": 16,
                "per_device_train_batch_size": 2,
                "seq_length": 128,
                "precision": "fp32",
                "logging_steps": 1,
            },  # fmt: skip
            "parallel_config": {"nnodes": 2},
            "checkpoint": {"every_steps": 4, "keep_last": 2},
            "storage": {"s3": {"endpoint": s3.endpoint, "credentials_secret": "s3-credentials"}},
            "output": {"uri": s3.uri(f"jobs/{name}")},
            "restart_policy": {"max_restarts": 2, "backoff_seconds": 1},
        },
    }


def s3_secret(cluster: Cluster, s3: Any) -> None:
    """The `s3-credentials` Secret (the S3 stand-in's keys) that `lora_job` and its kin name."""
    data = {
        k: base64.b64encode(s3.env[k].encode()).decode()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    cluster.core.create_namespaced_secret("default", {"metadata": {"name": "s3-credentials"}, "data": data})


def kopf_parses(argv: list[str]) -> dict[str, Any]:
    """Parse a rendered `kopf run ...` argv with kopf's own CLI definition (no operator starts): a bad
    flag raises."""
    from kopf.cli import main as kopf_cli

    assert argv[0] == "kopf"
    run = kopf_cli.commands[argv[1]]
    ctx = run.make_context("kopf run", list(argv[2:]), resilient_parsing=False)
    return ctx.params
