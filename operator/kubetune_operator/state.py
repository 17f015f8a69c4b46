"""The FineTuneJob state machine: a pure function from what is observed to what to do.

    decide(Observed(spec, status, generation, pods, now, output_committed)) -> Decision

No kopf, no API calls, no clock: handlers.py reads the job and its pods, calls `decide`, and applies
the Decision in a crash-safe order (status first, then creates and deletes). Everything the machine
needs to continue lives in the job's status (phase, attempt, restarts, restart_after) and in the
pods' labels (attempt, rank), so any operator process can pick a job up at any point.

Phases:

    (new) -> Pending -> Running -> Succeeded
                 \\         |
                  +--> Restarting -> Pending (attempt + 1)     ... -> Failed (max_restarts exceeded)
    any -> Suspended (spec.suspend) -> Pending (attempt + 1) when resumed

- Pending: the gang of the current attempt is being created or scheduled. Missing pods are created
  (deterministic names, so a second create is a harmless 409).
- Running: every pod of the attempt is Running.
- Restarting: a pod failed, was evicted or deleted, or its node stopped reporting (Ready Unknown, or
  False for a node reason with the phase left Running) past restart_policy.unknown_timeout_seconds.
  The attempt's pods are deleted; pods no kubelet will finish (node down past the timeout, or
  Terminating FORCE_DELETE_MARGIN_SECONDS past their deletionTimestamp) are force-deleted. Once they
  are all gone and the backoff (backoff_seconds * 2**k, capped at max_backoff_seconds, k = restarts
  so far) has passed, attempt + 1 is created and the trainer resumes from the newest checkpoint.
- Failure classes: exit EXIT_PREEMPTED (the trainer committed on SIGTERM), SIGTERM (143), drain and
  scheduler preemption, graceful node shutdown, pod deletion and node loss are disruptions, counted
  in `preemptions` (Failed, TooManyPreemptions, past restart_policy.max_preemptions). Exit
  EXIT_USER_ERROR (65) fails the job at once (UserError, the termination message as the reason).
  Anything else counts in `restarts` (OOMKilled and kubelet evictions with a hint); one more than
  max_restarts allows makes the job Failed. A Running gang whose step has not advanced for
  progress_timeout_seconds is restarted (NoProgress, counted). Past spec.active_deadline_seconds the
  job is Failed (DeadlineExceeded).
- Pending too long: past restart_policy.pending_timeout_seconds the job is Stalled with the reason
  (Unschedulable, WaitingForAdmission for gated pods, PendingTimeout); image errors stall at once.
- Spec edits: a pod-shaping field (POD_FIELDS) edited while the attempt is still Pending replaces its
  gang (not counted); while Running, ChangesPending=True names the fields until the next attempt.
- Succeeded: rank 0 exited 0 and the output is committed (output_committed is True, or None when the
  operator cannot read the store, e.g. pvc://). Rank 0 exiting 0 without output is a failure.
  Other ranks still running SUCCESS_GRACE_SECONDS later are deleted; a Failed job's running pods at
  once. spec.ttl_seconds_after_finished then deletes the job itself.
- Suspended: spec.suspend deletes the pods (the trainer checkpoints on SIGTERM); unsuspending
  creates attempt + 1. Neither counts as a restart.

Conditions follow kstatus (so Argo CD and Flux see progress): Reconciling is True while the operator
is converging (creating, restarting, suspending), Stalled is True when the job cannot progress
without help (Failed, or pods stuck on an image or config error), Ready is True while the job is
Running or Succeeded. Running, Succeeded, Failed and Suspended mirror the phase, so
`kubectl wait --for=condition=Succeeded ftj/NAME` works. Every condition carries observedGeneration.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel

from kubetune.conventions import EXIT_PREEMPTED, EXIT_USER_ERROR, LABEL_ATTEMPT, LABEL_RANK
from kubetune.evaluation import EvaluationResults
from kubetune.locations import FINAL_DIR, output_uri
from kubetune.profiles import PROFILE_VIOLATION
from kubetune.progress import TrainerProgress
from kubetune.spec import (
    EVALUATED_ERROR,
    EVALUATED_FAILED,
    EVALUATED_MISSING,
    EVALUATED_NO_THRESHOLDS,
    EVALUATED_PASSED,
    EVALUATED_UNAVAILABLE,
    EVALUATION_RETRY_SECONDS,
    FineTuneJobSpec,
    Progress,
    Reason,
)

PENDING, RUNNING, RESTARTING = "Pending", "Running", "Restarting"
SUCCEEDED, FAILED, SUSPENDED = "Succeeded", "Failed", "Suspended"
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = (
    "Ready", "Reconciling", "Stalled", "Running", "Succeeded", "Failed", "Suspended", "ChangesPending",
)  # fmt: skip

EXIT_SIGTERM = 128 + 15  # a process killed by SIGTERM that did not handle it
# Container waiting reasons that will not go away by waiting: the job is Stalled until someone acts.
STUCK_WAITING = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError",
}  # fmt: skip
# Pod reasons that say the pod was taken away, not that the training failed (graceful node shutdown,
# old node controllers). A kubelet eviction for node pressure (reason Evicted) is a failure: the job's
# own disk or memory use caused it, and restarting it uncounted would loop for ever.
DISRUPTION_REASONS = {"Preempting", "NodeLost", "NodeShutdown", "Terminated", "Shutdown"}
# Ready-condition reasons the node lifecycle controller sets when a node stops reporting.
NODE_DOWN_REASONS = {"NodeNotReady", "NodeStatusUnknown", "NodeLost", "NodeUnreachable"}
# A pod still Terminating this long after its deletionTimestamp has no kubelet to finish it.
FORCE_DELETE_MARGIN_SECONDS = 10
# After Succeeded, ranks still running this long are deleted (they hold GPUs and a Kueue pod group).
SUCCESS_GRACE_SECONDS = 30
# Spec fields that shape the pods: an edit reaches pods only through a new attempt.
POD_FIELDS = ("image", "image_pull_policy", "resources", "storage", "pod")
OOM_HINT = (
    "lower training.per_device_train_batch_size, set training.gradient_checkpointing: true, "
    "or raise resources.memory"
)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# ---------------------------------------------------------------- what is observed


@dataclass(frozen=True)
class PodObs:
    """One pod of the job, as far as the state machine cares."""

    name: str
    attempt: int
    rank: int
    phase: str = "Pending"  # Pending, Running, Succeeded, Failed, Unknown
    exit_code: int | None = None  # of the trainer container, once it terminated
    reason: str | None = None  # terminated reason (OOMKilled, Error) or the pod's (Evicted)
    message: str | None = None
    waiting_reason: str | None = None  # ImagePullBackOff, ContainerCreating, ...
    unschedulable: str | None = None  # the scheduler's message while unschedulable
    terminating: bool = False  # deletionTimestamp set
    deletion_due: dt.datetime | None = None  # deletionTimestamp: when the grace period ends
    disrupted: str | None = None  # DisruptionTarget condition reason (eviction, preemption, node loss)
    node_down_since: dt.datetime | None = (
        None  # its node stopped reporting (Ready Unknown, or False for a node reason)
    )
    gated: bool = False  # held by scheduling gates (Kueue admission)


def observe_pod(pod: dict[str, Any], container: str = "trainer") -> PodObs:
    """Read a pod object (as the API returns it) into a PodObs."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    statuses = status.get("containerStatuses") or []
    main = next((s for s in statuses if s.get("name") == container), statuses[0] if statuses else {})
    state = main.get("state") or {}
    terminated, waiting = state.get("terminated") or {}, state.get("waiting") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget") or {}
    ready = conditions.get("Ready") or {}
    scheduled = conditions.get("PodScheduled") or {}
    phase = status.get("phase") or "Pending"
    # The node lifecycle controller flips Ready to False (or Unknown) on the pods of a node that stopped
    # reporting and leaves the phase Running; a kubelet would have marked the container not ready too.
    containers_ready = (conditions.get("ContainersReady") or {}).get("status") == "True"
    node_down = phase == "Unknown" or ready.get("status") == "Unknown" or (
        phase == "Running" and ready.get("status") == "False"
        and (ready.get("reason") in NODE_DOWN_REASONS or containers_ready)
    )  # fmt: skip
    node_down_since = None
    if node_down:
        node_down_since = parse_time(ready.get("lastTransitionTime")) or parse_time(status.get("startTime"))
    spec = pod.get("spec") or {}
    return PodObs(
        name=meta.get("name", ""),
        attempt=int(labels.get(LABEL_ATTEMPT, 0) or 0),
        rank=int(labels.get(LABEL_RANK, 0) or 0),
        phase=phase,
        exit_code=terminated.get("exitCode"),
        # a pod-level reason (Evicted, Terminated by a node shutdown) says more than the container's Error
        reason=status.get("reason") or terminated.get("reason"),
        message=(status.get("message") if status.get("reason") else None) or terminated.get("message"),
        waiting_reason=waiting.get("reason"),
        unschedulable=scheduled.get("message") if scheduled.get("reason") == "Unschedulable" else None,
        terminating=bool(meta.get("deletionTimestamp")),
        deletion_due=parse_time(meta.get("deletionTimestamp")),
        disrupted=(disruption.get("reason") or "Disrupted") if disruption.get("status") == "True" else None,
        node_down_since=node_down_since,
        gated=bool(spec.get("schedulingGates")) or scheduled.get("reason") == "SchedulingGated",
    )


