"""kopf handlers: the thin layer between the API server and the state machine.

    kopf run --standalone -m kubetune_operator.handlers --liveness=http://0.0.0.0:8080/healthz -A

Every trigger (job created, resumed, spec changed, a timer, any event of one of its pods) runs the
same `reconcile`: read the job and its pods, `state.decide`, then apply the decision in a
crash-safe order: the status first (guarded by the job's resourceVersion, so two reconciles never
both count one failure), then create the gang's objects (fixed names, 409 = already there), then
delete pods, then post Kubernetes Events. All state is in the job's status and the pods' labels;
killing the operator at any moment and starting it again loses nothing and duplicates nothing.

A periodic loop (a thread of this process, not kopf timers: kopf puts a finalizer on every object
with a timer, and a finalizer makes `kubectl delete ftj`, `helm uninstall` and namespace deletion
hang while no operator runs) reconciles every job it knows from kopf's watch, and copies the
trainer's progress.json (step, loss, ETA, last checkpoint) from the job's output store into the
status. FineTuneJobs carry no finalizer: deleting one completes at once, with or without an
operator, and the cluster's garbage collector removes its pods, service and config maps through
their owner references.

Environment: KUBETUNE_RECONCILE_INTERVAL (s, default 5), KUBETUNE_PROGRESS_INTERVAL (s, default 15),
KUBETUNE_METRICS_PORT (default 9090, 0 disables), KUBETUNE_TRAINER_IMAGE (default trainer image).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import kopf
import kubernetes
import pydantic
from kubernetes.client.exceptions import ApiException

from kubetune import profiles
from kubetune.conventions import LABEL_ATTEMPT, LABEL_MANAGED_BY, MANAGER
from kubetune.locations import EVAL_RESULTS_FILE, FINAL_DIR, PROGRESS_FILE, output_uri
from kubetune.profile_spec import PROFILE_PLURAL
from kubetune.progress import TrainerProgress
from kubetune.spec import GROUP, KIND, PLURAL, VERSION, FineTuneJob, FineTuneJobSpec
from kubetune.uris import parse_uri
from kubetune_operator import metrics, naming, render, state

log = logging.getLogger("kubetune.operator")

RECONCILE_INTERVAL = float(os.environ.get("KUBETUNE_RECONCILE_INTERVAL", "5"))
PROGRESS_INTERVAL = float(os.environ.get("KUBETUNE_PROGRESS_INTERVAL", "15"))
METRICS_PORT = int(os.environ.get("KUBETUNE_METRICS_PORT", "9090"))
TRAINER_IMAGE = os.environ.get("KUBETUNE_TRAINER_IMAGE") or None
REPORTING_INSTANCE = os.environ.get("HOSTNAME", "kubetune-operator")


# ---------------------------------------------------------------- the API calls the operator makes


class Kube:
    """The few Kubernetes API calls of the reconcile loop, on the official client, as plain dicts."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    @staticmethod
    def _json(response: Any) -> Any:
        return json.loads(response.data)

    def get_job(self, namespace: str, name: str) -> dict | None:
        try:
            return self._json(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False))  # fmt: skip
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_profiles(self) -> list[dict]:
        """Every FineTuneProfile (cluster-scoped); none where their CRD is not installed."""
        try:
            return self._json(self.custom.list_cluster_custom_object(
                GROUP, VERSION, PROFILE_PLURAL, _preload_content=False))["items"]  # fmt: skip
        except ApiException as e:
            if e.status == 404:
                return []
            raise

    def list_pods(self, namespace: str, selector: str) -> list[dict]:
        return self._json(
            self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        )["items"]

    def patch_status(self, namespace: str, name: str, patch: dict, resource_version: str | None) -> dict:
        body: dict[str, Any] = {"status": patch}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}  # optimistic lock: 409 if stale
        return self._json(self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body, _preload_content=False,
            _content_type="application/merge-patch+json"))  # fmt: skip

    def create(self, obj: dict) -> bool:
        """Create a Service, ConfigMap or Pod; False when it already exists."""
        ns = obj["metadata"]["namespace"]
        create = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
        }[obj["kind"]]
        try:
            create(ns, obj, _preload_content=False)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def delete_pod(self, namespace: str, name: str, force: bool = False) -> None:
        """Graceful (SIGTERM, the trainer saves), or forced for pods on a lost node (no kubelet answers)."""
        try:
            grace = {"grace_period_seconds": 0} if force else {}
            self.core.delete_namespaced_pod(name, namespace, _preload_content=False, **grace)
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_old_configmaps(self, namespace: str, job: str, before_attempt: int) -> None:
        items = self._json(self.core.list_namespaced_config_map(
            namespace, label_selector=naming.job_selector(job), _preload_content=False))["items"]  # fmt: skip
        for cm in items:
            attempt = int((cm["metadata"].get("labels") or {}).get(LABEL_ATTEMPT, 0) or 0)
            if attempt < before_attempt:
                try:
                    self.core.delete_namespaced_config_map(
                        cm["metadata"]["name"], namespace, _preload_content=False
                    )
                except ApiException as e:
                    if e.status != 404:
                        raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a finished FineTuneJob (its ttl passed); what it owns goes with it (background GC)."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                propagation_policy="Background",
                _preload_content=False,
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def event(self, job: dict, ev: state.Event) -> None:
        """A Kubernetes Event on the job, posted directly (from any thread; an Event is auxiliary, so a
        failure to post one is logged, never fatal)."""
        meta = job["metadata"]
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": job.get("apiVersion"), "kind": job.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": ev.type, "reason": ev.reason, "message": ev.message[:1000], "action": ev.reason,
            "reportingComponent": MANAGER, "reportingInstance": REPORTING_INSTANCE,
            "source": {"component": MANAGER}, "firstTimestamp": now, "lastTimestamp": now, "eventTime": now,
        }  # fmt: skip
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
        except ApiException as e:
            log.warning(
                "cannot post event %s on %s/%s: %s", ev.reason, meta["namespace"], meta["name"], e.reason
            )


