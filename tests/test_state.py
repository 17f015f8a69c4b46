"""The reconcile state machine (kubetune_operator.state), table by table: no API, no clock."""

from __future__ import annotations

import datetime as dt
import itertools
import json

import pytest

from kubetune.conventions import EXIT_PREEMPTED, EXIT_USER_ERROR, LABEL_ATTEMPT, LABEL_RANK
from kubetune.progress import TrainerProgress
from kubetune.spec import FineTuneJobSpec, FineTuneJobStatus
from kubetune_operator import state
from kubetune_operator.state import PodObs

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


def spec(nnodes: int = 2, suspend: bool = False, **policy: int) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/tiny"}, "dataset": {"uri": "s3://data/a.json"},
        "output": {"uri": "s3://runs/job"}, "parallel_config": {"nnodes": nnodes}, "suspend": suspend,
        "restart_policy": {"max_restarts": 3, "backoff_seconds": 10, "max_backoff_seconds": 300, **policy},
    })  # fmt: skip


def pod(rank: int, phase: str = "Running", attempt: int = 1, **kw: object) -> PodObs:
    return PodObs(name=f"job-a{attempt}-r{rank}", attempt=attempt, rank=rank, phase=phase, **kw)  # type: ignore[arg-type]


def failed(rank: int, code: int | None = 1, reason: str | None = "Error", **kw: object) -> PodObs:
    return pod(rank, "Failed", exit_code=code, reason=reason, **kw)


def decide(status: dict, pods: list[PodObs] = (), s: FineTuneJobSpec | None = None, now: dt.datetime = NOW,
           generation: int = 1, committed: bool | None = True) -> state.Decision:  # fmt: skip
    return state.decide(state.Observed(s or spec(), status, generation, tuple(pods), now, committed))


def cond(d: state.Decision, ctype: str) -> dict:
    return next(c for c in d.status["conditions"] if c["type"] == ctype)


def running(attempt: int = 1, **kw: object) -> dict:
    return {"phase": "Running", "attempt": attempt, "restarts": 0, "preemptions": 0, **kw}


# ---------------------------------------------------------------- creating the gang


def test_a_new_job_creates_attempt_1() -> None:
    d = decide({})
    assert d.create_attempt == 1 and d.status["phase"] == "Pending" and d.status["attempt"] == 1
    assert d.status["start_time"] == "2026-11-23T12:00:00Z"
    assert [e.reason for e in d.events] == ["Created"]
    assert cond(d, "Reconciling")["status"] == "True" and cond(d, "Ready")["status"] == "False"


@pytest.mark.parametrize("present", [[], [0], [1]])
def test_pending_with_missing_pods_creates_them(present: list[int]) -> None:
    d = decide({"phase": "Pending", "attempt": 1}, [pod(r, "Pending") for r in present])
    assert d.create_attempt == 1 and d.status["phase"] == "Pending" and not d.delete_pods


def test_pending_with_the_whole_gang_waits() -> None:
    d = decide({"phase": "Pending", "attempt": 1}, [pod(0, "Pending"), pod(1, "Running")])
    assert d.create_attempt is None and not d.delete_pods and d.status["phase"] == "Pending"
    assert "1/2 pods running" in d.status["message"]


# ---------------------------------------------------------------- every pod-phase combination

PHASES = ["Pending", "Running", "Succeeded", "Failed", "Unknown"]


def _expected(p0: str, p1: str, before: str) -> str:
    if "Failed" in (p0, p1):
        return "Restarting"
    if p0 == "Succeeded":
        return "Succeeded"
    if {p0, p1} <= {"Running", "Succeeded"}:
        return "Running"
    return before  # still waiting (an Unknown pod gets unknown_timeout_seconds first)