@dataclass(frozen=True)
class Observed:
    spec: FineTuneJobSpec
    status: dict[str, Any]
    generation: int
    pods: tuple[PodObs, ...]
    now: dt.datetime
    output_committed: bool | None = None  # True/False from the store; None: cannot tell (trust exit 0)
    evaluation: EvaluationRead | None = None  # eval/results.json as read once rank 0 exited (spec.evaluation)


@dataclass(frozen=True)
class EvaluationRead:
    """What the operator found at <output>/eval/results.json."""

    doc: dict[str, Any] | None  # the parsed file; None when it is not there
    uri: str  # where it was looked for
    readable: bool = True  # False: the operator cannot read the output (pvc://, store errors)
    error: str | None = None  # a store error (it may pass: the read is tried again)


# ---------------------------------------------------------------- what to do


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: dict[str, Any]  # the whole new status (patch it first)
    create_attempt: int | None = None  # create the missing objects of this attempt's gang
    delete_pods: list[str] = field(default_factory=list)
    force_delete_pods: list[str] = field(default_factory=list)  # on lost nodes: no kubelet will finish them
    delete_configs_before: int | None = None  # delete config maps of attempts older than this
    events: list[Event] = field(default_factory=list)
    restart_reason: str | None = None  # set when this decision restarts the gang (for metrics)
    delete_job: bool = False  # ttl_seconds_after_finished has passed


