"""The reconcile loop (handlers.reconcile) against the API emulator, without kopf: crash-safety at every
write, status patches, progress, output checks and metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import kmock
import kubernetes
import pytest

from kubetune.progress import TrainerProgress
from kubetune.spec import FineTuneJobSpec
from kubetune_operator import handlers, metrics, state
from tests.fixtures_kube import Cluster, free_port, job_doc

PODS = kmock.resource("v1", "pods")


class Crash(Exception):
    """The operator process dies here."""


class CrashingKube(handlers.Kube):
    """The real client, but the process 'dies' just before its n-th write (status, create, delete, event)."""

    def __init__(self, client: kubernetes.client.ApiClient, crash_at: float = float("inf")) -> None:
        super().__init__(client)
        self.crash_at, self.writes = crash_at, 0

    def _write(self) -> None:
        if self.writes >= self.crash_at:
            raise Crash
        self.writes += 1

    def patch_status(self, *a, **kw):  # noqa: ANN002, ANN003, ANN201
        self._write()
        return super().patch_status(*a, **kw)

    def create(self, obj: dict) -> bool:
        self._write()
        return super().create(obj)

    def delete_pod(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        self._write()
        super().delete_pod(*a, **kw)

    def delete_old_configmaps(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        self._write()
        super().delete_old_configmaps(*a, **kw)

    def event(self, job: dict, ev: state.Event) -> None:
        self._write()


def fail_pod(cluster: Cluster, name: str, code: int) -> None:
    status = {"phase": "Failed", "containerStatuses": [
        {"name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
         "state": {"terminated": {"exitCode": code, "reason": "Error"}}}]}  # fmt: skip
    cluster.core.patch_namespaced_pod_status(name, "default", {"status": status}, _preload_content=False)


def scenario(cluster: Cluster, name: str, crash_at: float, tmp_path: Path) -> int:
    """Create a job, let a pod fail, see attempt 2 created; the first operator dies at write `crash_at`
    and a fresh one carries on from whatever state the API server holds. Returns the writes made."""
    first = CrashingKube(cluster.client, crash_at)
    fresh = CrashingKube(cluster.client)
    kube: CrashingKube = first

    def step() -> None:
        nonlocal kube
        try:
            handlers.reconcile(kube, "default", name, trigger="test")
        except Crash:
            kube = fresh  # a new operator process: nothing in memory, only what the API server has
            handlers.reconcile(kube, "default", name, trigger="test")

    cluster.create_job(job_doc(name, tmp_path / name, restart_policy={"backoff_seconds": 0}))
    for _ in range(3):
        step()
    status = cluster.status(name)
    assert (status["phase"], status["attempt"]) == ("Pending", 1)
    assert sorted(p["metadata"]["name"] for p in cluster.pods(name)) == [f"{name}-a1-r0", f"{name}-a1-r1"]
    fail_pod(cluster, f"{name}-a1-r0", 1)
    for _ in range(4):
        step()
    status = cluster.status(name)
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Pending", 2, 1), status
    assert sorted(p["metadata"]["name"] for p in cluster.pods(name)) == [f"{name}-a2-r0", f"{name}-a2-r1"]
    api = cluster.api.api
    with api.mutex:
        created = [e.obj["metadata"]["name"] for e in api._log if e.type == "ADDED" and e.resource == PODS]
    mine = [n for n in created if n.startswith(f"{name}-")]
    assert len(mine) == len(set(mine)) == 4, mine  # no pod was ever created twice
    return first.writes + fresh.writes


def test_a_crash_at_any_write_never_duplicates_a_pod_nor_miscounts(cluster: Cluster, tmp_path: Path) -> None:
    writes = scenario(cluster, "whole", float("inf"), tmp_path)
    assert writes >= 14  # status, service, config map, 2 pods, event; status, 2 deletes, event; ...
    for k in range(writes):
        scenario(cluster, f"crash{k}", k, tmp_path)


def test_status_patch_sets_changes_and_removes_what_is_gone() -> None:
    old = {"phase": "Restarting", "restart_after": "x", "attempt": 1, "kopf": {"progress": {}}}
    new = {"phase": "Pending", "attempt": 2}
    assert handlers.status_patch(old, new) == {"phase": "Pending", "attempt": 2, "restart_after": None}
    assert handlers.status_patch(new, new) == {}


def test_status_patch_removes_a_key_gone_from_a_nested_object() -> None:
    """A merge patch merges objects: a key the new status drops from one must be sent as null, or it
    stays on the server (an evaluation's retry_until once the results were read)."""
    from tests.kube_api import merge_patch

    old = {"phase": "Succeeded", "evaluation": {"reason": "ResultsUnavailable", "retry_until": "t"}}
    new = {"phase": "Succeeded", "evaluation": {"reason": "ThresholdsPassed", "passed": True}}
    patch = handlers.status_patch(old, new)
    assert patch == {"evaluation": {"reason": "ThresholdsPassed", "passed": True, "retry_until": None}}
    assert merge_patch(old, patch) == new


def test_a_stale_read_is_refused_and_decided_again(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_job(job_doc("stale", tmp_path))
    job = cluster.job("stale")
    kube = handlers.Kube(cluster.client)
    kube.patch_status("default", "stale", {"message": "someone else"}, None)
    with pytest.raises(kubernetes.client.ApiException) as e:
        kube.patch_status("default", "stale", {"phase": "Pending"}, job["metadata"]["resourceVersion"])
    assert e.value.status == 409
    handlers.reconcile(CrashingKube(cluster.client), "default", "stale", trigger="test")  # reads again: fine
    assert cluster.status("stale")["attempt"] == 1


def test_progress_and_output_from_a_file_store(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = FineTuneJobSpec.model_validate(job_doc("p", out)["spec"])
    assert handlers.read_progress(spec) is None
    assert handlers.output_committed(spec, None) is None  # the output dir is not there: cannot tell
    out.mkdir()
    assert handlers.output_committed(spec, None) is False
    (out / "progress.json").write_text(json.dumps({"state": "running", "step": 3, "total_steps": 10}))
    assert handlers.read_progress(spec).step == 3
    (out / "final" / "adapter").mkdir(parents=True)
    (out / "final" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    assert handlers.output_committed(spec, None) is True
    assert handlers.output_committed(spec, TrainerProgress(state="done")) is True
    (out / "progress.json").write_text("not json")
    assert handlers.read_progress(spec) is None  # said in the log; the status keeps what it had
    pvc = FineTuneJobSpec.model_validate({**job_doc("p", out)["spec"], "output": {"uri": "pvc://runs/p"}})
    assert handlers.read_progress(pvc) is None and handlers.output_committed(pvc, None) is None


def test_an_unreadable_spec_fails_the_job(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_job(job_doc("odd", tmp_path))
    kube = CrashingKube(cluster.client)
    real = kube.get_job

    def broken(namespace: str, name: str) -> dict:
        job = real(namespace, name)
        job["spec"]["training"]["seq_length"] = "long"  # what an older/newer CRD might let through
        return job

    kube.get_job = broken  # type: ignore[method-assign]
    handlers.reconcile(kube, "default", "odd", trigger="test")
    status = cluster.status("odd")
    assert status["phase"] == "Failed" and "training.seq_length" in status["message"]


def test_metrics_endpoint(cluster: Cluster, tmp_path: Path) -> None:
    port = free_port()
    metrics.serve(port)
    cluster.create_job(job_doc("m", tmp_path))
    handlers.reconcile(CrashingKube(cluster.client), "default", "m", trigger="test")
    fail_pod(cluster, "m-a1-r0", 1)
    handlers.reconcile(CrashingKube(cluster.client), "default", "m", trigger="test")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kubetune_jobs{phase="Restarting"}' in text
    assert 'kubetune_restarts_total{reason="PodFailed"}' in text
    assert 'kubetune_reconcile_duration_seconds_count{trigger="test"}' in text