@pytest.mark.parametrize("before", ["Pending", "Running"])
@pytest.mark.parametrize(("p0", "p1"), list(itertools.product(PHASES, PHASES)))
def test_every_pod_phase_combination(p0: str, p1: str, before: str) -> None:
    def make(rank: int, phase: str) -> PodObs:
        if phase == "Failed":
            return failed(rank)
        if phase == "Unknown":
            return pod(rank, "Unknown", node_down_since=NOW - dt.timedelta(seconds=5))
        return pod(rank, phase, exit_code=0 if phase == "Succeeded" else None)

    d = decide({"phase": before, "attempt": 1}, [make(0, p0), make(1, p1)])
    assert d.status["phase"] == _expected(p0, p1, before)
    assert d.create_attempt is None  # the gang is complete: nothing to create in any case
    if d.status["phase"] == "Restarting":
        assert sorted(d.delete_pods) == ["job-a1-r0", "job-a1-r1"] and d.status["restarts"] == 1
    if d.status["phase"] == "Succeeded":
        assert d.status["output"] == "s3://runs/job/final" and d.status["completion_time"]
        assert d.delete_pods == []  # the other rank finishes on its own


# ---------------------------------------------------------------- every exit code class

EXIT_CLASSES = [
    # (exit code, terminated/pod reason, DisruptionTarget reason) -> counted?, reason
    (1, "Error", None, True, "PodFailed"),
    (2, "Error", None, True, "PodFailed"),
    (255, "Error", None, True, "PodFailed"),
    (137, "OOMKilled", None, True, "OOMKilled"),  # counted, with a hint
    (137, "Error", None, True, "PodFailed"),  # SIGKILL: a crash
    (None, "StartError", None, True, "PodFailed"),  # never started
    (EXIT_PREEMPTED, "Error", None, False, "Preempted"),
    (143, "Error", None, False, "Terminated"),  # SIGTERM from outside
    (137, "Evicted", "TerminationByKubelet", True, "Evicted"),  # node pressure the job caused: counted
    (137, "Evicted", None, True, "Evicted"),  # the same on clusters without DisruptionTarget
    (143, "Terminated", "TerminationByKubelet", False, "Disrupted"),  # graceful node shutdown
    (137, "Error", "PreemptionByScheduler", False, "Disrupted"),
    (1, "Error", "DeletionByTaintManager", False, "Disrupted"),
]


@pytest.mark.parametrize(("code", "reason", "disruption", "counted", "why"), EXIT_CLASSES)
def test_exit_code_classes(
    code: int | None, reason: str, disruption: str | None, counted: bool, why: str
) -> None:
    d = decide(running(), [failed(0, code, reason, disrupted=disruption), pod(1)])
    assert d.status["phase"] == "Restarting" and d.restart_reason == why
    assert (d.status["restarts"], d.status["preemptions"]) == ((1, 0) if counted else (0, 1))
    assert d.status["last_restart_reason"].startswith(f"{why}: pod job-a1-r0 (rank 0)")
    assert cond(d, "Reconciling") == cond(d, "Reconciling") | {"status": "True", "reason": why}
    assert [e.type for e in d.events] == ["Warning"]


def test_a_counted_failure_wins_over_a_disruption_in_the_same_gang() -> None:
    d = decide(running(), [failed(0, EXIT_PREEMPTED), failed(1, 1)])
    assert d.restart_reason == "PodFailed" and d.status["restarts"] == 1


def test_rank0_exit_0_needs_committed_output() -> None:
    gang = [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]
    assert decide(running(), gang, committed=True).status["phase"] == "Succeeded"
    assert (
        decide(running(), gang, committed=None).status["phase"] == "Succeeded"
    )  # pvc://: trust the exit code
    d = decide(running(), gang, committed=False)
    assert d.status["phase"] == "Restarting" and d.restart_reason == "NoOutput" and d.status["restarts"] == 1


def test_other_ranks_finishing_first_is_not_success() -> None:
    d = decide(running(), [pod(0), pod(1, "Succeeded", exit_code=0)])
    assert d.status["phase"] == "Running" and not d.delete_pods


# ---------------------------------------------------------------- backoff and max_restarts


@pytest.mark.parametrize(
    ("before", "wait"), [(0, 10), (1, 20), (2, 40), (3, 80), (4, 160), (5, 300), (9, 300)]
)
def test_backoff_doubles_and_is_capped(before: int, wait: int) -> None:
    s = spec(max_restarts=100)
    d = decide(running(restarts=before), [failed(0), pod(1)], s=s)
    assert state.parse_time(d.status["restart_after"]) == NOW + dt.timedelta(seconds=wait)
    assert state.backoff_seconds(s, before) == wait