def connect() -> Kube:
    """In-cluster service account, else $KUBECONFIG / ~/.kube/config (read now, not at import)."""
    try:
        kubernetes.config.load_incluster_config()
        config = kubernetes.client.Configuration.get_default_copy()
    except kubernetes.config.ConfigException:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=config
        )
    config.connection_pool_maxsize = 32
    return Kube(kubernetes.client.ApiClient(config))


# ---------------------------------------------------------------- the object store (progress, output)

_stores: dict[tuple[str, str], Any] = {}


def _store(spec: FineTuneJobSpec) -> Any:
    """The job's output store (cached per URI and S3 settings); None where the operator cannot read it.

    The operator reads with its own identity: boto3's chain (IRSA, environment) or a Secret mounted at
    /var/run/secrets/kubetune/s3 (kubetune_trainer.store's default); it never reads the job's Secret.
    """
    if parse_uri(spec.output.uri).scheme == "pvc":
        return None  # mounted in the trainer pods only
    from kubetune_trainer.store import open_store  # no torch; boto3 only for s3://

    s3 = spec.storage.s3
    key = (spec.output.uri, s3.model_dump_json() if s3 else "")
    if key not in _stores:
        _stores[key] = open_store(spec.output.uri, s3, max_attempts=2, connect_timeout=3.0, read_timeout=10.0)
    return _stores[key]


def read_progress(spec: FineTuneJobSpec) -> TrainerProgress | None:
    """The trainer's progress.json, or None (not written yet, not one, or the store cannot be read)."""
    from kubetune_trainer.store import ObjectNotFound, StoreError

    try:
        store = _store(spec)
        return None if store is None else TrainerProgress.from_json(store.get_bytes(PROGRESS_FILE))
    except ObjectNotFound:
        return None
    except (StoreError, ValueError, OSError, ImportError) as e:  # ImportError: no boto3 in this image
        log.warning("cannot read %s of %s: %s", PROGRESS_FILE, spec.output.uri, e)
        return None


def read_evaluation(spec: FineTuneJobSpec) -> state.EvaluationRead:
    """<output>/eval/results.json, read like progress.json (spec.evaluation's scores)."""
    from kubetune_trainer.store import LocalStore, ObjectNotFound, StoreError

    uri = output_uri(spec.output.uri, EVAL_RESULTS_FILE)
    try:
        store = _store(spec)
        if store is None or (isinstance(store, LocalStore) and not store.path("").exists()):
            return state.EvaluationRead(None, uri, readable=False)  # not this operator's file system
        return state.EvaluationRead(json.loads(store.get_bytes(EVAL_RESULTS_FILE)), uri)
    except ObjectNotFound:
        return state.EvaluationRead(None, uri)
    except (StoreError, OSError) as e:  # the store failed: the read is tried again
        log.warning("cannot read %s: %s", uri, e)
        return state.EvaluationRead(None, uri, readable=False, error=str(e).splitlines()[0][:300])
    except (ValueError, ImportError) as e:  # ImportError: no boto3 in this image
        log.warning("cannot read %s: %s", uri, e)
        return state.EvaluationRead(None, uri, readable=False)


