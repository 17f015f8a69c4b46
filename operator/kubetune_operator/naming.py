"""Names and label selectors of the objects the operator creates for a FineTuneJob (pure, no kopf).

render.py builds the objects with these names; the reconcile loop finds them again with the same
functions, so a restarted operator recognises every pod it (or an earlier process) created.

    service:    ftj-<job>                       (headless; pods' DNS subdomain)
    config map: <job>-a<attempt>-config         (the FineTuneJob YAML the trainer reads)
    pods:       <job>-a<attempt>-r<rank>        (hostname too: <pod>.<service>.<ns>.svc)

The config map is per attempt, so each attempt reads the spec as it was when the attempt was
created (a fixed S3 endpoint reaches the next attempt) and nothing is ever updated in place.

Every name is a DNS label of at most 63 characters: a long job name is cut and a short hash of the
whole name keeps it unique. The service name starts with a letter, as Service names must (DNS-1035),
even for a job called "7b-lora".
"""

from __future__ import annotations

import hashlib

from kubetune.conventions import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_RANK,
    MANAGER,
    RDZV_PORT,
)

MAX_LABEL = 63  # DNS label, label value


def _fit(base: str, suffix: str = "", prefix: str = "") -> str:
    """prefix + base + suffix, with base cut (and a hash of it added) so the whole fits in 63 chars."""
    name = f"{prefix}{base}{suffix}"
    if len(name) <= MAX_LABEL:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    room = MAX_LABEL - len(prefix) - len(suffix) - len(digest) - 1
    return f"{prefix}{base[:room].rstrip('-')}-{digest}{suffix}"


def service_name(job: str) -> str:
    """The headless Service of a job (one per job, kept across attempts)."""
    return _fit(job, prefix="ftj-")


def configmap_name(job: str, attempt: int) -> str:
    """The ConfigMap holding the trainer config of one attempt."""
    return _fit(job, suffix=f"-a{attempt}-config")


def pod_name(job: str, attempt: int, rank: int) -> str:
    """Pod (and hostname) of node rank `rank` in gang attempt `attempt`."""
    return _fit(job, suffix=f"-a{attempt}-r{rank}")


def pod_group_name(job: str) -> str:
    """Kueue pod-group name: stable across attempts, so replacement pods reuse the admission."""
    return _fit(job)


def pod_fqdn(job: str, namespace: str, attempt: int, rank: int) -> str:
    """The DNS name of a pod through the headless service (resolvable before the pod is ready)."""
    return f"{pod_name(job, attempt, rank)}.{service_name(job)}.{namespace}.svc"


def rdzv_endpoint(job: str, namespace: str, attempt: int) -> str:
    """torchrun's c10d rendezvous endpoint: node rank 0 of the attempt."""
    return f"{pod_fqdn(job, namespace, attempt, 0)}:{RDZV_PORT}"


def job_labels(job: str) -> dict[str, str]:
    """Labels on every object of the job (service, config map, pods)."""
    return {LABEL_JOB: _fit(job), LABEL_MANAGED_BY: MANAGER}


def attempt_labels(job: str, attempt: int) -> dict[str, str]:
    """Labels on the objects of one attempt (its config map and pods)."""
    return {**job_labels(job), LABEL_ATTEMPT: str(attempt)}


def pod_labels(job: str, attempt: int, rank: int) -> dict[str, str]:
    return {**attempt_labels(job, attempt), LABEL_RANK: str(rank)}


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def job_selector(job: str) -> str:
    """Label selector for every object (every attempt) of a job: `kubectl get pods -l ...`."""
    return _selector(job_labels(job))


def attempt_selector(job: str, attempt: int) -> str:
    """Label selector for the objects (pods, config map) of one attempt."""
    return _selector(attempt_labels(job, attempt))