def test_preemptions_count_towards_the_backoff_but_not_the_limit() -> None:
    d = decide(running(restarts=3, preemptions=2), [failed(0, EXIT_PREEMPTED), pod(1)])
    assert d.status["phase"] == "Restarting" and d.status["preemptions"] == 3 and d.status["restarts"] == 3
    assert state.parse_time(d.status["restart_after"]) == NOW + dt.timedelta(seconds=300)  # 10 * 2**5, capped


def test_restarting_waits_for_the_old_pods_then_the_backoff_then_creates_the_next_attempt() -> None:
    status = {"phase": "Restarting", "attempt": 1, "restarts": 1, "restart_after": "2026-11-23T12:00:20Z"}
    d = decide(status, [pod(0, "Running", terminating=True), failed(1)])
    assert d.status["phase"] == "Restarting" and d.create_attempt is None and d.delete_pods == ["job-a1-r1"]
    d = decide(status, [])
    assert (
        d.status["phase"] == "Restarting"
        and d.create_attempt is None
        and "starts in 20s" in d.status["message"]
    )
    assert cond(d, "Reconciling")["reason"] == "BackingOff"
    d = decide(status, [], now=NOW + dt.timedelta(seconds=20))
    assert d.create_attempt == 2 and d.status["attempt"] == 2 and d.status["phase"] == "Pending"
    assert "restart_after" not in d.status and d.status["restarts"] == 1 and d.delete_configs_before == 2
    assert [e.reason for e in d.events] == ["Restarted"]


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_max_restarts_exceeded_fails_the_job_with_the_reason(limit: int) -> None:
    s = spec(max_restarts=limit)
    d = decide(running(restarts=limit), [failed(0, 1, "Error", message="CUDA out of memory"), pod(1)], s=s)
    assert d.status["phase"] == "Failed" and d.status["restarts"] == limit and d.status["completion_time"]
    assert f"max_restarts={limit}" in d.status["message"] and "CUDA out of memory" in d.status["message"]
    assert cond(d, "Failed") | {"status": "True", "reason": "MaxRestartsExceeded"} == cond(d, "Failed")
    assert cond(d, "Stalled")["status"] == "True" and cond(d, "Reconciling")["status"] == "False"
    assert d.delete_pods == ["job-a1-r1"]  # the failed pod stays for `kubectl logs`
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Failed")]


def test_a_preemption_at_the_limit_still_restarts() -> None:
    d = decide(running(restarts=3), [failed(0, EXIT_PREEMPTED), pod(1)])
    assert d.status["phase"] == "Restarting"


# ---------------------------------------------------------------- disruptions


def test_unknown_pod_gets_the_timeout_then_the_gang_restarts_without_counting() -> None:
    s = spec(unknown_timeout_seconds=300)
    lost = pod(1, "Unknown", node_down_since=NOW - dt.timedelta(seconds=100))
    d = decide(running(), [pod(0), lost], s=s)
    assert (
        d.status["phase"] == "Running" and not d.delete_pods and "not reporting since" in d.status["message"]
    )
    d = decide(running(), [pod(0), lost], s=s, now=NOW + dt.timedelta(seconds=200))
    assert d.status["phase"] == "Restarting" and d.restart_reason == "NodeLost" and d.status["restarts"] == 0
    assert d.delete_pods == ["job-a1-r0"] and d.force_delete_pods == ["job-a1-r1"]


def test_lost_pods_are_force_deleted_while_waiting_for_them() -> None:
    s = spec(unknown_timeout_seconds=60)
    lost = pod(1, "Unknown", terminating=True, node_down_since=NOW - dt.timedelta(seconds=120))
    d = decide({"phase": "Restarting", "attempt": 1}, [lost], s=s)
    assert d.force_delete_pods == ["job-a1-r1"] and d.create_attempt is None


