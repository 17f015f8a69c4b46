"""The Argo CD health check shipped with the chart (helm/kubetune/argocd-health.lua), run by a real
Lua 5.1 interpreter (Argo CD's gopher-lua is 5.1) against statuses the operator's state machine
writes for every phase.

[argocd] https://argo-cd.readthedocs.io/en/stable/operator-manual/health/#custom-health-checks
The script sees the resource as the global `obj` and returns a table with `status` (Healthy,
Progressing, Degraded, Suspended, Missing, Unknown) and `message`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51

from kubetune.conventions import EXIT_USER_ERROR
from kubetune.progress import TrainerProgress
from kubetune.spec import FineTuneJobSpec
from kubetune_operator import state
from kubetune_operator.state import PodObs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "helm" / "kubetune" / "argocd-health.lua"
CHART_README = ROOT / "helm" / "kubetune" / "README.md"
HEALTH_KEY = "resource.customizations.health.kubetune.io_FineTuneJob"
NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)


def spec(**spec: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/tiny"}, "dataset": {"uri": "s3://data/a.json"},
        "output": {"uri": "s3://runs/job"}, "parallel_config": {"nnodes": 2},
        "restart_policy": {"max_restarts": 1, "backoff_seconds": 10, "pending_timeout_seconds": 900},
        **spec,
    })  # fmt: skip


def pod(rank: int, phase: str = "Running", **kw: Any) -> PodObs:
    return PodObs(name=f"job-a1-r{rank}", attempt=1, rank=rank, phase=phase, **kw)


def decide(status: dict, pods: list[PodObs] = (), s: FineTuneJobSpec | None = None) -> dict:  # type: ignore[assignment]
    """The status the operator writes after observing `pods`."""
    return state.decide(state.Observed(s or spec(), status, 1, tuple(pods), NOW, True)).status


def running() -> dict:
    return decide({"phase": "Pending", "attempt": 1}, [pod(0), pod(1)])


def started(seconds_ago: float) -> dict:
    return {
        "phase": "Pending",
        "attempt": 1,
        "attempt_start_time": state.iso(NOW - dt.timedelta(seconds=seconds_ago)),
    }


def job(status: dict | None, generation: int = 1) -> dict:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "job", "namespace": "default", "generation": generation},
        "spec": spec().model_dump(mode="json", exclude_none=True),
    }
    if status is not None:
        doc["status"] = status
    return json.loads(json.dumps(doc))  # what Argo CD hands the script: plain JSON values


def health(obj: dict) -> dict[str, str]:
    """Run the script as Argo CD does: `obj` global, a chunk returning `hs`; no io, os or require."""
    lua = lua51.LuaRuntime()
    g = lua.globals()
    for name in ("io", "os", "require", "package", "dofile", "loadfile"):
        g[name] = None
    g.obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT.read_text())
    return {k: hs[k] for k in hs}


def stalled_message(status: dict) -> str:
    c = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert c["status"] == "True"
    return c["message"]


def test_no_status_yet_is_progressing() -> None:
    assert health(job(None)) == {
        "status": "Progressing",
        "message": "Waiting for the kubetune operator to pick the job up",
    }


def test_pending_is_progressing_with_the_operators_message() -> None:
    status = decide({})
    assert status["phase"] == "Pending"
    assert health(job(status)) == {"status": "Progressing", "message": status["message"]}


def test_running_is_progressing_and_says_how_far() -> None:
    status = running()
    assert status["phase"] == "Running"
    assert health(job(status)) == {"status": "Progressing", "message": status["message"]}  # no progress yet
    status |= state.progress_status(TrainerProgress(state="running", step=9, total_steps=20, loss=1.5))
    assert health(job(status)) == {"status": "Progressing", "message": "Running: 45% (9/20)"}


def test_restarting_is_progressing() -> None:
    status = decide(running(), [pod(0, "Failed", exit_code=1, reason="Error"), pod(1)])
    assert status["phase"] == "Restarting"
    assert health(job(status)) == {"status": "Progressing", "message": status["message"]}


def test_succeeded_is_healthy() -> None:
    status = decide(running(), [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)])
    assert status["phase"] == "Succeeded"
    assert health(job(status)) == {"status": "Healthy", "message": status["message"]}


FAILURES = {
    "restarts used up": (lambda: decide({**running(), "restarts": 1}, [pod(0, "Failed", exit_code=1, reason="Error"), pod(1)])),
    "user error": (lambda: decide(running(), [pod(0, "Failed", exit_code=EXIT_USER_ERROR, reason="Error",
                                                  message="dataset row 3: missing field 'output'"), pod(1)])),
    "deadline": (lambda: decide({**running(), "start_time": state.iso(NOW - dt.timedelta(hours=2))},
                                [pod(0), pod(1)], s=spec(active_deadline_seconds=3600))),
}  # fmt: skip


@pytest.mark.parametrize("how", FAILURES)
def test_failed_is_degraded_whatever_the_reason(how: str) -> None:
    status = FAILURES[how]()
    assert status["phase"] == "Failed", status
    assert health(job(status)) == {"status": "Degraded", "message": status["message"]}


STUCK = {
    "unschedulable": [pod(0), pod(1, "Pending", unschedulable="0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")],
    "gated by Kueue": [pod(0, "Pending", gated=True), pod(1, "Pending", gated=True)],
    "image pull": [pod(0, "Pending", waiting_reason="ImagePullBackOff"), pod(1)],
}  # fmt: skip


@pytest.mark.parametrize("how", STUCK)
def test_stalled_while_pending_is_degraded_with_the_conditions_message(how: str) -> None:
    status = decide(started(900), STUCK[how])
    assert status["phase"] == "Pending"
    got = health(job(status))
    assert got["status"] == "Degraded"
    assert got["message"].endswith(stalled_message(status))


def test_pending_not_yet_stalled_is_progressing() -> None:
    status = decide(started(60), STUCK["unschedulable"])
    assert status["phase"] == "Pending"
    assert health(job(status))["status"] == "Progressing"


def test_suspended_is_suspended() -> None:
    status = decide(running(), [], s=spec(suspend=True))
    assert status["phase"] == "Suspended"
    assert health(job(status)) == {"status": "Suspended", "message": status["message"]}


@pytest.mark.parametrize("phase", ["running", "succeeded", "failed"])
def test_a_status_older_than_the_spec_is_progressing(phase: str) -> None:
    """kstatus: observedGeneration behind metadata.generation means the edit is not reflected yet."""
    status = {
        "running": running,
        "succeeded": lambda: decide(
            running(), [pod(0, "Succeeded", exit_code=0), pod(1, "Succeeded", exit_code=0)]
        ),
        "failed": FAILURES["user error"],
    }[phase]()
    assert status["observedGeneration"] == 1
    assert health(job(status, generation=2)) == {
        "status": "Progressing",
        "message": "Waiting for the kubetune operator to observe generation 2",
    }


def test_a_phase_it_does_not_know_is_unknown() -> None:
    assert health(job({**running(), "phase": "Hibernating"})) == {
        "status": "Unknown",
        "message": "Unknown phase Hibernating",
    }


def test_every_phase_of_the_state_machine_is_mapped() -> None:
    phases = {v for k, v in vars(state).items() if re.fullmatch(r"[A-Z]+", k) and isinstance(v, str)}
    assert phases >= {"Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"}
    for phase in phases:
        assert health(job({**running(), "phase": phase}))["status"] != "Unknown", phase


def test_the_chart_readme_shows_the_script_as_the_argocd_cm_entry() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", CHART_README.read_text(), re.S)
    cm = next(
        doc for doc in map(yaml.safe_load, blocks) if doc.get("metadata", {}).get("name") == "argocd-cm"
    )
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["namespace"] == "argocd"
    assert cm["data"][HEALTH_KEY] == SCRIPT.read_text()
