"""Prometheus metrics of the operator (prometheus-client), served on $KUBETUNE_METRICS_PORT (9090).

    kubetune_jobs{phase="Running"}                          jobs this operator sees, by phase
    kubetune_restarts_total{reason="PodFailed"}             gang restarts it started, by reason
    kubetune_reconcile_duration_seconds_bucket{trigger=...}  time of one reconcile
    kubetune_reconcile_errors_total                         reconciles that raised

Per job, from its status (labels ``namespace`` and ``job``; a value the status lacks is no sample):

    kubetune_job_phase{phase="Running"} 1                   the job's phase
    kubetune_job_step, kubetune_job_total_steps, kubetune_job_epoch
    kubetune_job_loss, kubetune_job_tokens_per_second, kubetune_job_eta_seconds
    kubetune_job_restarts, kubetune_job_preemptions, kubetune_job_attempt
    kubetune_job_last_checkpoint_step
    kubetune_job_reward{reward="margins"}                   method dpo: the latest mean rewards
    kubetune_job_evaluation_score{metric="bleu_4",model="trained"|"base"}   status.evaluation
    kubetune_job_evaluation_threshold{metric="bleu_4"}, kubetune_job_evaluation_passed (1 or 0)

They are read at scrape time from the statuses the watch delivered (:func:`observe_job`) and vanish
when the job is deleted (:func:`forget_job`). A Prometheus scraping them keeps these ``job`` and
``namespace`` labels only with ``honorLabels: true`` (the chart's ServiceMonitor sets it); otherwise
they become ``exported_job`` / ``exported_namespace``.

The phase gauges are rebuilt from the jobs' status as the operator (re)starts and reconciles them,
so they need no state of their own beyond this process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


# (name, help, the progress/status field it reads)
_PROGRESS_GAUGES = (
    ("step", "Optimizer steps done", "step"),
    ("total_steps", "Optimizer steps in the run", "total_steps"),
    ("epoch", "Epochs done (fractional)", "epoch"),
    ("loss", "Latest training loss", "loss"),
    ("tokens_per_second", "Training throughput over the whole gang (tokens/s)", "tokens_per_second"),
    ("eta_seconds", "Estimated seconds to the end of training", "eta_seconds"),
)
_STATUS_GAUGES = (
    ("restarts", "Gang restarts after failures (preemptions excluded)", "restarts"),
    ("preemptions", "Gang restarts after preemption", "preemptions"),
    ("attempt", "Current gang attempt", "attempt"),
)
_LABELS = ["namespace", "job"]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


class JobStatusCollector(Collector):
    """The per-job gauges, built at each scrape from the latest status of every job (see module doc)."""

    def __init__(self) -> None:
        self._status: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def observe(self, namespace: str, name: str, status: dict[str, Any] | None) -> None:
        with self._lock:
            self._status[(namespace, name)] = dict(status or {})

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._status.pop((namespace, name), None)

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            jobs = sorted(self._status.items())
        fam = {
            n: GaugeMetricFamily(f"kubetune_job_{n}", h, labels=_LABELS)
            for n, h, _ in (*_PROGRESS_GAUGES, *_STATUS_GAUGES)
        }
        phase = GaugeMetricFamily("kubetune_job_phase", "The job's phase (1)", labels=[*_LABELS, "phase"])
        ckpt = GaugeMetricFamily(
            "kubetune_job_last_checkpoint_step", "Step of the newest committed checkpoint", labels=_LABELS
        )
        reward = GaugeMetricFamily(
            "kubetune_job_reward", "method dpo: latest mean reward", labels=[*_LABELS, "reward"]
        )
        score = GaugeMetricFamily(
            "kubetune_job_evaluation_score",
            "Evaluation score of the trained or the base model",
            labels=[*_LABELS, "metric", "model"],
        )
        threshold = GaugeMetricFamily(
            "kubetune_job_evaluation_threshold", "The evaluation threshold set", labels=[*_LABELS, "metric"]
        )
        passed = GaugeMetricFamily(
            "kubetune_job_evaluation_passed", "Every evaluation threshold met (1) or not (0)", labels=_LABELS
        )
        for (namespace, name), status in jobs:
            key = [namespace, name]
            if status.get("phase"):
                phase.add_metric([*key, str(status["phase"])], 1)
            progress = status.get("progress") or {}
            for n, _, field in _PROGRESS_GAUGES:
                if (v := _number(progress.get(field))) is not None:
                    fam[n].add_metric(key, v)
            for n, _, field in _STATUS_GAUGES:
                if (v := _number(status.get(field))) is not None:
                    fam[n].add_metric(key, v)
            if (v := _number((status.get("last_checkpoint") or {}).get("step"))) is not None:
                ckpt.add_metric(key, v)
            for kind, value in (progress.get("rewards") or {}).items():
                if (v := _number(value)) is not None:
                    reward.add_metric([*key, str(kind)], v)
            evaluation = status.get("evaluation")
            if isinstance(evaluation, dict):
                for metric, s in (evaluation.get("scores") or {}).items():
                    s = s if isinstance(s, dict) else {}
                    for model in ("trained", "base"):
                        if (v := _number(s.get(model))) is not None:
                            score.add_metric([*key, str(metric), model], v)
                    if (v := _number(s.get("threshold"))) is not None:
                        threshold.add_metric([*key, str(metric)], v)
                if isinstance(evaluation.get("passed"), bool):
                    passed.add_metric(key, 1 if evaluation["passed"] else 0)
        yield phase
        yield from fam.values()
        yield from (ckpt, reward, score, threshold, passed)


JOB_STATUS = JobStatusCollector()
REGISTRY.register(JOB_STATUS)


def observe_job(namespace: str, name: str, status: dict[str, Any] | None) -> None:
    """The job's latest status (from the watch): its per-job gauges follow it."""
    JOB_STATUS.observe(namespace, name, status)


def forget_job(namespace: str, name: str) -> None:
    """The job is gone: its per-job gauges go with it."""
    JOB_STATUS.forget(namespace, name)


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