@pytest.mark.parametrize(
    "gang",
    [
        [pod(0), pod(1, terminating=True)],  # someone deleted a pod
        [pod(0)],  # a pod is gone altogether
        [pod(0), pod(1, disrupted="EvictionByEvictionAPI")],  # kubectl drain
    ],
)
def test_a_pod_taken_away_while_running_restarts_the_gang_uncounted(gang: list[PodObs]) -> None:
    d = decide(running(), gang)
    assert d.status["phase"] == "Restarting" and d.status["restarts"] == 0 and d.status["preemptions"] == 1


def test_pods_of_an_older_attempt_are_cleaned_up() -> None:
    d = decide(running(attempt=2), [pod(0, attempt=2), pod(1, attempt=2), pod(0, "Failed", attempt=1)])
    assert d.status["phase"] == "Running" and d.delete_pods == ["job-a1-r0"]


def test_stuck_image_pull_is_stalled_not_restarted() -> None:
    d = decide(
        {"phase": "Pending", "attempt": 1}, [pod(0, "Pending", waiting_reason="ImagePullBackOff"), pod(1)]
    )
    assert d.status["phase"] == "Pending" and cond(d, "Stalled")["status"] == "True"
    assert cond(d, "Reconciling")["status"] == "False" and [e.reason for e in d.events] == ["Stalled"]
    again = decide(d.status, [pod(0, "Pending", waiting_reason="ImagePullBackOff"), pod(1)])
    assert not again.events  # said once


# ---------------------------------------------------------------- suspend


def test_suspend_deletes_the_pods_and_resume_creates_the_next_attempt() -> None:
    s = spec(suspend=True)
    d = decide(running(), [pod(0), pod(1, terminating=True)], s=s)
    assert d.status["phase"] == "Suspended" and d.delete_pods == ["job-a1-r0"] and d.create_attempt is None
    assert cond(d, "Suspended")["status"] == "True" and cond(d, "Reconciling")["status"] == "True"
    assert [e.reason for e in d.events] == ["Suspended"]
    d = decide(d.status, [], s=s)
    assert cond(d, "Reconciling")["status"] == "False" and not d.events and d.status["attempt"] == 1
    d = decide(d.status, [pod(1, "Running", terminating=True)])  # resumed, but a pod still saves
    assert d.create_attempt is None and d.status["phase"] == "Suspended"
    d = decide(d.status, [])
    assert (
        d.create_attempt == 2
        and d.status["phase"] == "Pending"
        and [e.reason for e in d.events] == ["Resumed"]
    )
    assert d.status["restarts"] == 0 and d.status["preemptions"] == 0


def test_a_job_created_suspended_starts_when_unsuspended() -> None:
    d = decide({}, s=spec(suspend=True))
    assert d.status["phase"] == "Suspended" and d.status["attempt"] == 0 and d.create_attempt is None
    d = decide(d.status)
    assert d.create_attempt == 1 and d.status["attempt"] == 1


def test_suspend_on_a_finished_job_changes_nothing() -> None:
    done = decide(running(), [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]).status
    d = decide(done, [], s=spec(suspend=True))
    assert d.status["phase"] == "Succeeded" and not d.events


# ---------------------------------------------------------------- terminal phases and conditions


def test_terminal_phases_only_stop_the_pods_of_a_failed_job() -> None:
    done = {
        "phase": "Succeeded",
        "attempt": 1,
        "conditions": [{"type": "Succeeded", "status": "True", "reason": "Completed"}],
    }
    d = decide(done, [pod(0, "Succeeded"), pod(1, "Running")])
    assert d.status["phase"] == "Succeeded" and not d.delete_pods and d.create_attempt is None
    assert cond(d, "Succeeded")["reason"] == "Completed" and not d.events
    gone = {
        "phase": "Failed",
        "attempt": 1,
        "conditions": [{"type": "Failed", "status": "True", "reason": "X"}],
    }
    d = decide(gone, [failed(0), pod(1, "Running")])
    assert (
        d.status["phase"] == "Failed"
        and d.delete_pods == ["job-a1-r1"]
        and cond(d, "Failed")["reason"] == "X"
    )