@dataclass(frozen=True)
class Trouble:
    """Why the current attempt cannot go on."""

    counted: bool  # counts against max_restarts (a failure), or not (a disruption)
    reason: str  # CamelCase
    message: str
    fatal: bool = False  # retrying cannot help (a user error): fail at once


def backoff_seconds(spec: FineTuneJobSpec, restarts_so_far: int) -> float:
    """Wait before attempt k+1: backoff_seconds * 2**k, capped at max_backoff_seconds."""
    p = spec.restart_policy
    return float(min(p.backoff_seconds * 2 ** min(restarts_so_far, 30), p.max_backoff_seconds))


def spec_digests(spec: FineTuneJobSpec) -> dict[str, str]:
    """A short digest of each pod-shaping field (POD_FIELDS): what an attempt's pods were built from."""
    out = {}
    for name in POD_FIELDS:
        value = getattr(spec, name)
        data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        out[name] = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    return out


def _since(now: dt.datetime, then: dt.datetime) -> float:
    return (now - then).total_seconds()


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _eviction_hint(p: PodObs) -> str:
    text = p.message or ""
    if "ephemeral" in text:
        return "; raise resources.scratch_size (or use resources.scratch_volume)"
    if "memory" in text:
        return "; raise resources.memory"
    return ""


def _pod_trouble(p: PodObs, now: dt.datetime, unknown_timeout: float) -> Trouble | None:
    who = f"pod {p.name} (rank {p.rank})"
    if p.terminating:
        return Trouble(False, Reason.POD_DELETED, f"{who} is being deleted")
    if p.phase == "Failed":
        detail = f"exit code {p.exit_code}" if p.exit_code is not None else "no exit code"
        if p.reason:
            detail += f", {p.reason}"
        if p.exit_code == EXIT_USER_ERROR:  # the trainer's one-line reason is the termination message
            return Trouble(
                True, Reason.USER_ERROR, _last_line(p.message) or f"{who} reported a user error", fatal=True
            )
        if p.message:
            detail += f": {p.message.strip()[:200]}"
        if p.reason == "Evicted":  # the kubelet, for node pressure the job itself caused
            return Trouble(
                True, Reason.EVICTED, f"{who} was evicted by its node ({detail}){_eviction_hint(p)}"
            )
        if p.reason == "OOMKilled":
            return Trouble(True, Reason.OOM_KILLED, f"{who} ran out of memory ({detail}); {OOM_HINT}")
        if p.disrupted or p.reason in DISRUPTION_REASONS:
            return Trouble(
                False, Reason.DISRUPTED, f"{who} was disrupted ({p.disrupted or p.reason}; {detail})"
            )
        if p.exit_code == EXIT_PREEMPTED:
            return Trouble(False, Reason.PREEMPTED, f"{who} was preempted and saved a checkpoint ({detail})")
        if p.exit_code == EXIT_SIGTERM:
            return Trouble(False, Reason.TERMINATED, f"{who} was terminated by SIGTERM ({detail})")
        return Trouble(True, Reason.POD_FAILED, f"{who} failed ({detail})")
    if p.node_down_since is not None:
        stuck = _since(now, p.node_down_since)
        if stuck >= unknown_timeout:
            return Trouble(False, Reason.NODE_LOST, f"{who}: its node has not reported for {int(stuck)}s")
    if p.disrupted and p.phase != "Succeeded":
        return Trouble(False, Reason.DISRUPTED, f"{who} is being disrupted ({p.disrupted})")
    return None


def _trouble(o: Observed, pods: list[PodObs], phase: str | None) -> Trouble | None:
    """The reason the current attempt has to go, if any: a user error wins, then a counted failure."""
    found = [t for p in pods if (t := _pod_trouble(p, o.now, o.spec.restart_policy.unknown_timeout_seconds))]
    ranks = {p.rank for p in pods}
    missing = [r for r in range(o.spec.parallel_config.nnodes) if r not in ranks]
    if missing and phase == RUNNING:
        found.append(Trouble(False, Reason.POD_DELETED, f"pods of ranks {missing} are gone"))
    rank0 = next((p for p in pods if p.rank == 0), None)
    if rank0 is not None and rank0.phase == "Succeeded" and o.output_committed is False:
        found.append(
            Trouble(True, Reason.NO_OUTPUT, f"rank 0 ({rank0.name}) exited 0 but no output was committed")
        )
    found.sort(key=lambda t: (not t.fatal, not t.counted))
    return found[0] if found else None