def output_committed(spec: FineTuneJobSpec, progress: TrainerProgress | None) -> bool | None:
    """Whether the trainer committed its final output: progress.json says done, or final/ exists.

    None when the operator cannot tell (pvc://, a file:// path on another machine, store errors):
    then rank 0's exit code 0 is trusted.
    """
    if progress is not None and progress.state == "done":
        return True
    try:
        store = _store(spec)
        if store is None:
            return None
        from kubetune_trainer.store import LocalStore

        if isinstance(store, LocalStore) and not store.path("").exists():
            return None  # the trainers' file system is not this operator's
        return bool(store.list(f"{FINAL_DIR}/"))
    except Exception as e:  # noqa: BLE001 - any store trouble means "cannot tell"
        log.warning("cannot check the output of %s: %s", spec.output.uri, e)
        return None


# ---------------------------------------------------------------- reconcile

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def _job_lock(namespace: str, name: str) -> Iterator[None]:
    """One reconcile of a job at a time in this process (kopf runs timers and handlers concurrently)."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch (RFC 7386) turning status `old` into `new`: null removes a key, nested objects
    too (a merge patch merges them, so a key left out would stay); kopf's own key is left alone."""
    patch = _merge_diff(old, new)
    if "kopf" not in new:
        patch.pop("kopf", None)
    return patch


def _merge_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    patch = {
        k: _merge_diff(old[k], v) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
        for k, v in new.items()
        if old.get(k) != v
    }
    patch.update({k: None for k in old if k not in new})
    return patch


def _job_model(job: dict) -> FineTuneJob:
    return FineTuneJob.model_validate({k: job[k] for k in ("apiVersion", "kind", "metadata", "spec")})


def _effective(kube: Kube, spec: FineTuneJobSpec, status: dict) -> tuple[profiles.Resolved, dict | None]:
    """The job's spec with its profile applied, and the profile record for its status.

    The profile is read once, at the job's first reconcile, and kept in status.profile; every later
    reconcile merges the live job spec with that snapshot, so editing the profile never changes a job
    that exists (and its limits still hold for the job's own later edits)."""
    rec = status.get("profile")
    if rec is None and not status.get("attempt") and status.get("phase") not in state.TERMINAL:
        rec, problem = profiles.choose(spec.profile, kube.list_profiles())
        if problem:
            return profiles.Resolved(None, [("spec.profile", problem)]), None
    resolved = profiles.resolve(spec, profiles.from_record(rec) if rec else None)
    if rec is not None and resolved.spec is not None:
        rec = {**rec, "hash": profiles.spec_hash(resolved.spec)}
    return resolved, rec


def _snapshot_spec(model: FineTuneJob, status: dict) -> FineTuneJobSpec:
    """The effective spec from the status snapshot alone (no API call); the job's own if it fails."""
    rec = status.get("profile")
    resolved = profiles.resolve(model.spec, profiles.from_record(rec)) if rec else None
    return resolved.spec if resolved is not None and resolved.spec is not None else model.spec


def reconcile(kube: Kube, namespace: str, name: str, *, trigger: str) -> state.Decision | None:
    """Bring one job one step closer to its goal. Returns the decision applied (None: job gone)."""
    started = time.monotonic()
    try:
        with _job_lock(namespace, name):
            for _ in range(5):  # a conflicting write (another reconcile, the progress timer): read again
                job = kube.get_job(namespace, name)
                if job is None or job["metadata"].get("deletionTimestamp"):
                    metrics.set_phase(namespace, name, None)
                    return None
                try:
                    decision = _reconcile_once(kube, job)
                except ApiException as e:
                    if e.status == 409:
                        continue
                    raise
                metrics.set_phase(namespace, name, decision.status.get("phase"))
                return decision
            raise kopf.TemporaryError("the job kept changing while reconciling it", delay=1)
    except Exception:
        metrics.ERRORS.inc()
        raise
    finally:
        metrics.RECONCILE.labels(trigger=trigger).observe(time.monotonic() - started)