def test_conditions_are_kstatus_shaped_and_keep_their_transition_time() -> None:
    d = decide({"phase": "Pending", "attempt": 1}, [pod(0), pod(1)], generation=4)
    assert d.status["phase"] == "Running" and d.status["observedGeneration"] == 4
    assert {c["type"]: c["status"] for c in d.status["conditions"]} == {
        "Ready": "True", "Reconciling": "False", "Stalled": "False", "Running": "True",
        "Succeeded": "False", "Failed": "False", "Suspended": "False", "ChangesPending": "False",
    }  # fmt: skip
    assert all(c["observedGeneration"] == 4 and c["lastTransitionTime"] for c in d.status["conditions"])
    later = decide(d.status, [pod(0), pod(1)], now=NOW + dt.timedelta(minutes=5), generation=4)
    assert later.status == d.status and not later.events  # nothing changed: nothing to patch


def test_observe_pod_reads_what_the_kubelet_reports() -> None:
    p = state.observe_pod({
        "metadata": {"name": "job-a3-r1", "labels": {LABEL_ATTEMPT: "3", LABEL_RANK: "1"},
                     "deletionTimestamp": "2026-11-23T12:00:00Z"},
        "status": {"phase": "Failed", "conditions": [
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"},
            {"type": "Ready", "status": "False"}],
            "containerStatuses": [{"name": "sidecar", "state": {"running": {}}},
                                  {"name": "trainer", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]},
    })  # fmt: skip
    assert (p.attempt, p.rank, p.phase, p.exit_code, p.reason) == (3, 1, "Failed", 137, "OOMKilled")
    assert p.terminating and p.disrupted == "PreemptionByScheduler" and p.node_down_since is None
    u = state.observe_pod({"metadata": {"name": "x"}, "status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "Unknown", "lastTransitionTime": "2026-11-23T11:00:00Z"}]}})  # fmt: skip
    assert u.node_down_since == NOW - dt.timedelta(hours=1)
    w = state.observe_pod({"metadata": {"name": "x"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}})  # fmt: skip
    assert w.waiting_reason == "ImagePullBackOff"


def test_progress_status_from_progress_json() -> None:
    """A progress.json as older trainers wrote it (no rewards, no store_unreachable) parses as the
    one TrainerProgress type and fills status.progress and status.last_checkpoint."""
    text = json.dumps({"state": "running", "step": 120, "total_steps": 300, "percent": 40, "epoch": 1.2,
                       "loss": 2.31, "tokens_per_second": 5120.0, "eta_seconds": 310.0,
                       "last_checkpoint": {"uri": "s3://b/checkpoints/step-00000100", "step": 100}})  # fmt: skip
    out = state.progress_status(TrainerProgress.from_json(text))
    FineTuneJobStatus.model_validate(out)  # the status types take it as it is
    assert out["progress"]["summary"] == "40% (120/300)" and out["progress"]["loss"] == 2.31
    assert out["last_checkpoint"] == {"uri": "s3://b/checkpoints/step-00000100", "step": 100}
    assert state.progress_status(None) == {}
    bare = state.progress_status(TrainerProgress.from_json('{"step": 2}'))
    assert bare == {"progress": {"step": 2, "total_steps": 0, "percent": 0, "summary": "step 2", "epoch": 0.0,
                                 "state": "starting"}}  # fmt: skip


def test_invalid_spec_fails_the_job() -> None:
    d = state.invalid_spec({"phase": "Running", "attempt": 1}, 2, NOW, "spec.x: bad")
    assert d.status["phase"] == "Failed" and cond(d, "Failed")["reason"] == "InvalidSpec"


def test_a_profile_violation_fails_the_job_once_with_a_warning() -> None:
    message = "spec.parallel_config.nnodes: 3 nodes exceeds max_nodes 2 of profile team-a"
    d = state.profile_violation({"phase": "Pending", "attempt": 1}, 1, NOW, message)
    assert d.status["phase"] == "Failed" and d.status["completion_time"] == "2026-11-23T12:00:00Z"
    assert (cond(d, "Failed")["reason"], cond(d, "Failed")["message"]) == ("ProfileViolation", message)
    assert [(e.type, e.reason, e.message) for e in d.events] == [("Warning", "ProfileViolation", message)]
    again = state.profile_violation(d.status, 1, later(60), message)  # a later reconcile: nothing new
    assert again.events == [] and again.status["completion_time"] == "2026-11-23T12:00:00Z"


# ---------------------------------------------------------------- what real clusters do


def later(seconds: float) -> dt.datetime:
    return NOW + dt.timedelta(seconds=seconds)


def test_a_pod_on_a_node_gone_not_ready_is_read_as_node_down() -> None:
    """The node lifecycle controller flips Ready to False and leaves the phase Running."""
    p = state.observe_pod({"metadata": {"name": "x"}, "status": {"phase": "Running", "conditions": [
        {"type": "ContainersReady", "status": "True"},
        {"type": "Ready", "status": "False", "reason": "NodeNotReady", "lastTransitionTime": "2026-11-23T11:59:00Z"}]}})  # fmt: skip
    assert p.phase == "Running" and p.node_down_since == NOW - dt.timedelta(minutes=1)
    finished = state.observe_pod({"metadata": {"name": "x"}, "status": {"phase": "Running", "conditions": [
        {"type": "ContainersReady", "status": "False"}, {"type": "Ready", "status": "False"}]}})  # fmt: skip
    assert finished.node_down_since is None  # the kubelet itself says the container is not ready


def test_a_not_ready_node_restarts_the_gang_after_the_timeout_and_force_deletes_its_pod() -> None:
    s = spec(unknown_timeout_seconds=60)
    gone = pod(1, node_down_since=NOW - dt.timedelta(seconds=30))
    d = decide(running(), [pod(0), gone], s=s)
    assert d.status["phase"] == "Running" and not d.force_delete_pods
    d = decide(running(), [pod(0), gone], s=s, now=later(30))
    assert d.status["phase"] == "Restarting" and d.restart_reason == "NodeLost"
    assert (d.status["restarts"], d.status["preemptions"]) == (0, 1)
    assert d.force_delete_pods == ["job-a1-r1"] and d.delete_pods == ["job-a1-r0"]


def test_a_pod_terminating_past_its_grace_is_force_deleted() -> None:
    """Deleted by the taint manager (or anyone) on a node whose kubelet is gone: Terminating for ever."""
    due = NOW + dt.timedelta(seconds=40)  # deletionTimestamp: the end of the grace period
    stuck = pod(1, terminating=True, deletion_due=due, disrupted="DeletionByTaintManager")
    waiting = {"phase": "Restarting", "attempt": 1, "restarts": 0, "preemptions": 1}
    assert not decide(waiting, [stuck], now=later(40)).force_delete_pods  # still within its grace
    d = decide(waiting, [stuck], now=later(40 + state.FORCE_DELETE_MARGIN_SECONDS))
    assert d.force_delete_pods == ["job-a1-r1"] and d.create_attempt is None
    assert decide(waiting, [], now=later(60)).create_attempt == 2  # once it is gone, the next attempt


def test_the_trainers_user_error_fails_the_job_at_once_with_its_message() -> None:
    bad = failed(0, EXIT_USER_ERROR, "Error", message="spec.dataset.uri: s3://data/a.json: no such object")
    d = decide(running(), [bad, pod(1)])
    assert d.status["phase"] == "Failed" and d.status["restarts"] == 0 and d.create_attempt is None
    assert cond(d, "Failed")["reason"] == "UserError"
    assert d.status["message"].startswith("spec.dataset.uri: s3://data/a.json: no such object")
    assert d.delete_pods == ["job-a1-r1"]  # its peer goes; the failed pod stays for its logs
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "UserError")]


def test_an_oom_kill_is_counted_with_a_hint() -> None:
    d = decide(running(), [failed(1, 137, "OOMKilled"), pod(0)])
    assert d.restart_reason == "OOMKilled" and d.status["restarts"] == 1
    assert "per_device_train_batch_size" in d.status["message"] and "resources.memory" in d.status["message"]


def test_a_kubelet_eviction_for_disk_pressure_is_counted_and_names_scratch_size() -> None:
    evicted = failed(0, 137, "Evicted", disrupted="TerminationByKubelet",
                     message="The node was low on resource: ephemeral-storage.")  # fmt: skip
    d = decide(running(), [evicted, pod(1)])
    assert d.restart_reason == "Evicted" and d.status["restarts"] == 1
    assert "resources.scratch_size" in d.status["message"]


def test_uncounted_restarts_are_capped_by_max_preemptions() -> None:
    s = spec(max_preemptions=2)
    assert (
        decide(running(preemptions=1), [failed(0, EXIT_PREEMPTED), pod(1)], s=s).status["phase"]
        == "Restarting"
    )
    d = decide(running(preemptions=2), [failed(0, EXIT_PREEMPTED), pod(1)], s=s)
    assert d.status["phase"] == "Failed" and cond(d, "Failed")["reason"] == "TooManyPreemptions"
    assert "max_preemptions=2" in d.status["message"]


def pending(waited: float, **kw: object) -> dict:
    began = NOW - dt.timedelta(seconds=waited)
    return {"phase": "Pending", "attempt": 1, "attempt_start_time": state.iso(began), **kw}


@pytest.mark.parametrize(
    ("gang", "reason", "words"),
    [
        ([pod(0, "Pending", gated=True), pod(1, "Pending", gated=True)], "WaitingForAdmission", "Kueue"),
        ([pod(0), pod(1, "Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")],
         "Unschedulable", "Insufficient nvidia.com/gpu"),
        ([pod(0), pod(1, "Pending", waiting_reason="ContainerCreating")], "PendingTimeout", "not all pods running"),
    ],
)  # fmt: skip
def test_a_gang_not_started_by_the_pending_timeout_is_stalled_with_the_reason(
    gang: list[PodObs], reason: str, words: str
) -> None:
    s = spec(pending_timeout_seconds=900)
    d = decide(pending(899), gang, s=s)
    assert cond(d, "Stalled")["status"] == "False" and cond(d, "Reconciling")["status"] == "True"
    if reason != "PendingTimeout":
        assert cond(d, "Reconciling")["reason"] == reason and words in d.status["message"]
    d = decide(pending(900), gang, s=s)
    assert d.status["phase"] == "Pending" and not d.delete_pods  # it keeps waiting, but says so
    stalled = cond(d, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == reason and words in stalled["message"]
    assert (
        "900s after attempt 1 began (restart_policy.pending_timeout_seconds)" in stalled["message"]
        and cond(d, "Reconciling")["status"] == "False"
    )
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "Stalled")]
    again = decide(d.status, gang, s=s, now=later(5))
    assert not again.events  # one event per stall


