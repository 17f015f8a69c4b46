"""Prometheus metrics of the operator (prometheus-client), served on $KUBETUNE_METRICS_PORT (9090).

    kubetune_jobs{phase="Running"}                          jobs this operator sees, by phase
    kubetune_restarts_total{reason="PodFailed"}             gang restarts it started, by reason
    kubetune_reconcile_duration_seconds_bucket{trigger=...}  time of one reconcile
    kubetune_reconcile_errors_total                         reconciles that raised

The phase gauge is rebuilt from the jobs' status as the operator (re)starts and reconciles them,
so it needs no state of its own beyond this process.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune_operator import state

REGISTRY = CollectorRegistry()
JOBS = Gauge("kubetune_jobs", "FineTuneJobs seen by this operator, by phase", ["phase"], registry=REGISTRY)
RESTARTS = Counter(
    "kubetune_restarts", "Gang restarts started by this operator, by reason", ["reason"], registry=REGISTRY
)
RECONCILE = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time of one reconcile of one FineTuneJob",
    ["trigger"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
ERRORS = Counter("kubetune_reconcile_errors", "Reconciles that raised", registry=REGISTRY)

PHASES = (state.PENDING, state.RUNNING, state.RESTARTING, state.SUCCEEDED, state.FAILED, state.SUSPENDED)
_phases: dict[tuple[str, str], str] = {}
_lock = threading.Lock()
for _p in PHASES:
    JOBS.labels(phase=_p).set(0)


def set_phase(namespace: str, name: str, phase: str | None) -> None:
    """Record a job's phase (None: the job is gone)."""
    with _lock:
        before = _phases.pop((namespace, name), None)
        if before is not None:
            JOBS.labels(phase=before).dec()
        if phase in PHASES:
            _phases[(namespace, name)] = phase
            JOBS.labels(phase=phase).inc()


def job_count() -> int:
    """Jobs this process has seen and not seen deleted (kopf's liveness probe reports it)."""
    with _lock:
        return len(_phases)


_serving: set[int] = set()


def serve(port: int) -> None:
    """Start the /metrics HTTP endpoint (a daemon thread) once per process; port 0 disables it."""
    if port and port not in _serving:
        start_http_server(port, registry=REGISTRY)
        _serving.add(port)
