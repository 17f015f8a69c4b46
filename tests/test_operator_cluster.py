"""The operator against what real control planes do (the emulator and kubelet stand-in play them):
node loss as the node lifecycle controller and taint manager report it, the scheduler's Unschedulable,
Kueue's scheduling gates, kubelet evictions, deletion with no operator running, spec edits, and the
trainer's failure classes. Each test is a case a kinder test world used to hide."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from kubetune_operator import naming, state
from tests.fixtures_kube import Cluster, OperatorProcess, job_doc
from tests.kubelet import Kubelet, wait_for
from tests.kueue import Kueue

pytestmark = pytest.mark.slow


def progress_step(output: Path) -> int:
    try:
        return json.loads((output / "progress.json").read_text())["step"]
    except (FileNotFoundError, ValueError, KeyError):
        return -1


def behave(output: Path, **behaviour: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "behaviour.json").write_text(json.dumps(behaviour))


def condition(status: dict, ctype: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), {})


def wait_condition(cluster: Cluster, name: str, ctype: str, timeout: float = 60, **expect: str) -> dict:
    expect.setdefault("status", "True")
    return wait_for(
        lambda: (s := cluster.status(name)) and all(condition(s, ctype).get(k) == v for k, v in expect.items()) and s,
        timeout, what=lambda: f"{ctype} {expect} (now {condition(cluster.status(name), ctype)})",
    )  # fmt: skip


def pod_names(cluster: Cluster, job: str) -> list[str]:
    return sorted(p["metadata"]["name"] for p in cluster.pods(job))


# ---------------------------------------------------------------- node loss (case 1)


def test_a_node_gone_not_ready_restarts_the_gang_after_the_unknown_timeout(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    """Ready False (NodeNotReady) with phase Running, for ever: after unknown_timeout_seconds the pod
    is force-deleted and the gang restarts, counted as a disruption."""
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(
        job_doc("lost", out, steps=120, every=10, restart_policy={"unknown_timeout_seconds": 10})
    )
    wait_for(lambda: progress_step(out) >= 3, 30, what="step 3")
    assert kubelet.lose_node("lost-a1-r1")
    pod = wait_for(lambda: next((p for p in cluster.pods("lost") if p["metadata"]["name"] == "lost-a1-r1"
                                 and condition(p["status"], "Ready").get("reason") == "NodeNotReady"), None), 30)  # fmt: skip
    assert pod["status"]["phase"] == "Running"  # what the node lifecycle controller leaves
    status = cluster.wait_phase("lost", "Succeeded", timeout=90)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    assert status["last_restart_reason"].startswith(
        "NodeLost: pod lost-a1-r1 (rank 1): its node has not reported"
    )


def test_a_pod_the_taint_manager_deleted_on_a_dead_node_is_force_deleted_after_its_grace(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    """The taint manager deletes the pod; no kubelet confirms it, so it would stay Terminating for ever."""
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    doc = job_doc("taint", out, steps=200, every=10, checkpoint={"sigterm_grace_seconds": 5},
                  restart_policy={"unknown_timeout_seconds": 3600})  # fmt: skip
    cluster.create_job(doc)
    wait_for(lambda: progress_step(out) >= 3, 30, what="step 3")
    assert kubelet.lose_node("taint-a1-r1", delete_after=0.5)
    wait_for(
        lambda: any(p["metadata"].get("deletionTimestamp") for p in cluster.pods("taint")),
        10,
        what="the delete",
    )
    status = cluster.wait_phase("taint", "Succeeded", timeout=120)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 1)
    assert "taint-a1-r1" not in pod_names(cluster, "taint")


# ---------------------------------------------------------------- deletion without an operator (case 2)


def test_deleting_a_job_while_no_operator_runs_completes_at_once(
    cluster: Cluster, kubelet: Kubelet, operator_process: OperatorProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("orphan", out, steps=1000))
    cluster.wait_phase("orphan", "Running", timeout=60)
    operator_process.stop()
    assert not (cluster.job("orphan") or {})["metadata"].get("finalizers")
    cluster.delete_job("orphan")
    wait_for(lambda: cluster.job("orphan") is None, 5, what="the job gone")
    wait_for(lambda: not cluster.pods("orphan") and not kubelet.running(), 60, what="its pods gone (GC)")


# ---------------------------------------------------------------- spec edits (case 3) and pending (cases 4, 6)


def test_a_gang_that_cannot_be_scheduled_is_stalled_and_an_edit_that_fixes_it_replaces_it(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    kubelet.capacity["nvidia.com/gpu"] = "1"
    out = tmp_path / "out"
    doc = job_doc("big", out, nnodes=1, resources={"gpus": 2}, restart_policy={"pending_timeout_seconds": 2})
    cluster.create_job(doc)
    status = wait_condition(cluster, "big", "Stalled", reason="Unschedulable")
    assert "Insufficient nvidia.com/gpu" in condition(status, "Stalled")["message"]
    assert condition(status, "Reconciling")["status"] == "False" and status["phase"] == "Pending"
    wait_for(lambda: ("Warning", "Stalled") in cluster.events("big"), 10, what="the Stalled event")
    cluster.patch_job("big", {"spec": {"resources": {"gpus": 1}}})
    status = cluster.wait_phase("big", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (2, 0, 0)
    assert status["last_restart_reason"].startswith("SpecChanged: spec.resources changed")


def test_scratch_space_is_seen_by_the_scheduler(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    kubelet.capacity["ephemeral-storage"] = "50Gi"
    out = tmp_path / "out"
    cluster.create_job(job_doc("disk", out, nnodes=1, restart_policy={"pending_timeout_seconds": 1}))
    status = wait_condition(cluster, "disk", "Stalled", reason="Unschedulable")  # 100Gi by default
    assert "Insufficient ephemeral-storage" in condition(status, "Stalled")["message"]
    cluster.patch_job("disk", {"spec": {"resources": {"scratch_size": "20Gi"}}})
    assert cluster.wait_phase("disk", "Succeeded", timeout=60)["attempt"] == 2


def test_an_edit_while_running_is_shown_pending_and_reaches_the_next_attempt(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("edit", out, steps=80, every=5))
    cluster.wait_phase("edit", "Running", timeout=60)
    cluster.patch_job("edit", {"spec": {"image": "registry.example/kubetune/trainer:0.2.0"}})
    status = wait_condition(cluster, "edit", "ChangesPending")
    assert (
        "spec.image" in condition(status, "ChangesPending")["message"] and status["observedGeneration"] == 2
    )
    assert status["phase"] == "Running" and pod_names(cluster, "edit") == ["edit-a1-r0", "edit-a1-r1"]
    assert kubelet.kill("edit-a1-r0", signal.SIGTERM)  # a preemption: the next attempt takes the edit
    status = cluster.wait_phase("edit", "Succeeded", timeout=60)
    assert condition(status, "ChangesPending")["status"] == "False" and status["attempt"] == 2
    images = {p["spec"]["containers"][0]["image"] for p in cluster.pods("edit")}
    assert images == {"registry.example/kubetune/trainer:0.2.0"}


def test_pods_held_by_kueue_wait_for_admission_and_replacements_join_the_admitted_group(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    kueue = Kueue(cluster.api.api).install()
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    doc = job_doc("queued", out, steps=60, every=5, restart_policy={"pending_timeout_seconds": 2})
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a"}
    cluster.create_job(doc)
    status = wait_condition(cluster, "queued", "Stalled", reason="WaitingForAdmission")
    assert all(p["spec"]["schedulingGates"] for p in cluster.pods("queued")) and not kubelet.running()
    assert all(
        condition(p["status"], "PodScheduled").get("reason") == "SchedulingGated"
        for p in cluster.pods("queued")
    )
    assert kueue.admit("default", naming.pod_group_name("queued"))
    cluster.wait_phase("queued", "Running", timeout=30)
    wait_for(lambda: progress_step(out) >= 3, 30, what="step 3")
    assert kubelet.kill("queued-a1-r1")  # a gang restart: the new pods join the admitted pod group
    status = cluster.wait_phase("queued", "Succeeded", timeout=60)
    assert (status["attempt"], status["restarts"]) == (2, 1)


# ---------------------------------------------------------------- caps (case 5)


def test_uncounted_restarts_stop_at_max_preemptions(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    behave(out, fail={"rank": 1, "code": 75})  # "preempted, resumable", at once, in every attempt
    cluster.create_job(job_doc("flap", out, restart_policy={"max_preemptions": 2}))
    status = cluster.wait_phase("flap", "Failed", timeout=60)
    assert condition(status, "Failed")["reason"] == "TooManyPreemptions"
    assert (status["attempt"], status["restarts"], status["preemptions"]) == (3, 0, 2)


def test_a_kubelet_eviction_for_disk_pressure_counts_as_a_failure(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("full", out, steps=200, restart_policy={"max_restarts": 0}))
    wait_for(lambda: progress_step(out) >= 2, 30, what="step 2")
    assert kubelet.evict("full-a1-r0", resource="ephemeral-storage")
    status = cluster.wait_phase("full", "Failed", timeout=60)
    assert condition(status, "Failed")["reason"] == "MaxRestartsExceeded"
    assert "evicted" in status["message"] and "resources.scratch_size" in status["message"]


# ---------------------------------------------------------------- after success (case 7)


def test_ranks_left_running_after_success_are_deleted_and_the_job_after_its_ttl(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state, "SUCCESS_GRACE_SECONDS", 1)
    out = tmp_path / "out"
    behave(out, linger={"rank": 1})  # rank 1 never exits by itself
    cluster.create_job(job_doc("done", out, ttl_seconds_after_finished=4))
    cluster.wait_phase("done", "Succeeded", timeout=60)
    wait_for(lambda: not kubelet.running(), 30, what="rank 1 stopped")
    assert cluster.job("done") is not None  # kept until its ttl
    wait_for(
        lambda: cluster.job("done") is None and not cluster.pods("done"), 30, what="the job deleted (ttl)"
    )


# ---------------------------------------------------------------- failure classes (case 9)


def test_a_user_error_fails_the_job_at_once_with_the_trainers_line(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    line = "spec.dataset.uri: s3://data/alpaca.json: no such object"
    behave(out, fail={"rank": 0, "step": 1, "code": 65, "message": line})
    cluster.create_job(job_doc("typo", out, restart_policy={"max_restarts": 3}))
    status = cluster.wait_phase("typo", "Failed", timeout=60)
    assert condition(status, "Failed")["reason"] == "UserError" and status["message"].startswith(line)
    assert (status["attempt"], status["restarts"]) == (1, 0)  # not retried
    wait_for(lambda: ("Warning", "UserError") in cluster.events("typo"), 10, what="the UserError event")


def test_a_gang_that_stops_making_progress_is_restarted(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    behave(out, stall={"attempt": 1, "step": 6})  # a hung collective in step 6 of the first attempt
    cluster.create_job(
        job_doc("hung", out, steps=20, every=5, restart_policy={"progress_timeout_seconds": 3})
    )
    status = cluster.wait_phase("hung", "Succeeded", timeout=90)
    assert (status["attempt"], status["restarts"]) == (2, 1)
    assert status["last_restart_reason"].startswith("NoProgress: training has not advanced past step 5")


def test_an_oom_kill_is_counted_with_a_hint(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("oom", out, steps=40, every=5))
    wait_for(lambda: progress_step(out) >= 2, 30, what="step 2")
    assert kubelet.kill("oom-a1-r1", oom=True)
    status = cluster.wait_phase("oom", "Succeeded", timeout=60)
    assert status["restarts"] == 1 and status["last_restart_reason"].startswith("OOMKilled:")
    assert "per_device_train_batch_size" in status["last_restart_reason"]


def test_past_the_active_deadline_the_job_fails_and_its_pods_go(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("late", out, steps=10_000, active_deadline_seconds=3))
    status = cluster.wait_phase("late", "Failed", timeout=60)
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not kubelet.running(), 60, what="its pods stopped")