def _unreachable(p: PodObs, now: dt.datetime, unknown_timeout: float) -> bool:
    """No kubelet will finish this pod: its node stopped reporting, or its deletion is long overdue."""
    if p.node_down_since is not None and _since(now, p.node_down_since) >= unknown_timeout:
        return True
    return p.deletion_due is not None and _since(now, p.deletion_due) >= FORCE_DELETE_MARGIN_SECONDS


# ---------------------------------------------------------------- status helpers


def _conditions(
    old: list[dict[str, Any]], now: dt.datetime, generation: int, values: dict[str, tuple[bool, str, str]]
) -> list[dict[str, Any]]:
    """Standard conditions: lastTransitionTime moves only when the status flips."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for ctype, (value, reason, message) in values.items():
        status = "Unknown" if value is None else "True" if value else "False"
        before = previous.get(ctype) or {}
        since = before.get("lastTransitionTime") if before.get("status") == status else None
        out.append({
            "type": ctype, "status": status, "reason": reason, "message": message[:1000],
            "lastTransitionTime": since or iso(now), "observedGeneration": generation,
        })  # fmt: skip
    return out


def _status(
    o: Observed,
    phase: str,
    reason: str,
    message: str,
    *,
    stalled: tuple[str, str] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """The new status for `phase`: counters carried over, conditions recomputed.

    `stalled` is (reason, message) when the job cannot progress without someone acting."""
    s = {k: v for k, v in o.status.items() if k not in ("conditions",)}
    s.update(changes)
    s["phase"] = phase
    s["message"] = message
    s["observedGeneration"] = o.generation
    for key in ("attempt", "restarts", "preemptions"):
        s.setdefault(key, 0)
    converging = phase in (PENDING, RESTARTING) or (phase == SUSPENDED and reason == Reason.SUSPENDING)
    ready_reason = {RUNNING: "Running", SUCCEEDED: "Succeeded"}.get(phase, reason)
    stuck_reason, stuck_message = stalled or ("", "")
    pending = s.get("pending_changes") or []
    values = {
        "Ready": (phase in (RUNNING, SUCCEEDED), ready_reason, message),
        "Reconciling": (converging and not stalled, reason if converging else Reason.IDLE, message if converging else ""),
        "Stalled": (phase == FAILED or stalled is not None, reason if phase == FAILED else stuck_reason,
                    message if phase == FAILED else stuck_message),
        "Running": (phase == RUNNING, reason if phase == RUNNING else phase, message if phase == RUNNING else ""),
        "Succeeded": (phase == SUCCEEDED, reason if phase == SUCCEEDED else phase, message if phase == SUCCEEDED else ""),
        "Failed": (phase == FAILED, reason if phase == FAILED else phase, message if phase == FAILED else ""),
        "Suspended": (phase == SUSPENDED, reason if phase == SUSPENDED else phase, message if phase == SUSPENDED else ""),
        "ChangesPending": (bool(pending), Reason.SPEC_EDITED if pending else Reason.NO_CHANGES,
                           _pending_message(pending, s.get("attempt", 0)) if pending else ""),
    }  # fmt: skip
    evaluation = s.get("evaluation")
    if evaluation:  # for `kubectl wait --for=condition=Evaluated` (a GitOps promotion gate)
        values["Evaluated"] = (
            evaluation.get("passed"),
            evaluation["reason"],
            evaluation.get("message") or "",
        )
    s["conditions"] = _conditions(o.status.get("conditions") or [], o.now, o.generation, values)
    return {k: v for k, v in s.items() if v is not None}


def _pending_message(fields: list[str], attempt: int) -> str:
    names = ", ".join(f"spec.{f}" for f in fields)
    return f"{names} changed while attempt {attempt} runs: the change takes effect at the next attempt"


def _not_deleting(pods: list[PodObs]) -> list[str]:
    return sorted(p.name for p in pods if not p.terminating)


def _unfinished(pods: list[PodObs]) -> list[PodObs]:
    return [p for p in pods if p.phase not in ("Succeeded", "Failed")]


# ---------------------------------------------------------------- the machine


def decide(o: Observed) -> Decision:
    """What to do next for one job (see the module docstring)."""
    events = []
    if o.evaluation is not None:
        evaluation = evaluation_status(o.evaluation, _evaluation_retry_until(o))
        if evaluation != (o.status or {}).get("evaluation"):
            kind = "Normal" if evaluation.get("passed") else "Warning"
            events.append(Event(kind, evaluation["reason"], evaluation["message"]))
        o = replace(o, status={**(o.status or {}), "evaluation": evaluation})
    d = _decide(o)
    d.events += events
    # Pods on a lost node never finish a graceful deletion (no kubelet is left to confirm it).
    timeout = o.spec.restart_policy.unknown_timeout_seconds
    lost = {p.name for p in o.pods if _unreachable(p, o.now, timeout)}
    d.force_delete_pods = sorted(lost)
    d.delete_pods = [n for n in d.delete_pods if n not in lost]
    return d


def invalid_spec(status: dict[str, Any], generation: int, now: dt.datetime, message: str) -> Decision:
    """A stored spec this operator cannot read (e.g. the CRD on the cluster is older): Failed."""
    o = Observed(spec=None, status=status, generation=generation, pods=(), now=now)  # type: ignore[arg-type]
    changes = {} if status.get("phase") == FAILED else {"completion_time": iso(now)}
    return Decision(_status(o, FAILED, Reason.INVALID_SPEC, message, **changes))


def profile_violation(status: dict[str, Any], generation: int, now: dt.datetime, message: str) -> Decision:
    """The effective spec breaks its profile's limits (or names a profile or model that is not there):
    Failed at once, with a Warning Event; the pods, if any, go with the Failed phase (`_finished`)."""
    o = Observed(spec=None, status=status, generation=generation, pods=(), now=now)  # type: ignore[arg-type]
    first = status.get("phase") != FAILED
    d = Decision(
        _status(o, FAILED, PROFILE_VIOLATION, message, **({"completion_time": iso(now)} if first else {}))
    )
    if first:
        d.events.append(Event("Warning", PROFILE_VIOLATION, message))
    return d


def _evaluation_retry_until(o: Observed) -> dt.datetime | None:
    """Until when a store error reading the results is tried again: EVALUATION_RETRY_SECONDS from the
    first failed read; None once that has passed."""
    before = ((o.status or {}).get("evaluation") or {}).get("retry_until")
    until = parse_time(before) if before else o.now + dt.timedelta(seconds=EVALUATION_RETRY_SECONDS)
    return until if until is not None and o.now < until else None


def rereads_evaluation(status: dict[str, Any]) -> bool:
    """Whether a Succeeded job's results are read again: the last read hit a store error (once its
    retry window has passed, one last read settles the condition)."""
    return status.get("phase") == SUCCEEDED and bool(
        ((status or {}).get("evaluation") or {}).get("retry_until")
    )


def needs_watching(status: dict[str, Any], spec: dict[str, Any], now: dt.datetime) -> bool:
    """Whether the periodic loop should reconcile this job: active, or finished with work left
    (ranks still running after success, a ttl to honour, results to read again)."""
    phase = status.get("phase")
    if phase not in TERMINAL:
        return True
    if spec.get("ttl_seconds_after_finished") is not None or rereads_evaluation(status):
        return True
    done = parse_time(status.get("completion_time"))
    return done is not None and _since(now, done) < SUCCESS_GRACE_SECONDS + 300


def _decide(o: Observed) -> Decision:
    status = o.status or {}
    phase = status.get("phase")
    attempt = int(status.get("attempt") or 0)
    pods = list(o.pods)
    current = [p for p in pods if p.attempt == attempt]
    stale = [p for p in pods if p.attempt != attempt]

    if phase in TERMINAL:
        return _finished(o, phase, pods)

    over = _past_deadline(o)
    if over is not None and phase != SUSPENDED:
        message = (
            f"running for {int(over)}s, past spec.active_deadline_seconds={o.spec.active_deadline_seconds}"
        )
        d = Decision(
            _status(
                o, FAILED, Reason.DEADLINE_EXCEEDED, message, completion_time=iso(o.now), restart_after=None
            ),
            delete_pods=_not_deleting(_unfinished(pods)),
        )
        d.events.append(Event("Warning", Reason.DEADLINE_EXCEEDED, message))
        return d

    if o.spec.suspend:
        gone = not pods
        reason = Reason.SUSPENDED if gone else Reason.SUSPENDING
        message = (
            "suspended: no pods, checkpoints kept"
            if gone
            else f"suspending: waiting for {len(pods)} pods to stop"
        )
        d = Decision(_status(o, SUSPENDED, reason, message), delete_pods=_not_deleting(pods))
        if phase != SUSPENDED:
            d.events.append(
                Event("Normal", Reason.SUSPENDED, f"spec.suspend is true: stopping attempt {attempt}'s pods")
            )
        return d

    if phase in (None, "", SUSPENDED, RESTARTING):
        return _next_attempt(o, phase, attempt, pods)

    # Pending or Running: judge the current attempt.
    deletes = _not_deleting(stale)  # pods of other attempts (left over after an operator crash) must go
    trouble = _trouble(o, current, phase)
    if trouble is not None:
        return _restart_or_fail(o, attempt, current, trouble, deletes)

    rank0 = next((p for p in current if p.rank == 0), None)
    if rank0 is not None and rank0.phase == "Succeeded":
        message = f"rank 0 finished; output in {_final_uri(o.spec)}"
        d = Decision(
            _status(
                o, SUCCEEDED, Reason.COMPLETED, message, completion_time=iso(o.now), output=_final_uri(o.spec),
                pending_changes=None,
            ),
            delete_pods=deletes,  # the other ranks get SUCCESS_GRACE_SECONDS to finish by themselves
        )  # fmt: skip
        d.events.append(Event("Normal", "Succeeded", f"attempt {attempt} finished: {message}"))
        return d

    changed = _changed_fields(o)
    if changed and phase == PENDING:  # not started yet: replace the gang with one built from the new spec
        names = ", ".join(f"spec.{f}" for f in changed)
        message = f"{names} changed while attempt {attempt} was starting: replacing its pods (not counted)"
        d = Decision(
            _status(o, RESTARTING, Reason.SPEC_CHANGED, message, restart_after=None,
                    last_restart_reason=f"SpecChanged: {message}"),
            delete_pods=deletes + _not_deleting(current),
            restart_reason=Reason.SPEC_CHANGED,
        )  # fmt: skip
        d.events.append(Event("Normal", Reason.SPEC_CHANGED, message))
        return d

    nnodes = o.spec.parallel_config.nnodes
    present = {p.rank for p in current}
    if len(present) < nnodes:  # Pending with missing pods: (re)create them
        d = Decision(
            _status(
                o, PENDING, Reason.CREATING_PODS, f"attempt {attempt}: {len(present)}/{nnodes} pods created"
            ),
            create_attempt=attempt,
            delete_pods=deletes,
        )
        return d

    running = [p for p in current if p.phase in ("Running", "Succeeded")]
    if len(running) == nnodes:
        stuck = _no_progress(o) if phase == RUNNING else None
        if stuck is not None:
            return _restart_or_fail(o, attempt, current, stuck, deletes)
        message = f"attempt {attempt}: {nnodes}/{nnodes} pods running"
        if changed:
            message += f"; {_pending_message(changed, attempt)}"
        d = Decision(
            _status(o, RUNNING, Reason.PODS_RUNNING, message, pending_changes=changed or None),
            delete_pods=deletes,
        )
        if phase != RUNNING:
            d.events.append(Event("Normal", "Running", message))
        return d
    return _waiting(o, phase, attempt, current, running, deletes)


def _waiting(
    o: Observed, phase: str, attempt: int, current: list[PodObs], running: list[PodObs], deletes: list[str]
) -> Decision:
    """Not every pod runs yet: say why, and once someone has to act (or pending_timeout_seconds has
    passed) mark the job Stalled, with one Warning event."""
    status = o.status or {}
    nnodes = o.spec.parallel_config.nnodes
    stuck = [p for p in current if p.waiting_reason in STUCK_WAITING]
    gated = [p for p in current if p.gated]
    unsched = [p for p in current if p.unschedulable and not p.gated]
    message = f"attempt {attempt}: {len(running)}/{nnodes} pods running"
    silent = [p for p in current if p.node_down_since is not None]
    if silent:
        message += f"; {silent[0].name} not reporting since {iso(silent[0].node_down_since)}"  # type: ignore[arg-type]
    why: tuple[str, str] | None = None
    if stuck:
        why = (
            stuck[0].waiting_reason or Reason.IMAGE_ERROR,
            f"pod {stuck[0].name}: {stuck[0].waiting_reason}",
        )
    elif gated:
        why = (
            Reason.WAITING_FOR_ADMISSION,
            f"{len(gated)} pods held by scheduling gates (waiting for Kueue to admit the gang)",
        )
    elif unsched:
        why = (Reason.UNSCHEDULABLE, f"pod {unsched[0].name} unschedulable: {unsched[0].unschedulable}")
    if why is not None:
        message += f"; {why[1]}"
    timeout = o.spec.restart_policy.pending_timeout_seconds
    began = parse_time(status.get("attempt_start_time")) or parse_time(status.get("start_time")) or o.now
    waited = _since(o.now, began)
    stalled = why if stuck else None
    if stalled is None and timeout and waited >= timeout:
        reason, text = why or (Reason.PENDING_TIMEOUT, "pods not running yet")
        # no running clock in the message: the status must not change while nothing happens
        stalled = (reason, f"{text}; not all pods running {timeout}s after attempt {attempt} began "
                           f"(restart_policy.pending_timeout_seconds)")  # fmt: skip
    reason = why[0] if why else Reason.WAITING_FOR_PODS
    d = Decision(_status(o, phase, reason, message, stalled=stalled), delete_pods=deletes)
    if stalled and not any(
        c.get("type") == "Stalled" and c.get("status") == "True" for c in status.get("conditions") or []
    ):
        d.events.append(Event("Warning", Reason.STALLED, stalled[1]))
    return d


def _finished(o: Observed, phase: str, pods: list[PodObs]) -> Decision:
    """Succeeded or Failed: stop what still runs, keep terminated pods for `kubectl logs`, honour the ttl."""
    status = o.status or {}
    reason = next(
        (c.get("reason", phase) for c in status.get("conditions") or [] if c.get("type") == phase), phase
    )
    done = parse_time(status.get("completion_time")) or o.now
    # Failed: its peers are gone, what still runs would only hang and hold GPUs. Succeeded: the other
    # ranks get a grace to finish by themselves (their last barrier), then they go too.
    late = phase == FAILED or _since(o.now, done) >= SUCCESS_GRACE_SECONDS
    d = Decision(
        _status(o, phase, reason, status.get("message") or phase),
        delete_pods=_not_deleting(_unfinished(pods)) if late else [],
    )
    ttl = o.spec.ttl_seconds_after_finished if o.spec is not None else None
    if ttl is not None and _since(o.now, done) >= ttl:
        d.delete_job = True
    return d


def _past_deadline(o: Observed) -> float | None:
    """Seconds active when past spec.active_deadline_seconds (counted from the start or the last resume)."""
    limit = o.spec.active_deadline_seconds
    began = parse_time((o.status or {}).get("active_since")) or parse_time((o.status or {}).get("start_time"))
    if limit is None or began is None:
        return None
    active = _since(o.now, began)
    return active if active >= limit else None


def _changed_fields(o: Observed) -> list[str]:
    """Pod-shaping fields edited since the current attempt's pods were built."""
    applied = (o.status or {}).get("applied_spec") or {}
    now = spec_digests(o.spec)
    return [f for f in POD_FIELDS if f in applied and applied[f] != now[f]]