def test_past_the_active_deadline_the_job_fails_and_its_pods_go() -> None:
    s = spec()
    s.active_deadline_seconds = 3600
    status = running(start_time=state.iso(NOW - dt.timedelta(hours=2)),
                     active_since=state.iso(NOW - dt.timedelta(seconds=3599)))  # fmt: skip
    assert decide(status, [pod(0), pod(1)], s=s).status["phase"] == "Running"  # resumed 3599 s ago
    d = decide(status, [pod(0), pod(1)], s=s, now=later(1))
    assert d.status["phase"] == "Failed" and cond(d, "Failed")["reason"] == "DeadlineExceeded"
    assert d.delete_pods == ["job-a1-r0", "job-a1-r1"]
    resumed = decide(
        {"phase": "Suspended", "attempt": 1, "active_since": status["active_since"]}, [], s=s, now=later(10)
    )
    assert resumed.status["active_since"] == state.iso(later(10))  # the clock restarts on resume


def test_a_gang_that_stops_making_progress_is_restarted_counted() -> None:
    s = spec(progress_timeout_seconds=600)
    status = running(attempt_start_time=state.iso(NOW - dt.timedelta(hours=1)),
                     progress_advanced_at=state.iso(NOW - dt.timedelta(seconds=599)), progress={"step": 40})  # fmt: skip
    assert decide(status, [pod(0), pod(1)], s=s).status["phase"] == "Running"
    d = decide(status, [pod(0), pod(1)], s=s, now=later(1))
    assert (
        d.status["phase"] == "Restarting" and d.restart_reason == "NoProgress" and d.status["restarts"] == 1
    )
    assert "step 40" in d.status["message"] and "progress_timeout_seconds=600" in d.status["message"]
    s.restart_policy.progress_timeout_seconds = 0  # disabled
    assert decide(status, [pod(0), pod(1)], s=s, now=later(10**6)).status["phase"] == "Running"