def _reconcile_once(kube: Kube, job: dict) -> state.Decision:
    meta = job["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = job.get("status") or {}
    now = dt.datetime.now(dt.timezone.utc)
    try:
        model = _job_model(job)
    except pydantic.ValidationError as e:  # e.g. a CRD on the cluster older than this operator
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        decision = state.invalid_spec(
            status, int(meta.get("generation") or 1), now, f"{where}: {first['msg']}"
        )
        if patch := status_patch(status, decision.status):
            kube.patch_status(namespace, name, patch, meta.get("resourceVersion"))
        return decision
    resolved, rec = _effective(kube, model.spec, status)
    if rec is not None:
        status = {**status, "profile": rec}  # carried into the new status by the state machine
    if resolved.spec is None and status.get("phase") not in state.TERMINAL:
        generation = int(meta.get("generation") or 1)
        decision = state.profile_violation(status, generation, now, resolved.message())
        if patch := status_patch(job.get("status") or {}, decision.status):
            kube.patch_status(namespace, name, patch, meta.get("resourceVersion"))
        for ev in decision.events:
            kube.event(job, ev)
        return decision
    spec = resolved.spec or model.spec  # a finished job keeps being cleaned up by its own spec
    model = model.model_copy(update={"spec": spec})  # what is rendered: the effective spec
    pods = kube.list_pods(namespace, naming.job_selector(name))
    observed = tuple(state.observe_pod(p, render.CONTAINER) for p in pods)
    attempt = int(status.get("attempt") or 0)
    rank0_done = any(p.attempt == attempt and p.rank == 0 and p.phase == "Succeeded" for p in observed)

    progress = committed = evaluation = None
    if rank0_done and status.get("phase") not in state.TERMINAL:  # the last progress and the output check
        progress = read_progress(spec)
        committed = output_committed(spec, progress)
        evaluation = read_evaluation(spec) if spec.evaluation is not None else None
    elif spec.evaluation is not None and state.rereads_evaluation(status):
        evaluation = read_evaluation(spec)
    decision = state.decide(
        state.Observed(
            spec=spec, status=status, generation=int(meta.get("generation") or 1), pods=observed,
            now=now, output_committed=committed, evaluation=evaluation,
        )
    )  # fmt: skip
    decision.status.update(state.progress_status(progress))

    patch = status_patch(job.get("status") or {}, decision.status)
    if patch:  # 1. the status, guarded: on 409 the caller reads again and decides again
        kube.patch_status(namespace, name, patch, meta.get("resourceVersion"))
    if decision.restart_reason:
        metrics.RESTARTS.labels(reason=decision.restart_reason).inc()
    if decision.create_attempt is not None:  # 2. the gang (what exists already stays)
        present = {p.name for p in observed}
        for obj in render.render_job(model, decision.create_attempt, trainer_image=TRAINER_IMAGE):
            if obj["kind"] != "Pod" or obj["metadata"]["name"] not in present:
                kube.create(obj)
    for pod in decision.delete_pods:  # 3. pods that must go (the trainer saves on SIGTERM)
        kube.delete_pod(namespace, pod)
    for pod in decision.force_delete_pods:
        kube.delete_pod(namespace, pod, force=True)
    if decision.delete_configs_before is not None and decision.delete_configs_before > 1:
        kube.delete_old_configmaps(namespace, name, decision.delete_configs_before)
    for ev in decision.events:  # 4. what happened, for `kubectl describe` / `kubectl get events`
        kube.event(job, ev)
    if decision.delete_job:  # 5. spec.ttl_seconds_after_finished has passed
        ttl = spec.ttl_seconds_after_finished
        log.info("%s/%s: deleting the finished job (ttl_seconds_after_finished=%s)", namespace, name, ttl)
        kube.delete_job(namespace, name)
    if patch or decision.create_attempt is not None or decision.delete_pods or decision.force_delete_pods:
        log.info(
            "%s/%s: %s (%s)", namespace, name, decision.status.get("phase"), decision.status.get("message")
        )
    return decision


def refresh_progress(kube: Kube, namespace: str, name: str) -> None:
    """Copy progress.json into the status (progress, last_checkpoint) when it changed."""
    with _job_lock(namespace, name):
        job = kube.get_job(namespace, name)
        if job is None:
            return
        status = job.get("status") or {}
        fields = state.progress_status(read_progress(_snapshot_spec(_job_model(job), status)))
        step = (fields.get("progress") or {}).get("step")
        if step is not None and step != (status.get("progress") or {}).get("step"):
            # what restart_policy.progress_timeout_seconds measures from
            fields["progress_advanced_at"] = state.iso(dt.datetime.now(dt.timezone.utc))
        patch = _merge_diff({k: status[k] for k in fields if k in status}, fields)
        if patch:
            kube.patch_status(namespace, name, patch, None)


# ---------------------------------------------------------------- kopf wiring

JOBS = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own progress goes to annotations: the CRD's status schema has no place for it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.io")
    settings.posting.level = logging.WARNING  # our own Events say what happens; not every handler run
    settings.execution.max_workers = int(os.environ.get("KUBETUNE_WORKERS", "16"))
    settings.watching.server_timeout = 300
    memo.kube = connect()
    memo.periodic = Periodic(memo.kube, settings.execution.max_workers)
    memo.periodic.start()
    metrics.serve(METRICS_PORT)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    return metrics.job_count()


@kopf.on.create(*JOBS)
@kopf.on.resume(*JOBS)
@kopf.on.update(*JOBS, field="spec")
def on_change(name: str, namespace: str, memo: kopf.Memo, reason: str, **_: Any) -> None:
    reconcile(memo.kube, namespace, name, trigger=str(reason))


@kopf.on.event(*JOBS)
def on_job_event(event: dict, body: kopf.Body, **_: Any) -> None:
    """Keep the periodic loop's list of jobs and the per-job metrics current (kopf's watch sees
    every job it serves)."""
    key = (body.metadata.namespace, body.metadata.name)
    if event.get("type") == "DELETED":
        _jobs.pop(key, None)
        metrics.forget_job(*key)
    else:
        _jobs[key] = (dict(body.get("status") or {}), dict(body.get("spec") or {}))
        metrics.observe_job(*key, _jobs[key][0])


# ---------------------------------------------------------------- the periodic loop

_jobs: dict[tuple[str, str], tuple[dict, dict]] = {}  # (namespace, name) -> (status, spec), from the watch


class Periodic:
    """Reconciles every known job each RECONCILE_INTERVAL and copies progress each PROGRESS_INTERVAL,
    on a worker pool; a job already queued is not queued again."""

    def __init__(self, kube: Kube, workers: int) -> None:
        self.kube = kube
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetune-loop")
        self.stop = threading.Event()
        self.busy: set[tuple[str, str, str]] = set()
        self.guard = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="kubetune-periodic", daemon=True)

    def _submit(self, what: str, key: tuple[str, str], fn: Callable[[], Any]) -> None:
        tag = (what, *key)
        with self.guard:
            if tag in self.busy:
                return
            self.busy.add(tag)

        def run() -> None:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - logged; the next round tries again
                log.warning("%s of %s/%s failed: %s", what, key[0], key[1], e)
            finally:
                with self.guard:
                    self.busy.discard(tag)

        self.pool.submit(run)

    def _run(self) -> None:
        next_progress = 0.0
        while not self.stop.wait(RECONCILE_INTERVAL):
            now = dt.datetime.now(dt.timezone.utc)
            progress = time.monotonic() >= next_progress
            if progress:
                next_progress = time.monotonic() + PROGRESS_INTERVAL
            for key, (status, spec) in list(_jobs.items()):
                if state.needs_watching(status, spec, now):
                    self._submit("reconcile", key, lambda k=key: reconcile(self.kube, *k, trigger="timer"))
                if progress and status.get("phase") in (state.PENDING, state.RUNNING, state.RESTARTING):
                    self._submit("progress", key, lambda k=key: refresh_progress(self.kube, *k))

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.pool.shutdown(wait=False, cancel_futures=True)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "periodic", None) is not None:
        memo.periodic.close()


@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: MANAGER})
def on_pod_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    owner = next(
        (
            r
            for r in body.metadata.get("ownerReferences") or []
            if r.get("kind") == KIND and r.get("controller")
        ),
        None,
    )
    if owner is not None:
        reconcile(memo.kube, body.metadata.namespace, owner["name"], trigger="pod")


@kopf.on.delete(*JOBS, optional=True)
def on_delete(name: str, namespace: str, **_: Any) -> None:
    metrics.set_phase(namespace, name, None)
    with _locks_guard:
        _locks.pop((namespace, name), None)