def _no_progress(o: Observed) -> Trouble | None:
    """A Running gang whose training step has not moved for restart_policy.progress_timeout_seconds."""
    timeout = o.spec.restart_policy.progress_timeout_seconds
    status = o.status or {}
    if not timeout:
        return None
    progress = status.get("progress") or {}
    if progress.get("state") == "done" or progress.get("step", 0) >= (progress.get("total_steps") or 10**18):
        return None  # steps are over: the final export, upload and evaluation run (the deadline still holds)
    running = next((c for c in status.get("conditions") or [] if c.get("type") == "Running"), {})
    marks = [
        parse_time(status.get("progress_advanced_at")),
        parse_time(status.get("attempt_start_time")),
        parse_time(running.get("lastTransitionTime")) if running.get("status") == "True" else None,
    ]
    since = max((m for m in marks if m is not None), default=None)
    if since is None or _since(o.now, since) < timeout:
        return None
    step = (status.get("progress") or {}).get("step", 0)
    return Trouble(
        True, Reason.NO_PROGRESS,
        f"training has not advanced past step {step} for {int(_since(o.now, since))}s "
        f"(restart_policy.progress_timeout_seconds={timeout})",
    )  # fmt: skip


def _final_uri(spec: FineTuneJobSpec) -> str:
    return output_uri(spec.output.uri, FINAL_DIR)


