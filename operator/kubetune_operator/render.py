"""render_job(job, attempt) -> the Kubernetes objects of one gang attempt (a pure function).

No kopf, no Kubernetes client, no torch: `kubetune render job.yaml` prints the same objects the
operator creates, for review and GitOps diffs. The list is always

    [headless Service, ConfigMap, Pod rank 0, Pod rank 1, ..., Pod rank nnodes-1]

The Service is the job's (the same for every attempt); the ConfigMap and Pods belong to the attempt.

Each pod runs the trainer's supervisor around torchrun:

    python -m kubetune_trainer.supervise -- torchrun --nnodes N --nproc-per-node P --node-rank i
        --rdzv-backend c10d --rdzv-endpoint <pod rank 0>.<service>.<ns>.svc:29500 --rdzv-id ...
        --rdzv-conf is_host=<1 on rank 0, else 0>,join_timeout=1800,read_timeout=1800
        --max-restarts K -m kubetune_trainer --config /etc/kubetune/job.yaml

Rendezvous does not depend on DNS timing. Left alone, torchrun hosts the c10d store in the pod whose
own addresses the endpoint's name resolves to when it starts; a record that is not published yet
(or negative-cached) leaves no pod hosting it. So rank 0 is told (`is_host=1`, the others
`is_host=0`), and `read_timeout` equals the join timeout: TCPStore retries connecting, name lookup
included, until that timeout (torchrun's default is 60 s), so every rank, rank 0's own store client
too, waits for rank 0's name as long as for a late pod. The price: a store operation against a peer
that hangs without dying also waits that long (a lost node is handled by the operator). The record
comes once the pod has an IP, not once it is ready: the headless service publishes not-ready
addresses. Pods meet the "restricted" Pod Security Standard: the root filesystem is
read-only and everything the trainer writes goes to emptyDirs (/tmp with the caches, /dev/shm).
S3 credentials are only ever a reference: the job's Secret is mounted where the trainer's object
store looks for it (kubetune_trainer.store), never copied into the manifests.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubetune import conventions as c
from kubetune.spec import API_VERSION, DEFAULT_TRAINER_IMAGE, KIND, FineTuneJob, PodSettings
from kubetune.uris import parse_uri, pvc_mount_path
from kubetune_operator import naming

CONTAINER = "trainer"
TRAINER_UID = 1000  # the trainer image's user (trainer_image/Dockerfile)
GRACE_MARGIN_SECONDS = 15  # on top of the trainer's save time: torchrun stopping workers, process exit
RDZV_JOIN_TIMEOUT_SECONDS = 1800  # pods of a gang can start far apart (multi-GB image pulls)

SCRATCH_DIR = "/tmp"
CACHE_DIR = f"{SCRATCH_DIR}/kubetune"  # $KUBETUNE_CACHE_DIR: downloaded models, local checkpoints
SHM_DIR = "/dev/shm"

# Environment that points every cache into the writable scratch emptyDir (the image sets the same).
CACHE_ENV = {
    "HOME": SCRATCH_DIR,
    c.ENV_CACHE_DIR: CACHE_DIR,
    "HF_HOME": f"{CACHE_DIR}/huggingface",
    "TORCH_HOME": f"{CACHE_DIR}/torch",
    "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
    "XDG_CACHE_HOME": f"{SCRATCH_DIR}/.cache",
    "MPLCONFIGDIR": f"{SCRATCH_DIR}/matplotlib",
    "PYTHONUNBUFFERED": "1",
}

# Kueue: labels/annotations copied from the FineTuneJob to its pods, and the pod-group marks.
KUEUE_PREFIX = "kueue.x-k8s.io/"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_GROUP_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"


def render_job(job: FineTuneJob, attempt: int = 1, *, trainer_image: str | None = None) -> list[dict]:
    """The Service, ConfigMap and one Pod per node rank for gang attempt `attempt` (1-based).

    `trainer_image` replaces the spec's image when the spec leaves it at the built-in default
    (the operator passes its configured default trainer image, e.g. a mirror in an air-gapped
    cluster). The job's uid, when `job.metadata` carries one (a job read from the API server),
    becomes the owner reference of every object; offline renders have none and get no owner.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    return [
        render_service(job),
        render_configmap(job, attempt),
        *(
            render_pod(job, attempt, rank, trainer_image=trainer_image)
            for rank in range(job.spec.parallel_config.nnodes)
        ),
    ]


