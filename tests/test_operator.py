"""The operator end to end: kopf handlers against the API emulator, pods run by the kubelet stand-in
(with the fake trainer: same config, checkpoints, progress.json and exit codes, no torch)."""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes
import pytest

from tests.fixtures_kube import Cluster, OperatorProcess, job_doc
from tests.kubelet import Kubelet, wait_for

pytestmark = pytest.mark.slow


def runs(output: Path) -> list[dict]:
    path = output / "runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def progress_step(output: Path) -> int:
    try:
        return json.loads((output / "progress.json").read_text())["step"]
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def _get(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None


def created_pods(cluster: Cluster) -> list[str]:
    """Every pod name the API server ever created (from its watch history)."""
    api = cluster.api.api
    with api.mutex:
        return [
            e.obj["metadata"]["name"] for e in api._log if e.type == "ADDED" and e.resource.plural == "pods"
        ]


def test_job_runs_to_success(cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cluster.create_job(job_doc("demo", out, steps=20, every=5))
    status = cluster.wait_phase("demo", "Succeeded", timeout=60)
    assert status["attempt"] == 1 and status["restarts"] == 0 and status["preemptions"] == 0
    assert status["output"] == f"file://{out}/final"
    assert status["progress"]["summary"] == "100% (20/20)" and status["progress"]["state"] == "done"
    assert status["last_checkpoint"] == {"uri": f"file://{out}/checkpoints/step-00000020", "step": 20}
    assert status["start_time"] <= status["completion_time"]
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert (
        conditions["Succeeded"] == "True"
        and conditions["Ready"] == "True"
        and conditions["Reconciling"] == "False"
    )
    pods = cluster.pods("demo")
    assert sorted(p["metadata"]["name"] for p in pods) == ["demo-a1-r0", "demo-a1-r1"]
    uid = cluster.job("demo")["metadata"]["uid"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == uid for p in pods)
    reasons = wait_for(
        lambda: (r := [r for _, r in cluster.events("demo")]) and r[-1] == "Succeeded" and r, 10
    )
    assert reasons == ["Created", "Running", "Succeeded"]
    r = cluster.kubectl("wait", "--for=condition=Succeeded", "ftj/demo", "--timeout=10s")
    assert r.returncode == 0, r.stderr
    assert sorted(created_pods(cluster)) == ["demo-a1-r0", "demo-a1-r1"]


def slow(kubelet: Kubelet, seconds: float = 0.1) -> None:
    kubelet.extra_env["FAKE_STEP_SECONDS"] = str(seconds)


def test_killed_pod_restarts_the_gang_which_resumes_from_the_checkpoint(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    slow(kubelet)
    cluster.create_job(job_doc("crash", out, steps=30, every=5))
    wait_for(lambda: progress_step(out) >= 12, 30, what="step 12")
    assert kubelet.kill("crash-a1-r1")  # SIGKILL: exit 137, a crash
    status = cluster.wait_phase("crash", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 1, 0)
    assert status["last_restart_reason"].startswith(
        "PodFailed: pod crash-a1-r1 (rank 1) failed (exit code 137"
    )
    second = [r for r in runs(out) if r["attempt"] == 2]
    assert len(second) == 2 and all(r["start"] >= 10 for r in second)  # resumed from a committed checkpoint
    assert status["progress"]["summary"] == "100% (30/30)"
    assert sorted(created_pods(cluster)) == ["crash-a1-r0", "crash-a1-r1", "crash-a2-r0", "crash-a2-r1"]
    assert [p["metadata"]["name"] for p in cluster.pods("crash")] == ["crash-a2-r0", "crash-a2-r1"]
    configmaps = cluster.api.api.objects(__import__("kmock").resource("v1", "configmaps"), "default")
    assert [c["metadata"]["name"] for c in configmaps] == ["crash-a2-config"]  # attempt 1's is gone
    events = wait_for(lambda: (e := cluster.events("crash")) and ("Normal", "Succeeded") in e and e, 10)
    assert ("Warning", "Restarting") in events and ("Normal", "Restarted") in events


def test_a_preempted_exit_is_not_counted(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    slow(kubelet)
    cluster.create_job(job_doc("preempt", out, steps=30, every=10, restart_policy={"max_restarts": 0}))
    wait_for(lambda: progress_step(out) >= 5, 30, what="step 5")
    assert kubelet.kill("preempt-a1-r0", signal.SIGTERM)  # the trainer commits and exits EXIT_PREEMPTED
    status = cluster.wait_phase("preempt", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    assert status["last_restart_reason"].startswith("Preempted:")
    assert min(r["start"] for r in runs(out) if r["attempt"] == 2) >= 5  # committed at SIGTERM, resumed there


def test_max_restarts_exceeded_fails_with_the_reason(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "behaviour.json").write_text(json.dumps({"fail": {"rank": 1, "code": 3}}))
    cluster.create_job(job_doc("doomed", out, restart_policy={"max_restarts": 2}))
    status = cluster.wait_phase("doomed", "Failed", timeout=60)
    assert (status["attempt"], status["restarts"]) == (3, 2)
    assert "exit code 3" in status["message"] and "max_restarts=2" in status["message"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "MaxRestartsExceeded")
    wait_for(lambda: ("Warning", "Failed") in cluster.events("doomed"), 10, what="the Failed event")
    r = cluster.kubectl("wait", "--for=condition=Failed", "ftj/doomed", "--timeout=10s")
    assert r.returncode == 0, r.stderr
    assert {p["metadata"]["name"] for p in cluster.pods("doomed")} >= {"doomed-a3-r1"}  # kept for its logs


def test_suspend_deletes_the_pods_and_resume_continues(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    slow(kubelet)
    cluster.create_job(job_doc("pause", out, steps=30, every=10))
    wait_for(lambda: progress_step(out) >= 5, 30, what="step 5")
    cluster.patch_job("pause", {"spec": {"suspend": True}})
    status = cluster.wait_phase("pause", "Suspended", timeout=20)
    wait_for(lambda: not cluster.pods("pause") and not kubelet.running(), 30, what="pods gone")
    status = cluster.status("pause")
    suspended = next(c for c in status["conditions"] if c["type"] == "Suspended")
    assert suspended["status"] == "True" and status["observedGeneration"] == 2
    assert json.loads((out / "progress.json").read_text())["state"] == "preempted"  # saved on SIGTERM
    time.sleep(1)
    assert not cluster.pods("pause")  # stays suspended
    cluster.patch_job("pause", {"spec": {"suspend": False}})
    status = cluster.wait_phase("pause", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"]) == (2, 0)
    assert min(r["start"] for r in runs(out) if r["attempt"] == 2) >= 5
    assert [r for _, r in cluster.events("pause")].count("Suspended") == 1


def test_deleting_the_job_mid_run_removes_everything(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    slow(kubelet)
    cluster.create_job(job_doc("gone", out, steps=100))
    wait_for(lambda: len(kubelet.running()) == 2, 30, what="2 pods running")
    cluster.delete_job("gone")
    api = cluster.api.api
    leftovers = lambda: [  # noqa: E731
        o["metadata"]["name"] for plural in ("pods", "services", "configmaps")
        for o in api.objects(__import__("kmock").resource("v1", plural), "default", "kubetune.io/job=gone")
    ]  # fmt: skip
    wait_for(lambda: not leftovers() and not kubelet.running(), 60,
             what=lambda: f"pods, service, config map gone: {leftovers()}, running {kubelet.running()}, "
             f"job {cluster.job('gone') and cluster.job('gone')['metadata']}")  # fmt: skip
    time.sleep(1.5)  # and the operator does not bring anything back
    assert not leftovers() and cluster.job("gone") is None


def test_a_bad_spec_is_rejected_at_admission_with_the_field_named(cluster: Cluster, tmp_path: Path) -> None:
    doc = job_doc("bad", tmp_path, pet_config={"pet_type": "qlora"})  # qlora needs a quantization block
    with pytest.raises(kubernetes.client.ApiException) as e:
        cluster.create_job(doc)
    assert e.value.status == 422
    cause = json.loads(e.value.body)["details"]["causes"][0]
    assert cause["field"] == "spec.pet_config.quantization" and "quantization block" in cause["message"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(job_doc("bad2", tmp_path, pet_config={"lora_rank": 0})))
    r = cluster.kubectl("apply", "-f", str(bad))
    assert (
        r.returncode == 1
        and "spec.pet_config.lora_rank" in r.stderr
        and "greater than or equal to 1" in r.stderr
    )
    cluster.create_job(job_doc("good", tmp_path))
    with pytest.raises(kubernetes.client.ApiException) as e:
        cluster.patch_job("good", {"spec": {"training": {"learning_rate": 0.1}}})
    assert e.value.status == 422 and "spec.training: Invalid value" in json.loads(e.value.body)["message"]
    assert cluster.patch_job("good", {"spec": {"suspend": True}})["spec"]["suspend"] is True


def test_operator_killed_at_any_moment_never_duplicates_pods_nor_loses_the_attempt(
    cluster: Cluster, kubelet: Kubelet, operator_process: OperatorProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    slow(kubelet, 0.1)
    cluster.create_job(job_doc("tough", out, steps=100, every=5))
    killed = 0
    crashed = False
    deadline = time.monotonic() + 180
    while killed < 6 or cluster.status("tough").get("phase") != "Succeeded":
        assert time.monotonic() < deadline, cluster.status("tough")
        time.sleep(1.5 + 0.6 * (killed % 5))  # kill it at varied moments (it needs ~1.2 s to start)
        operator_process.kill()
        killed += 1
        if not crashed and progress_step(out) >= 12 and "tough-a1-r0" in kubelet.running():
            kubelet.kill("tough-a1-r0")  # a pod dies while no operator is running
            crashed = True
        operator_process.start()
    status = cluster.status("tough")
    assert crashed
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 1, 0)
    names = created_pods(cluster)
    assert len(names) == len(set(names)) == 4, names  # every pod created exactly once
    # the process still running serves kopf's liveness probe and our metrics
    metrics = f"http://127.0.0.1:{operator_process.metrics_port}/metrics"
    wait_for(
        lambda: 'kubetune_jobs{phase="Succeeded"} 1.0' in (_get(metrics) or ""), 30, what="the phase metric"
    )
    health = _get(f"http://127.0.0.1:{operator_process.liveness_port}/healthz")
    assert health is not None and json.loads(health)["jobs"] == 1  # the probe counts the jobs it has seen
    print(f"operator killed {killed} times", file=sys.__stdout__)


def test_an_evicted_pod_restarts_the_gang_uncounted(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    """`kubectl drain` evicts through the Eviction API: DisruptionTarget, SIGTERM, the trainer saves."""
    out = tmp_path / "out"
    slow(kubelet)
    cluster.create_job(job_doc("drain", out, steps=40, every=10, restart_policy={"max_restarts": 0}))
    wait_for(lambda: progress_step(out) >= 5, 30, what="step 5")
    cluster.core.create_namespaced_pod_eviction(
        "drain-a1-r1", "default", {"metadata": {"name": "drain-a1-r1"}}, _preload_content=False
    )
    status = cluster.wait_phase("drain", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    assert status["last_restart_reason"].startswith(("Disrupted:", "PodDeleted:"))