def _next_attempt(o: Observed, phase: str | None, attempt: int, pods: list[PodObs]) -> Decision:
    """New, resumed or restarting job: start attempt + 1 once old pods are gone and backoff passed."""
    status = o.status or {}
    reason = {
        None: Reason.CREATED,
        "": Reason.CREATED,
        SUSPENDED: Reason.RESUMED,
        RESTARTING: Reason.RESTARTED,
    }[phase]
    if pods:  # the previous attempt's pods must be gone first (they are saving a checkpoint)
        message = f"waiting for {len(pods)} pods of attempt {attempt} to stop"
        keep = RESTARTING if phase == RESTARTING else PENDING if not phase else SUSPENDED
        r = (
            Reason.SUSPENDING
            if keep == SUSPENDED
            else Reason.RESTARTING
            if keep == RESTARTING
            else Reason.CLEANING
        )
        return Decision(_status(o, keep, r, message), delete_pods=_not_deleting(pods))
    after = parse_time(status.get("restart_after"))
    if phase == RESTARTING and after is not None and o.now < after:
        wait = (after - o.now).total_seconds()
        message = f"attempt {attempt + 1} starts in {wait:.0f}s (backoff)"
        return Decision(_status(o, RESTARTING, Reason.BACKING_OFF, message))
    nxt = attempt + 1
    changes: dict[str, Any] = {
        "attempt": nxt, "restart_after": None, "attempt_start_time": iso(o.now),
        "applied_spec": spec_digests(o.spec), "pending_changes": None,
    }  # fmt: skip
    if not status.get("start_time"):
        changes["start_time"] = iso(o.now)
    if not status.get("active_since") or phase == SUSPENDED:  # the deadline clock restarts on resume
        changes["active_since"] = iso(o.now)
    message = f"attempt {nxt}: creating {o.spec.parallel_config.nnodes} pods"
    d = Decision(
        _status(o, PENDING, Reason.CREATING_PODS, message, **changes),
        create_attempt=nxt,
        delete_configs_before=nxt,
    )
    verb = {Reason.CREATED: "starting", Reason.RESUMED: "resuming", Reason.RESTARTED: "restarting"}[reason]
    d.events.append(Event("Normal", reason, f"{verb} as attempt {nxt}"))
    return d