def test_a_gang_past_its_last_step_is_not_restarted_for_no_progress() -> None:
    # exporting, uploading and evaluating the final model advance no step; that is not a hang
    s = spec(progress_timeout_seconds=600)
    status = running(attempt_start_time=state.iso(NOW - dt.timedelta(hours=1)),
                     progress_advanced_at=state.iso(NOW - dt.timedelta(hours=1)),
                     progress={"step": 100, "total_steps": 100, "state": "done"})  # fmt: skip
    assert decide(status, [pod(0), pod(1)], s=s, now=later(10**4)).status["phase"] == "Running"
    status["progress"]["state"] = "saving"  # the last step done, the final model being written
    assert decide(status, [pod(0), pod(1)], s=s, now=later(10**4)).status["phase"] == "Running"
    status["progress"].update(state="running", step=99)
    assert decide(status, [pod(0), pod(1)], s=s, now=later(10**4)).status["phase"] == "Restarting"


def edited(image: str = "registry.example/trainer:0.2") -> FineTuneJobSpec:
    s = spec()
    s.image = image
    return s


def test_a_spec_edit_while_the_gang_is_starting_replaces_it_uncounted() -> None:
    applied = state.spec_digests(spec())
    d = decide(pending(10, applied_spec=applied), [pod(0), pod(1, "Pending", waiting_reason="ImagePullBackOff")],
               s=edited())  # fmt: skip
    assert d.status["phase"] == "Restarting" and d.restart_reason == "SpecChanged"
    assert (d.status["restarts"], d.status["preemptions"]) == (0, 0) and "spec.image" in d.status["message"]
    assert d.delete_pods == ["job-a1-r0", "job-a1-r1"]
    nxt = decide(d.status, [], s=edited())
    assert nxt.create_attempt == 2 and nxt.status["applied_spec"] == state.spec_digests(edited())