# ---------------------------------------------------------------- metadata


def job_uid(job: FineTuneJob) -> str | None:
    """The FineTuneJob's uid when it was read from the API server (ObjectMeta allows extra fields)."""
    uid = (job.metadata.model_extra or {}).get("uid")
    return str(uid) if uid else None


def owner_references(job: FineTuneJob) -> list[dict[str, Any]]:
    uid = job_uid(job)
    if not uid:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": job.name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _metadata(
    job: FineTuneJob,
    name: str,
    component: str,
    labels: dict[str, str],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": {
            **labels,
            "app.kubernetes.io/name": "kubetune",
            "app.kubernetes.io/instance": labels[c.LABEL_JOB],
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "kubetune",
        },
    }
    if annotations:
        meta["annotations"] = annotations
    owners = owner_references(job)
    if owners:
        meta["ownerReferences"] = owners
    return meta


# ---------------------------------------------------------------- service and config map


def render_service(job: FineTuneJob) -> dict[str, Any]:
    """Headless Service giving every pod the DNS name <pod>.<service>.<ns>.svc, ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, naming.service_name(job.name), "rendezvous", naming.job_labels(job.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.job_labels(job.name),
            "ports": [{"name": "rdzv", "port": c.RDZV_PORT, "targetPort": c.RDZV_PORT, "protocol": "TCP"}],
        },
    }


def trainer_config(job: FineTuneJob) -> str:
    """The FineTuneJob YAML the trainer reads at CONFIG_PATH (spec only; status is the operator's)."""
    meta: dict[str, Any] = {"name": job.name, "namespace": job.namespace}
    uid = job_uid(job)
    if uid:
        meta["uid"] = uid
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": job.spec.model_dump(mode="json", exclude_none=True),
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)


def render_configmap(job: FineTuneJob, attempt: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            job, naming.configmap_name(job.name, attempt), "config", naming.attempt_labels(job.name, attempt)
        ),
        "data": {c.CONFIG_FILE: trainer_config(job)},
        "immutable": True,
    }


# ---------------------------------------------------------------- pods


def nproc_per_node(job: FineTuneJob) -> int:
    """Processes per pod: the spec's, else one per GPU, else 1."""
    p = job.spec.parallel_config
    return p.nproc_per_node or job.spec.resources.gpus or 1


def torchrun_command(job: FineTuneJob, attempt: int, rank: int) -> list[str]:
    """The container command of node rank `rank`: supervise -- torchrun ... -m kubetune_trainer."""
    p = job.spec.parallel_config
    return [
        "python", "-m", "kubetune_trainer.supervise", "--",
        "torchrun",
        "--nnodes", str(p.nnodes),
        "--nproc-per-node", str(nproc_per_node(job)),
        "--node-rank", str(rank),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", naming.rdzv_endpoint(job.name, job.namespace, attempt),
        "--rdzv-id", f"{job_uid(job) or job.name}-a{attempt}",
        # Rank 0 hosts the store whether or not its name resolves yet; every rank retries the name
        # (read_timeout is also TCPStore's connect deadline) as long as it waits for late pods.
        "--rdzv-conf", f"is_host={int(rank == 0)},join_timeout={RDZV_JOIN_TIMEOUT_SECONDS},"
                       f"read_timeout={RDZV_JOIN_TIMEOUT_SECONDS}",
        "--max-restarts", str(p.max_worker_restarts),
        "-m", "kubetune_trainer",
        "--config", c.CONFIG_PATH,
    ]  # fmt: skip


def pvc_claims(job: FineTuneJob) -> dict[str, bool]:
    """PersistentVolumeClaims named by pvc:// URIs in the spec -> whether the trainer writes to them.

    Every URI field of the spec counts (FineTuneJobSpec.uri_fields), so a URI field added to the spec
    later is mounted too. Claims holding checkpoints or outputs are writable.
    """
    claims: dict[str, bool] = {}
    for where, value in job.spec.uri_fields():
        uri = parse_uri(value)
        if uri.scheme == "pvc":
            writable = where.startswith(("spec.checkpoint.", "spec.output."))
            claims[uri.netloc] = claims.get(uri.netloc, False) or writable
    return claims