def _fail(
    o: Observed, reason: str, message: str, current: list[PodObs], deletes: list[str], t: Trouble
) -> Decision:
    d = Decision(
        _status(o, FAILED, reason, message, completion_time=iso(o.now), restart_after=None,
                last_restart_reason=f"{t.reason}: {t.message}"),
        # keep the failed pods for `kubectl logs`, stop the others
        delete_pods=deletes + _not_deleting(_unfinished(current)),
    )  # fmt: skip
    d.events.append(Event("Warning", reason if reason == Reason.USER_ERROR else Reason.FAILED, message))
    return d


def _restart_or_fail(
    o: Observed, attempt: int, current: list[PodObs], t: Trouble, deletes: list[str]
) -> Decision:
    status = o.status or {}
    restarts, preemptions = int(status.get("restarts") or 0), int(status.get("preemptions") or 0)
    policy = o.spec.restart_policy
    if t.fatal:  # retrying cannot help: the job's author has to fix the spec, data or credentials
        return _fail(
            o, t.reason, f"{t.message} (not retried: fix the job and create it again)", current, deletes, t
        )
    if t.counted and restarts >= policy.max_restarts:
        message = f"{t.message}; giving up after {restarts} restarts (restart_policy.max_restarts={policy.max_restarts})"
        return _fail(o, Reason.MAX_RESTARTS_EXCEEDED, message, current, deletes, t)
    if not t.counted and preemptions >= policy.max_preemptions:
        message = (
            f"{t.message}; giving up after {preemptions} uncounted restarts "
            f"(restart_policy.max_preemptions={policy.max_preemptions})"
        )
        return _fail(o, Reason.TOO_MANY_PREEMPTIONS, message, current, deletes, t)
    wait = backoff_seconds(o.spec, restarts + preemptions)
    counters = {"restarts": restarts + 1} if t.counted else {"preemptions": preemptions + 1}
    kind = (
        f"restart {restarts + 1} of {policy.max_restarts}" if t.counted
        else f"not counted against max_restarts; {preemptions + 1} of {policy.max_preemptions} uncounted"
    )  # fmt: skip
    message = f"{t.message}; restarting as attempt {attempt + 1} in {wait:.0f}s ({kind})"
    d = Decision(
        _status(o, RESTARTING, t.reason, message, restart_after=iso(o.now + dt.timedelta(seconds=wait)),
                last_restart_reason=f"{t.reason}: {t.message}", **counters),
        delete_pods=deletes + _not_deleting(current),
        restart_reason=t.reason,
    )  # fmt: skip
    d.events.append(Event("Warning", Reason.RESTARTING, message))
    return d