def test_a_spec_edit_while_running_waits_for_the_next_attempt_and_says_so() -> None:
    applied = state.spec_digests(spec())
    d = decide(running(applied_spec=applied), [pod(0), pod(1)], s=edited(), generation=3)
    assert d.status["phase"] == "Running" and not d.delete_pods and d.status["observedGeneration"] == 3
    pending_cond = cond(d, "ChangesPending")
    assert pending_cond["status"] == "True" and "spec.image" in pending_cond["message"]
    assert "next attempt" in pending_cond["message"] and d.status["pending_changes"] == ["image"]
    restarted = decide(d.status, [failed(0, EXIT_PREEMPTED), pod(1)], s=edited())
    nxt = decide(restarted.status, [], s=edited(), now=later(600))
    assert nxt.create_attempt == 2 and cond(nxt, "ChangesPending")["status"] == "False"


def test_after_success_the_other_ranks_get_a_grace_then_go() -> None:
    done = {"phase": "Succeeded", "attempt": 1, "completion_time": state.iso(NOW)}
    gang = [pod(0, "Succeeded", exit_code=0), pod(1)]
    assert not decide(done, gang, now=later(state.SUCCESS_GRACE_SECONDS - 1)).delete_pods
    assert decide(done, gang, now=later(state.SUCCESS_GRACE_SECONDS)).delete_pods == ["job-a1-r1"]


def test_a_finished_job_is_deleted_after_its_ttl() -> None:
    s = spec()
    s.ttl_seconds_after_finished = 3600
    done = {"phase": "Failed", "attempt": 1, "completion_time": state.iso(NOW)}
    assert not decide(done, [], s=s, now=later(3599)).delete_job
    assert decide(done, [], s=s, now=later(3600)).delete_job
    assert not decide(done, [], now=later(10**6)).delete_job  # no ttl: kept


def test_a_gated_pod_is_read_as_waiting_for_admission() -> None:
    p = state.observe_pod({"metadata": {"name": "x"}, "spec": {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]},
                           "status": {"phase": "Pending", "conditions": [
                               {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}})  # fmt: skip
    assert p.gated and p.unschedulable is None