def _pvc_volume_name(claim: str) -> str:
    return naming._fit(claim, prefix="pvc-")


def _resources(job: FineTuneJob) -> dict[str, Any]:
    r = job.spec.resources
    amounts: dict[str, str] = {"cpu": r.cpu, "memory": r.memory}
    if r.scratch_volume is None:  # scratch on the node's disk: the scheduler must see its size
        amounts["ephemeral-storage"] = r.scratch_size
    if r.gpus:
        amounts["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _env(job: FineTuneJob, attempt: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": c.ENV_JOB_NAME, "value": job.name},
        {"name": c.ENV_ATTEMPT, "value": str(attempt)},
        {"name": "KUBETUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KUBETUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MASTER_ADDR", "value": naming.pod_fqdn(job.name, job.namespace, attempt, 0)},
        {"name": "MASTER_PORT", "value": str(c.RDZV_PORT)},
        {"name": c.ENV_TERMINATION_MESSAGE_PATH, "value": c.TERMINATION_MESSAGE_PATH},
    ]
    env += [{"name": k, "value": v} for k, v in CACHE_ENV.items()]
    s3 = job.spec.storage.s3
    if s3 is not None:
        env += [
            {"name": "AWS_REGION", "value": s3.region},
            {"name": "AWS_DEFAULT_REGION", "value": s3.region},
        ]
        if s3.endpoint:
            env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint})
        if s3.credentials_secret:
            env.append({"name": c.ENV_S3_CREDENTIALS_DIR, "value": c.S3_CREDENTIALS_DIR})
    return env + _tracking_env(job)


# Keys of spec.tracking's Secrets, each the name of the variable transformers' callbacks read.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
WANDB_SECRET_KEY = "WANDB_API_KEY"


def _tracking_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """Tracker credentials as references to the Secrets spec.tracking names (never their values).
    MLflow's keys are each optional: a Secret holds a username and password, or a token."""
    t = job.spec.tracking
    env: list[dict[str, Any]] = []
    if t.mlflow is not None and t.mlflow.credentials_secret:
        for key in MLFLOW_SECRET_KEYS:
            ref = {"name": t.mlflow.credentials_secret, "key": key, "optional": True}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if t.wandb is not None and t.wandb.api_key_secret:
        ref = {"name": t.wandb.api_key_secret, "key": WANDB_SECRET_KEY}
        env.append({"name": WANDB_SECRET_KEY, "valueFrom": {"secretKeyRef": ref}})
    return env


def _scratch_volume(job: FineTuneJob) -> dict[str, Any]:
    """/tmp: an emptyDir capped at resources.scratch_size (the kubelet evicts a pod that outgrows it),
    or a generic ephemeral volume (a PVC made for the pod and deleted with it) of scratch_volume.size."""
    r = job.spec.resources
    if r.scratch_volume is None:
        return {"name": "scratch", "emptyDir": {"sizeLimit": r.scratch_size}}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": r.scratch_volume.size}},
    }
    if r.scratch_volume.storage_class:
        claim["storageClassName"] = r.scratch_volume.storage_class
    template = {"metadata": {"labels": naming.job_labels(job.name)}, "spec": claim}
    return {"name": "scratch", "ephemeral": {"volumeClaimTemplate": template}}