def progress_status(doc: TrainerProgress | None) -> dict[str, Any]:
    """Status fields from the trainer's progress.json: {progress: {...}, last_checkpoint: {...}}."""
    if doc is None:
        return {}
    step, total = doc.step, doc.total_steps
    percent = doc.percent or (100 * step // total if total else 0)
    progress = Progress(
        step=step, total_steps=total, percent=percent,
        summary=f"{percent}% ({step}/{total})" if total else f"step {step}",
        epoch=doc.epoch, loss=doc.loss, tokens_per_second=doc.tokens_per_second,
        eta_seconds=doc.eta_seconds, rewards=doc.rewards, metrics=doc.metrics, state=doc.state,
    )  # fmt: skip
    out: dict[str, Any] = {"progress": progress.model_dump(mode="json", exclude_none=True)}
    if doc.last_checkpoint is not None and doc.last_checkpoint.uri:
        out["last_checkpoint"] = doc.last_checkpoint.model_dump(mode="json", exclude_none=True)
    return out


def evaluation_status(read: EvaluationRead, retry_until: dt.datetime | None = None) -> dict[str, Any]:
    """status.evaluation from eval/results.json: the scores, passed, and the Evaluated condition's reason
    and message (the thresholds not met, or why there are no results). A store error before
    `retry_until` leaves the condition Unknown and the read to be tried again."""
    if not read.readable:  # no `passed`: the condition is Unknown
        if read.error and retry_until is not None:
            return {"reason": EVALUATED_UNAVAILABLE, "results": read.uri, "retry_until": iso(retry_until),
                    "message": f"cannot read {read.uri} ({read.error}); trying again until {iso(retry_until)}"}  # fmt: skip
        why = f" ({read.error})" if read.error else " from here"
        return {"reason": EVALUATED_UNAVAILABLE, "results": read.uri,
                "message": f"cannot read {read.uri}{why}; see kubetune eval"}  # fmt: skip
    if read.doc is None:
        return {"passed": False, "reason": EVALUATED_MISSING, "results": read.uri,
                "message": f"{read.uri} was not written"}  # fmt: skip
    try:
        results = EvaluationResults.model_validate(read.doc)
    except ValueError as e:
        first = str(e).splitlines()[0]
        return {"passed": False, "reason": EVALUATED_ERROR, "results": read.uri,
                "message": f"{read.uri} is not readable evaluation results: {first}"}  # fmt: skip
    if results.error:
        reason, message = EVALUATED_ERROR, f"the evaluation could not run: {results.error}"
    elif results.failed:
        reason, message = EVALUATED_FAILED, "threshold not met: " + "; ".join(results.failed)
    elif any(s.threshold is not None for s in results.scores.values()):
        reason, message = EVALUATED_PASSED, "every threshold met: " + _met(results)
    else:
        reason, message = EVALUATED_NO_THRESHOLDS, "scored (no thresholds set): " + _met(results)
    return {
        "passed": results.passed and not results.error, "reason": reason, "message": message,
        "scores": {k: v.model_dump(exclude_none=True) for k, v in results.scores.items()},
        "num_samples": results.num_samples, "results": read.uri,
    }  # fmt: skip


def _met(results: EvaluationResults) -> str:
    return ", ".join(f"{k} {s.trained:.4g}" for k, s in results.scores.items() if s.trained is not None)
