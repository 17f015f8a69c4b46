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
- Restarting: a pod failed, was evicted, deleted, or stuck Unknown past
  restart_policy.unknown_timeout_seconds. The attempt's pods are deleted; once they are all gone and
  the backoff (backoff_seconds * 2**k, capped at max_backoff_seconds, k = restarts so far) has
  passed, attempt + 1 is created and the trainer resumes from the newest committed checkpoint.
  Exit code EXIT_PREEMPTED (the trainer committed a checkpoint on SIGTERM), SIGTERM (143), evictions,
  pod deletions and node loss are disruptions: counted in `preemptions`, never against
  restart_policy.max_restarts. Any other failure counts in `restarts`; one more than max_restarts
  allows makes the job Failed.
- Succeeded: rank 0 exited 0 and the output is committed (output_committed is True, or None when the
  operator cannot read the store, e.g. pvc://). Rank 0 exiting 0 without output is a failure.
  The other ranks are left to finish on their own; a Failed job's still-running pods are deleted.
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
from dataclasses import dataclass, field
from typing import Any

from kubetune.conventions import EXIT_PREEMPTED, LABEL_ATTEMPT, LABEL_RANK
from kubetune.spec import FineTuneJobSpec

PENDING, RUNNING, RESTARTING = "Pending", "Running", "Restarting"
SUCCEEDED, FAILED, SUSPENDED = "Succeeded", "Failed", "Suspended"
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Running", "Succeeded", "Failed", "Suspended")

EXIT_SIGTERM = 128 + 15  # a process killed by SIGTERM that did not handle it
# Container waiting reasons that will not go away by waiting: the job is Stalled until someone acts.
STUCK_WAITING = {
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError",
}  # fmt: skip
# Pod conditions/reasons that say the pod was taken away, not that the training failed.
DISRUPTION_REASONS = {"Evicted", "Preempting", "NodeLost", "NodeShutdown", "Terminated", "Shutdown"}


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
    disrupted: str | None = None  # DisruptionTarget condition reason (eviction, preemption, node loss)
    unknown_since: dt.datetime | None = None  # phase or readiness Unknown since (node not reporting)


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
    unknown_since = None
    if phase == "Unknown" or ready.get("status") == "Unknown":
        unknown_since = parse_time(ready.get("lastTransitionTime")) or parse_time(status.get("startTime"))
    return PodObs(
        name=meta.get("name", ""),
        attempt=int(labels.get(LABEL_ATTEMPT, 0) or 0),
        rank=int(labels.get(LABEL_RANK, 0) or 0),
        phase=phase,
        exit_code=terminated.get("exitCode"),
        reason=terminated.get("reason") or status.get("reason"),
        message=terminated.get("message") or status.get("message"),
        waiting_reason=waiting.get("reason"),
        unschedulable=scheduled.get("message") if scheduled.get("reason") == "Unschedulable" else None,
        terminating=bool(meta.get("deletionTimestamp")),
        disrupted=(disruption.get("reason") or "Disrupted") if disruption.get("status") == "True" else None,
        unknown_since=unknown_since,
    )


@dataclass(frozen=True)
class Observed:
    spec: FineTuneJobSpec
    status: dict[str, Any]
    generation: int
    pods: tuple[PodObs, ...]
    now: dt.datetime
    output_committed: bool | None = None  # True/False from the store; None: cannot tell (trust exit 0)


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


@dataclass(frozen=True)
class Trouble:
    """Why the current attempt cannot go on."""

    counted: bool  # counts against max_restarts (a failure), or not (a disruption)
    reason: str  # CamelCase
    message: str


def backoff_seconds(spec: FineTuneJobSpec, restarts_so_far: int) -> float:
    """Wait before attempt k+1: backoff_seconds * 2**k, capped at max_backoff_seconds."""
    p = spec.restart_policy
    return float(min(p.backoff_seconds * 2 ** min(restarts_so_far, 30), p.max_backoff_seconds))


def _pod_trouble(p: PodObs, now: dt.datetime, unknown_timeout: float) -> Trouble | None:
    who = f"pod {p.name} (rank {p.rank})"
    if p.terminating:
        return Trouble(False, "PodDeleted", f"{who} is being deleted")
    if p.phase == "Failed":
        detail = f"exit code {p.exit_code}" if p.exit_code is not None else "no exit code"
        if p.reason:
            detail += f", {p.reason}"
        if p.message:
            detail += f": {p.message.strip()[:200]}"
        if p.disrupted or p.reason in DISRUPTION_REASONS:
            return Trouble(False, "Evicted", f"{who} was evicted ({p.disrupted or p.reason}; {detail})")
        if p.exit_code == EXIT_PREEMPTED:
            return Trouble(False, "Preempted", f"{who} was preempted and saved a checkpoint ({detail})")
        if p.exit_code == EXIT_SIGTERM:
            return Trouble(False, "Terminated", f"{who} was terminated by SIGTERM ({detail})")
        return Trouble(True, "PodFailed", f"{who} failed ({detail})")
    if p.unknown_since is not None:
        stuck = (now - p.unknown_since).total_seconds()
        if stuck >= unknown_timeout:
            return Trouble(False, "NodeLost", f"{who} has been Unknown for {int(stuck)}s (node lost?)")
    if p.disrupted and p.phase != "Succeeded":
        return Trouble(False, "Evicted", f"{who} is being disrupted ({p.disrupted})")
    return None


def _trouble(o: Observed, pods: list[PodObs], phase: str | None) -> Trouble | None:
    """The reason the current attempt has to go, if any: a counted failure wins over a disruption."""
    found = [t for p in pods if (t := _pod_trouble(p, o.now, o.spec.restart_policy.unknown_timeout_seconds))]
    ranks = {p.rank for p in pods}
    missing = [r for r in range(o.spec.parallel_config.nnodes) if r not in ranks]
    if missing and phase == RUNNING:
        found.append(Trouble(False, "PodDeleted", f"pods of ranks {missing} are gone"))
    rank0 = next((p for p in pods if p.rank == 0), None)
    if rank0 is not None and rank0.phase == "Succeeded" and o.output_committed is False:
        found.append(Trouble(True, "NoOutput", f"rank 0 ({rank0.name}) exited 0 but no output was committed"))
    found.sort(key=lambda t: not t.counted)
    return found[0] if found else None


# ---------------------------------------------------------------- status helpers


def _conditions(
    old: list[dict[str, Any]], now: dt.datetime, generation: int, values: dict[str, tuple[bool, str, str]]
) -> list[dict[str, Any]]:
    """Standard conditions: lastTransitionTime moves only when the status flips."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for ctype in CONDITION_TYPES:
        value, reason, message = values[ctype]
        status = "True" if value else "False"
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
    stalled: str | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """The new status for `phase`: counters carried over, conditions recomputed."""
    s = {k: v for k, v in o.status.items() if k not in ("conditions",)}
    s.update(changes)
    s["phase"] = phase
    s["message"] = message
    s["observedGeneration"] = o.generation
    for key in ("attempt", "restarts", "preemptions"):
        s.setdefault(key, 0)
    converging = phase in (PENDING, RESTARTING) or (phase == SUSPENDED and reason == "Suspending")
    ready_reason = {RUNNING: "Running", SUCCEEDED: "Succeeded"}.get(phase, reason)
    values = {
        "Ready": (phase in (RUNNING, SUCCEEDED), ready_reason, message),
        "Reconciling": (converging and not stalled, reason if converging else "Idle", message if converging else ""),
        "Stalled": (phase == FAILED or stalled is not None, reason if phase == FAILED else "Stuck" if stalled else "",
                    message if phase == FAILED else stalled or ""),
        "Running": (phase == RUNNING, reason if phase == RUNNING else phase, message if phase == RUNNING else ""),
        "Succeeded": (phase == SUCCEEDED, reason if phase == SUCCEEDED else phase, message if phase == SUCCEEDED else ""),
        "Failed": (phase == FAILED, reason if phase == FAILED else phase, message if phase == FAILED else ""),
        "Suspended": (phase == SUSPENDED, reason if phase == SUSPENDED else phase, message if phase == SUSPENDED else ""),
    }  # fmt: skip
    s["conditions"] = _conditions(o.status.get("conditions") or [], o.now, o.generation, values)
    return {k: v for k, v in s.items() if v is not None}


def _not_deleting(pods: list[PodObs]) -> list[str]:
    return sorted(p.name for p in pods if not p.terminating)


# ---------------------------------------------------------------- the machine


def decide(o: Observed) -> Decision:
    """What to do next for one job (see the module docstring)."""
    d = _decide(o)
    # Pods on a lost node never finish a graceful deletion (no kubelet is left to confirm it).
    timeout = o.spec.restart_policy.unknown_timeout_seconds
    lost = {
        p.name for p in o.pods if p.unknown_since and (o.now - p.unknown_since).total_seconds() >= timeout
    }
    d.force_delete_pods = sorted(lost)
    d.delete_pods = [n for n in d.delete_pods if n not in lost]
    return d


def invalid_spec(status: dict[str, Any], generation: int, now: dt.datetime, message: str) -> Decision:
    """A stored spec this operator cannot read (e.g. the CRD on the cluster is older): Failed."""
    o = Observed(spec=None, status=status, generation=generation, pods=(), now=now)  # type: ignore[arg-type]
    changes = {} if status.get("phase") == FAILED else {"completion_time": iso(now)}
    return Decision(_status(o, FAILED, "InvalidSpec", message, **changes))


def _decide(o: Observed) -> Decision:
    status = o.status or {}
    phase = status.get("phase")
    attempt = int(status.get("attempt") or 0)
    pods = list(o.pods)
    current = [p for p in pods if p.attempt == attempt]
    stale = [p for p in pods if p.attempt != attempt]

    if phase in TERMINAL:
        # Failed: stop what still runs (its peers are gone; it would only hang and hold GPUs).
        # Succeeded: the other ranks finish by themselves. Terminated pods stay for `kubectl logs`.
        running = [p for p in pods if p.phase not in ("Succeeded", "Failed")] if phase == FAILED else []
        reason = next(
            (c.get("reason", phase) for c in status.get("conditions") or [] if c.get("type") == phase), phase
        )
        return Decision(
            _status(o, phase, reason, status.get("message") or phase), delete_pods=_not_deleting(running)
        )

    if o.spec.suspend:
        gone = not pods
        reason = "Suspended" if gone else "Suspending"
        message = (
            "suspended: no pods, checkpoints kept"
            if gone
            else f"suspending: waiting for {len(pods)} pods to stop"
        )
        d = Decision(_status(o, SUSPENDED, reason, message), delete_pods=_not_deleting(pods))
        if phase != SUSPENDED:
            d.events.append(
                Event("Normal", "Suspended", f"spec.suspend is true: stopping attempt {attempt}'s pods")
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
                o, SUCCEEDED, "Completed", message, completion_time=iso(o.now), output=_final_uri(o.spec)
            ),
            delete_pods=deletes,  # the other ranks finish by themselves
        )
        d.events.append(Event("Normal", "Succeeded", f"attempt {attempt} finished: {message}"))
        return d

    nnodes = o.spec.parallel_config.nnodes
    present = {p.rank for p in current}
    if len(present) < nnodes:  # Pending with missing pods: (re)create them
        d = Decision(
            _status(o, PENDING, "CreatingPods", f"attempt {attempt}: {len(present)}/{nnodes} pods created"),
            create_attempt=attempt,
            delete_pods=deletes,
        )
        return d

    running = [p for p in current if p.phase in ("Running", "Succeeded")]
    if len(running) == nnodes:
        message = f"attempt {attempt}: {nnodes}/{nnodes} pods running"
        d = Decision(_status(o, RUNNING, "PodsRunning", message), delete_pods=deletes)
        if phase != RUNNING:
            d.events.append(Event("Normal", "Running", message))
        return d

    # Still pending: say why, and whether someone has to act.
    stuck = [p for p in current if p.waiting_reason in STUCK_WAITING]
    unsched = [p for p in current if p.unschedulable]
    stalled = f"pod {stuck[0].name}: {stuck[0].waiting_reason}" if stuck else None
    message = f"attempt {attempt}: {len(running)}/{nnodes} pods running"
    silent = [p for p in current if p.unknown_since is not None]
    if silent:
        message += f"; {silent[0].name} not reporting since {iso(silent[0].unknown_since)}"  # type: ignore[arg-type]
    if unsched:
        message += f"; {unsched[0].name} unschedulable: {unsched[0].unschedulable}"
    if stalled:
        message += f"; {stalled}"
    d = Decision(_status(o, phase, "WaitingForPods", message, stalled=stalled), delete_pods=deletes)
    if stalled and not any(
        c.get("type") == "Stalled" and c.get("status") == "True" for c in status.get("conditions") or []
    ):
        d.events.append(Event("Warning", "Stalled", message))
    return d


def _final_uri(spec: FineTuneJobSpec) -> str:
    return f"{spec.output.uri.rstrip('/')}/final"


def _next_attempt(o: Observed, phase: str | None, attempt: int, pods: list[PodObs]) -> Decision:
    """New, resumed or restarting job: start attempt + 1 once old pods are gone and backoff passed."""
    status = o.status or {}
    reason = {None: "Created", "": "Created", SUSPENDED: "Resumed", RESTARTING: "Restarted"}[phase]
    if pods:  # the previous attempt's pods must be gone first (they are saving a checkpoint)
        message = f"waiting for {len(pods)} pods of attempt {attempt} to stop"
        keep = RESTARTING if phase == RESTARTING else PENDING if not phase else SUSPENDED
        r = "Suspending" if keep == SUSPENDED else "Restarting" if keep == RESTARTING else "Cleaning"
        return Decision(_status(o, keep, r, message), delete_pods=_not_deleting(pods))
    after = parse_time(status.get("restart_after"))
    if phase == RESTARTING and after is not None and o.now < after:
        wait = (after - o.now).total_seconds()
        message = f"attempt {attempt + 1} starts in {wait:.0f}s (backoff)"
        return Decision(_status(o, RESTARTING, "BackingOff", message))
    nxt = attempt + 1
    changes: dict[str, Any] = {"attempt": nxt, "restart_after": None}
    if not status.get("start_time"):
        changes["start_time"] = iso(o.now)
    message = f"attempt {nxt}: creating {o.spec.parallel_config.nnodes} pods"
    d = Decision(
        _status(o, PENDING, "CreatingPods", message, **changes),
        create_attempt=nxt,
        delete_configs_before=nxt,
    )
    verb = {"Created": "starting", "Resumed": "resuming", "Restarted": "restarting"}[reason]
    d.events.append(Event("Normal", reason, f"{verb} as attempt {nxt}"))
    return d


def _restart_or_fail(
    o: Observed, attempt: int, current: list[PodObs], t: Trouble, deletes: list[str]
) -> Decision:
    status = o.status or {}
    restarts, preemptions = int(status.get("restarts") or 0), int(status.get("preemptions") or 0)
    limit = o.spec.restart_policy.max_restarts
    if t.counted and restarts >= limit:
        message = f"{t.message}; giving up after {restarts} restarts (restart_policy.max_restarts={limit})"
        d = Decision(
            _status(o, FAILED, "MaxRestartsExceeded", message, completion_time=iso(o.now),
                    last_restart_reason=f"{t.reason}: {t.message}"),
            # keep the failed pods for `kubectl logs`, stop the others
            delete_pods=deletes + _not_deleting([p for p in current if p.phase not in ("Succeeded", "Failed")]),
        )  # fmt: skip
        d.events.append(Event("Warning", "Failed", message))
        return d
    wait = backoff_seconds(o.spec, restarts + preemptions)
    counters = {"restarts": restarts + 1} if t.counted else {"preemptions": preemptions + 1}
    kind = f"restart {restarts + 1} of {limit}" if t.counted else "not counted against max_restarts"
    message = f"{t.message}; restarting as attempt {attempt + 1} in {wait:.0f}s ({kind})"
    d = Decision(
        _status(o, RESTARTING, t.reason, message, restart_after=iso(o.now + dt.timedelta(seconds=wait)),
                last_restart_reason=f"{t.reason}: {t.message}", **counters),
        delete_pods=deletes + _not_deleting(current),
        restart_reason=t.reason,
    )  # fmt: skip
    d.events.append(Event("Warning", "Restarting", message))
    return d


def progress_status(doc: dict[str, Any] | None) -> dict[str, Any]:
    """Status fields from the trainer's progress.json: {progress: {...}, last_checkpoint: {...}}."""
    if not doc:
        return {}
    step, total = int(doc.get("step") or 0), int(doc.get("total_steps") or 0)
    percent = int(doc.get("percent") or (100 * step // total if total else 0))
    progress = {
        "step": step, "total_steps": total, "percent": percent,
        "summary": f"{percent}% ({step}/{total})" if total else f"step {step}",
        "epoch": float(doc.get("epoch") or 0.0), "loss": doc.get("loss"),
        "tokens_per_second": doc.get("tokens_per_second"), "eta_seconds": doc.get("eta_seconds"),
        "rewards": doc.get("rewards"), "state": doc.get("state"),
    }  # fmt: skip
    out: dict[str, Any] = {"progress": {k: v for k, v in progress.items() if v is not None}}
    ckpt = doc.get("last_checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("uri"):
        out["last_checkpoint"] = {"uri": str(ckpt["uri"]), "step": int(ckpt.get("step") or 0)}
    return out