def _volumes(job: FineTuneJob, attempt: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, container volume mounts)."""
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "configMap": {
                "name": naming.configmap_name(job.name, attempt),
                "items": [{"key": c.CONFIG_FILE, "path": c.CONFIG_FILE}],
            },
        },
        _scratch_volume(job),
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.spec.resources.shm_size}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": c.CONFIG_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "dshm", "mountPath": SHM_DIR},
    ]
    s3 = job.spec.storage.s3
    if s3 is not None and s3.credentials_secret:
        # Keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [/ AWS_SESSION_TOKEN] become files the trainer's
        # group (fsGroup) can read; a rotated Secret reaches running pods without a restart.
        volumes.append(
            {"name": "s3-credentials", "secret": {"secretName": s3.credentials_secret, "defaultMode": 0o440}}
        )
        mounts.append({"name": "s3-credentials", "mountPath": c.S3_CREDENTIALS_DIR, "readOnly": True})
    for claim, writable in sorted(pvc_claims(job).items()):
        vol = _pvc_volume_name(claim)
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": vol, "mountPath": pvc_mount_path(claim), "readOnly": not writable})
    return volumes, mounts


def _kueue(job: FineTuneJob) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that make Kueue admit the gang as one pod group; empty without a queue.
    The queue comes from the job's own labels or from spec.pod (e.g. a profile's queue)."""
    pod = job.spec.pod
    labels = {k: v for k, v in job.metadata.labels.items() if k.startswith(KUEUE_PREFIX)}
    annotations = {k: v for k, v in job.metadata.annotations.items() if k.startswith(KUEUE_PREFIX)}
    if pod is not None:
        labels = {**{k: v for k, v in pod.labels.items() if k.startswith(KUEUE_PREFIX)}, **labels}
    if KUEUE_QUEUE_LABEL not in labels:
        return {}, {}
    labels[KUEUE_GROUP_LABEL] = naming.pod_group_name(job.name)
    annotations[KUEUE_GROUP_COUNT_ANNOTATION] = str(job.spec.parallel_config.nnodes)
    return labels, annotations


def image_of(job: FineTuneJob, trainer_image: str | None = None) -> str:
    if trainer_image and job.spec.image == DEFAULT_TRAINER_IMAGE:
        return trainer_image
    return job.spec.image


def render_pod(
    job: FineTuneJob, attempt: int, rank: int, *, trainer_image: str | None = None
) -> dict[str, Any]:
    spec = job.spec
    res = spec.resources
    pod = spec.pod or PodSettings()
    kueue_labels, kueue_annotations = _kueue(job)
    volumes, mounts = _volumes(job, attempt)
    name = naming.pod_name(job.name, attempt, rank)
    meta = _metadata(
        job,
        name,
        "trainer",
        {**pod.labels, **naming.pod_labels(job.name, attempt, rank), **kueue_labels},
        {**pod.annotations, "kubectl.kubernetes.io/default-container": CONTAINER, **kueue_annotations},
    )
    container = {
        "name": CONTAINER,
        "image": image_of(job, trainer_image),
        "imagePullPolicy": spec.image_pull_policy,
        "command": torchrun_command(job, attempt, rank),
        "workingDir": SCRATCH_DIR,
        "env": _env(job, attempt) + copy.deepcopy(pod.env),
        "ports": [{"name": "rdzv", "containerPort": c.RDZV_PORT, "protocol": "TCP"}],
        "resources": _resources(job),
        "volumeMounts": mounts + copy.deepcopy(pod.volume_mounts),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # the trainer writes its one-line reason for a user error here (exit 65); else the log tail
        "terminationMessagePath": c.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "hostname": name,
        "subdomain": naming.service_name(job.name),
        "restartPolicy": "Never",  # the operator restarts the whole gang
        "terminationGracePeriodSeconds": spec.checkpoint.sigterm_grace_seconds + GRACE_MARGIN_SECONDS,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the trainer never talks to the API server
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            # no recursive chown of big model/data claims on every start
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes + copy.deepcopy(pod.volumes),
    }
    if pod.env_from:
        container["envFrom"] = copy.deepcopy(pod.env_from)
    if pod.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in pod.image_pull_secrets]
    if pod.runtime_class_name:
        pod_spec["runtimeClassName"] = pod.runtime_class_name
    if pod.scheduler_name:
        pod_spec["schedulerName"] = pod.scheduler_name
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = copy.deepcopy(res.tolerations)
    if res.affinity:
        pod_spec["affinity"] = copy.deepcopy(res.affinity)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if res.service_account_name:
        pod_spec["serviceAccountName"] = res.service_account_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


# ---------------------------------------------------------------- printing


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's job.yaml) print as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(docs: list[dict]) -> str:
    """Objects as one multi-document YAML stream (what `kubetune render` prints)."""
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
