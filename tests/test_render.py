"""render_job: the Service, ConfigMap and Pods of a gang attempt, valid for a real API server."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune import conventions as c
from kubetune.spec import DEFAULT_TRAINER_IMAGE, FineTuneJob
from kubetune.uris import pvc_mount_path
from kubetune.validate import load_jobs, load_jobs_text
from kubetune_operator import naming
from kubetune_operator.render import render_job, to_yaml, trainer_config
from tests.kube_checks import K8S_VERSIONS, name_problems, restricted_problems, validate_strict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(ROOT.glob("examples/*.yaml"))
UID = "6f1c2a44-1b2e-4d1c-9c55-0c7b8a1d2e3f"


def make_job(spec: dict[str, Any] | None = None, *, name: str = "demo", **meta: Any) -> FineTuneJob:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/alpaca.json"},
        "output": {"uri": "s3://runs/demo"},
    }
    base.update(spec or {})
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", **meta},
        "spec": base,
    }
    return load_jobs_text(yaml.safe_dump(doc))[0]


def pods(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] == "Pod"]


def container(pod: dict) -> dict:
    (ctr,) = pod["spec"]["containers"]
    return ctr


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def env_of(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(pod)["env"]}


MULTI = {
    "parallel_config": {"nnodes": 4, "max_worker_restarts": 2},
    "resources": {
        "gpus": 8, "cpu": "96", "memory": "1Ti", "shm_size": "64Gi",
        "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["a"]}]}
        ]}}},
        "priority_class_name": "training-high",
        "service_account_name": "trainer",
    },
    "storage": {"s3": {"endpoint": "http://minio.storage.svc:9000", "credentials_secret": "s3-creds"}},
    "checkpoint": {"sigterm_grace_seconds": 60},
}  # fmt: skip


def all_cases() -> list[tuple[str, FineTuneJob]]:
    cases = [(p.name, job) for p in EXAMPLES for job in load_jobs(p)]
    cases += [
        ("built:minimal", make_job()),
        ("built:multi", make_job(MULTI, uid=UID, labels={"kueue.x-k8s.io/queue-name": "gpu"})),
        (
            "built:pvc",
            make_job(
                {
                    "model": {"uri": "pvc://models/qwen"},
                    "dataset": {
                        "uri": "pvc://data/a.json",
                        "mix": [{"uri": "pvc://mix/b.json", "ratio": 0.2}],
                    },
                    "output": {"uri": "pvc://runs/x"},
                },
                uid=UID,
            ),
        ),
        ("built:long-name", make_job(MULTI, name="x" * 63, uid=UID)),
        ("built:digit-name", make_job(name="7b-lora")),
    ]
    return cases


CASES = all_cases()


def test_every_example_is_covered():
    assert len(EXAMPLES) >= 5, "examples/*.yaml went missing"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("label", "job"), CASES, ids=[c[0] for c in CASES])
def test_rendered_objects_pass_strict_validation(label, job, version):
    objs = render_job(job, attempt=3)
    assert [o["kind"] for o in objs] == ["Service", "ConfigMap"] + ["Pod"] * job.spec.parallel_config.nnodes
    for obj in objs:
        validate_strict(obj, version)
        assert name_problems(obj) == []
    for pod in pods(objs):
        assert restricted_problems(pod["spec"]) == []


def test_strict_validation_catches_unknown_and_mistyped_fields():
    """The validator used above is not a no-op: a typo or a wrong type in a pod fails."""
    pod = pods(render_job(make_job()))[0]
    bad = copy.deepcopy(pod)
    bad["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(bad)
    bad = copy.deepcopy(pod)
    bad["spec"]["terminationGracePeriodSeconds"] = "40"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(bad)
    bad = copy.deepcopy(pod)
    container(bad)["securityContext"]["capabilities"]["drop"] = "ALL"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_strict(bad)


@pytest.mark.parametrize("nnodes", [1, 4])
def test_torchrun_arguments_per_rank(nnodes):
    job = make_job(
        {"parallel_config": {"nnodes": nnodes, "max_worker_restarts": 3}, "resources": {"gpus": 2}}
    )
    objs = render_job(job, attempt=2)
    gang = pods(objs)
    assert len(gang) == nnodes
    service = objs[0]
    rank0 = gang[0]
    rank0_dns = f"{rank0['spec']['hostname']}.{rank0['spec']['subdomain']}.team-a.svc"
    assert rank0["spec"]["subdomain"] == service["metadata"]["name"]
    assert rank0["spec"]["hostname"] == rank0["metadata"]["name"]
    for rank, pod in enumerate(gang):
        cmd = container(pod)["command"]
        assert cmd[:5] == ["python", "-m", "kubetune_trainer.supervise", "--", "torchrun"]
        assert cmd[-4:] == ["-m", "kubetune_trainer", "--config", c.CONFIG_PATH]
        assert flag(cmd, "--nnodes") == str(nnodes)
        assert flag(cmd, "--nproc-per-node") == "2"  # default: one process per GPU
        assert flag(cmd, "--node-rank") == str(rank)
        assert flag(cmd, "--rdzv-backend") == "c10d"
        assert flag(cmd, "--rdzv-endpoint") == f"{rank0_dns}:{c.RDZV_PORT}"
        assert flag(cmd, "--rdzv-id") == "demo-a2"  # no uid offline: name and attempt
        assert flag(cmd, "--max-restarts") == "3"
        assert pod["metadata"]["labels"][c.LABEL_RANK] == str(rank)
        assert pod["metadata"]["labels"][c.LABEL_ATTEMPT] == "2"
        env = env_of(pod)
        assert env[c.ENV_ATTEMPT]["value"] == "2"
        assert env[c.ENV_JOB_NAME]["value"] == "demo"
        assert env["MASTER_ADDR"]["value"] == rank0_dns
    names = [p["metadata"]["name"] for p in gang]
    assert len(set(names)) == nnodes
    # the rendezvous name resolves before the pods are ready, and reaches rank 0's port
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert {"name": "rdzv", "containerPort": c.RDZV_PORT, "protocol": "TCP"} in container(rank0)["ports"]


def test_rank_0_hosts_the_rendezvous_store_by_flag_and_the_others_wait_for_it():
    """Who hosts the c10d store is said, not guessed from what the endpoint's name resolves to when
    torchrun starts; every rank retries the endpoint (read_timeout) as long as the join timeout."""
    gang = pods(render_job(make_job({"parallel_config": {"nnodes": 3}})))
    confs = [
        dict(kv.split("=", 1) for kv in flag(container(p)["command"], "--rdzv-conf").split(",")) for p in gang
    ]
    assert [conf["is_host"] for conf in confs] == ["1", "0", "0"]
    for conf in confs:
        assert conf["read_timeout"] == conf["join_timeout"] == "1800"


def test_nproc_per_node_defaults():
    def nproc(spec: dict) -> str:
        return flag(container(pods(render_job(make_job(spec)))[0])["command"], "--nproc-per-node")

    assert nproc({}) == "1"  # CPU
    assert nproc({"resources": {"gpus": 4}}) == "4"
    assert nproc({"resources": {"gpus": 4}, "parallel_config": {"nproc_per_node": 2}}) == "2"


def test_rdzv_id_uses_the_uid_and_changes_per_attempt():
    job = make_job(uid=UID)
    ids = {flag(container(p)["command"], "--rdzv-id") for a in (1, 2) for p in pods(render_job(job, a))}
    assert ids == {f"{UID}-a1", f"{UID}-a2"}


def test_attempts_get_distinct_pod_names_and_same_service_and_config():
    job = make_job({"parallel_config": {"nnodes": 2}})
    one, two = render_job(job, 1), render_job(job, 2)
    assert {p["metadata"]["name"] for p in pods(one)}.isdisjoint(p["metadata"]["name"] for p in pods(two))
    assert one[0] == two[0]  # the job's service
    # each attempt reads its own immutable copy of the spec
    assert one[1]["metadata"]["name"] == "demo-a1-config" and two[1]["metadata"]["name"] == "demo-a2-config"
    assert one[1]["data"] == two[1]["data"] and one[1]["immutable"] is True
    assert [p["metadata"]["name"] for p in pods(one)] == ["demo-a1-r0", "demo-a1-r1"]
    for attempt, objs in ((1, one), (2, two)):
        for obj in objs[1:]:
            assert obj["metadata"]["labels"][c.LABEL_ATTEMPT] == str(attempt)
        assert c.LABEL_ATTEMPT not in objs[0]["metadata"]["labels"]


def test_owner_references_when_the_job_has_a_uid():
    job = make_job({"parallel_config": {"nnodes": 2}}, uid=UID)
    for obj in render_job(job):
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "demo",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert obj["metadata"]["namespace"] == "team-a"


def test_offline_render_has_no_owner_references():
    for obj in render_job(make_job()):
        assert "ownerReferences" not in obj["metadata"]


def _matches(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (term.split("=", 1) for term in selector.split(",")))


def test_label_selectors_find_the_right_pods():
    job = make_job({"parallel_config": {"nnodes": 3}})
    other = make_job({"parallel_config": {"nnodes": 3}}, name="other")
    a1, a2, b = pods(render_job(job, 1)), pods(render_job(job, 2)), pods(render_job(other, 1))
    everything = a1 + a2 + b
    labels = lambda ps: [p["metadata"]["labels"] for p in ps]  # noqa: E731
    assert [x for x in labels(everything) if _matches(naming.job_selector("demo"), x)] == labels(a1 + a2)
    assert [x for x in labels(everything) if _matches(naming.attempt_selector("demo", 2), x)] == labels(a2)
    # the attempt selector also finds that attempt's config map, and nothing of the job's service
    objs2 = render_job(job, 2)
    assert [
        o["kind"] for o in objs2 if _matches(naming.attempt_selector("demo", 2), o["metadata"]["labels"])
    ] == ["ConfigMap"] + ["Pod"] * 3
    # the headless service selects every pod of its job (any attempt), none of another job's
    selector = render_job(job)[0]["spec"]["selector"]
    assert all(_matches(",".join(f"{k}={v}" for k, v in selector.items()), x) for x in labels(a1 + a2))
    assert not any(_matches(",".join(f"{k}={v}" for k, v in selector.items()), x) for x in labels(b))
    for pod in a1:
        meta = pod["metadata"]["labels"]
        assert meta[c.LABEL_JOB] == "demo"
        assert meta["app.kubernetes.io/managed-by"] == "kubetune"
        assert meta["app.kubernetes.io/instance"] == "demo"
        assert meta["app.kubernetes.io/component"] == "trainer"


def test_long_and_digit_names_stay_valid_and_distinct():
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    for job_name in (long_a, long_b, "7b-lora"):
        for obj in render_job(make_job({"parallel_config": {"nnodes": 12}}, name=job_name), attempt=123):
            assert name_problems(obj) == [], obj["metadata"]["name"]
    assert naming.service_name(long_a) != naming.service_name(long_b)
    assert naming.pod_name(long_a, 1, 0) != naming.pod_name(long_b, 1, 0)
    assert naming.pod_name(long_a, 1, 1) != naming.pod_name(long_a, 11, 1)
    assert naming.service_name("7b-lora")[0].isalpha()


def test_security_context_is_restricted_with_writable_scratch():
    job = make_job({"resources": {"shm_size": "8Gi"}})
    pod = pods(render_job(job))[0]
    spec, ctr = pod["spec"], container(pod)
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sc = ctr["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    # writable emptyDirs: /tmp (caches below it) and a memory-backed /dev/shm of the asked size
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"] == {"sizeLimit": "100Gi"}  # resources.scratch_size
    assert not mounts["/tmp"].get("readOnly")
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert mounts[c.CONFIG_DIR]["readOnly"] is True
    env = env_of(pod)
    for var in (
        "HOME",
        c.ENV_CACHE_DIR,
        "HF_HOME",
        "TORCH_HOME",
        "TRITON_CACHE_DIR",
        "XDG_CACHE_HOME",
        "MPLCONFIGDIR",
    ):
        assert env[var]["value"].startswith("/tmp"), var
    # every path the pod writes is on a writable mount (the root filesystem is read-only)
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    for var in ("HOME", c.ENV_CACHE_DIR, "HF_HOME"):
        assert any(env[var]["value"] == w or env[var]["value"].startswith(w + "/") for w in writable)


def test_restricted_check_is_not_a_no_op():
    pod = pods(render_job(make_job()))[0]
    bad = copy.deepcopy(pod["spec"])
    bad["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    bad["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_problems(bad)) == 2


def test_grace_period_covers_the_sigterm_save():
    pod = pods(render_job(make_job({"checkpoint": {"sigterm_grace_seconds": 90}})))[0]
    assert pod["spec"]["terminationGracePeriodSeconds"] > 90
    assert pod["spec"]["restartPolicy"] == "Never"


def test_resources_and_scheduling_pass_through():
    pod = pods(render_job(make_job(MULTI, uid=UID)))[0]
    amounts = {"cpu": "96", "memory": "1Ti", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "8"}
    assert container(pod)["resources"] == {"requests": amounts, "limits": amounts}
    spec = pod["spec"]
    assert spec["nodeSelector"] == MULTI["resources"]["node_selector"]
    assert spec["tolerations"] == MULTI["resources"]["tolerations"]
    assert spec["affinity"] == MULTI["resources"]["affinity"]
    assert spec["priorityClassName"] == "training-high"
    assert spec["serviceAccountName"] == "trainer"
    assert spec["terminationGracePeriodSeconds"] > 60
    cpu_pod = pods(render_job(make_job()))[0]
    assert "nvidia.com/gpu" not in container(cpu_pod)["resources"]["limits"]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "serviceAccountName"):
        assert field not in cpu_pod["spec"]


def test_s3_credentials_only_by_secret_reference():
    job = make_job(MULTI, uid=UID)
    objs = render_job(job)
    assert "Secret" not in {o["kind"] for o in objs}
    pod = pods(objs)[0]
    env = env_of(pod)
    for name, var in env.items():
        if any(word in name.upper() for word in ("KEY", "SECRET", "TOKEN", "PASSWORD", "CREDENTIAL")):
            # a name of a secret-ish variable may carry a path to a mounted Secret, never a secret
            assert var.get("value") in (None, c.S3_CREDENTIALS_DIR), name
    assert env[c.ENV_S3_CREDENTIALS_DIR]["value"] == c.S3_CREDENTIALS_DIR
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.storage.svc:9000"
    assert env["AWS_REGION"]["value"] == "us-east-1"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(m for m in container(pod)["volumeMounts"] if m["mountPath"] == c.S3_CREDENTIALS_DIR)
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["secret"]["secretName"] == "s3-creds"
    # the trainer's group can read the files, nobody else
    assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o440
    # the same place the trainer's object store looks
    from kubetune_trainer import store

    assert store.ENV_S3_CREDENTIALS_DIR == c.ENV_S3_CREDENTIALS_DIR
    assert store.DEFAULT_S3_CREDENTIALS_DIR == c.S3_CREDENTIALS_DIR


def test_no_credentials_secret_means_no_secret_volume():
    job = make_job({"storage": {"s3": {"region": "eu-west-1"}}})
    pod = pods(render_job(job))[0]
    assert not any("secret" in v for v in pod["spec"]["volumes"])
    env = env_of(pod)
    assert c.ENV_S3_CREDENTIALS_DIR not in env
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert "AWS_ENDPOINT_URL_S3" not in env


def test_no_inline_secret_anywhere_in_rendered_output():
    """Whatever the spec holds, the rendered text holds no value of the Secret (render never reads it)."""
    text = to_yaml(render_job(make_job(MULTI, uid=UID)))
    for needle in ("AKIA", "aws_secret_access_key", "secretKeyRef: {key: AWS_SECRET"):
        assert needle not in text
    # the spec itself refuses inline credentials, so they cannot reach the config map either
    with pytest.raises(Exception, match="inline credentials"):
        make_job({"storage": {"s3": {"secret_access_key": "AKIAXXXX"}}})


def test_pvc_uris_are_mounted_where_the_trainer_looks():
    job = make_job(
        {
            "model": {"uri": "pvc://models/qwen", "adapter_uri": "pvc://runs/sft/final/adapter"},
            "dataset": {"uri": "pvc://data/a.json", "mix": [{"uri": "pvc://mix-data/b.json", "ratio": 0.2}]},
            "checkpoint": {"uri": "pvc://scratch-ckpt/job"},
            "output": {"uri": "pvc://runs/dpo"},
        }
    )
    pod = pods(render_job(job))[0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounted = {}
    for m in container(pod)["volumeMounts"]:
        pvc = volumes[m["name"]].get("persistentVolumeClaim")
        if pvc:
            assert m["mountPath"] == pvc_mount_path(pvc["claimName"])
            assert pvc["readOnly"] == m["readOnly"]
            mounted[pvc["claimName"]] = not m["readOnly"]
    # inputs read-only; checkpoint and output claims writable (runs holds both an input and the output)
    assert mounted == {"models": False, "data": False, "mix-data": False, "scratch-ckpt": True, "runs": True}


def test_no_pvc_volumes_without_pvc_uris():
    pod = pods(render_job(make_job()))[0]
    assert not any("persistentVolumeClaim" in v for v in pod["spec"]["volumes"])


def test_kueue_queue_and_pod_group():
    job = make_job(
        {"parallel_config": {"nnodes": 4}},
        labels={
            "kueue.x-k8s.io/queue-name": "gpu-queue",
            "kueue.x-k8s.io/priority-class": "high",
            "team": "nlp",
        },
    )
    objs = render_job(job, attempt=2)
    for pod in pods(objs):
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert labels["kueue.x-k8s.io/priority-class"] == "high"
        assert labels["kueue.x-k8s.io/pod-group-name"] == naming.pod_group_name("demo")
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "4"
        assert "team" not in labels
    # the group is stable across attempts: replacement pods reuse the gang's admission
    again = pods(render_job(job, attempt=3))[0]["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"]
    assert again == naming.pod_group_name("demo")
    for obj in objs[:2]:
        assert not any(k.startswith("kueue.x-k8s.io/") for k in obj["metadata"]["labels"])


def test_no_kueue_marks_without_a_queue():
    pod = pods(render_job(make_job()))[0]
    assert not any(k.startswith("kueue") for k in pod["metadata"]["labels"])
    assert not any(k.startswith("kueue") for k in pod["metadata"].get("annotations", {}))


def test_config_map_holds_the_job_the_trainer_reads():
    job = make_job(MULTI, uid=UID)
    objs = render_job(job)
    cm = objs[1]
    text = cm["data"][c.CONFIG_FILE]
    assert text == trainer_config(job)
    (again,) = load_jobs_text(text)
    assert again.spec == job.spec
    assert again.metadata.name == "demo" and again.metadata.namespace == "team-a"
    # mounted so the file lands at CONFIG_PATH
    pod = pods(objs)[0]
    vol = next(v for v in pod["spec"]["volumes"] if v.get("configMap"))
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    (item,) = vol["configMap"]["items"]
    mount = next(m for m in container(pod)["volumeMounts"] if m["name"] == vol["name"])
    assert f"{mount['mountPath']}/{item['path']}" == c.CONFIG_PATH


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_config_round_trips_for_every_example(path):
    for job in load_jobs(path):
        (again,) = load_jobs_text(render_job(job)[1]["data"][c.CONFIG_FILE])
        assert again.spec == job.spec


def test_trainer_image_default_can_be_replaced_by_the_operator():
    def image(job: FineTuneJob, **kw: Any) -> str:
        return container(pods(render_job(job, **kw))[0])["image"]

    assert image(make_job()) == DEFAULT_TRAINER_IMAGE
    assert image(make_job(), trainer_image="registry.local/trainer:1") == "registry.local/trainer:1"
    custom = make_job({"image": "me/trainer:dev", "image_pull_policy": "Always"})
    assert image(custom, trainer_image="registry.local/trainer:1") == "me/trainer:dev"
    assert container(pods(render_job(custom))[0])["imagePullPolicy"] == "Always"


def test_render_is_pure():
    job = make_job(MULTI, uid=UID)
    before = job.model_dump()
    first = render_job(job, 2)
    snapshot = json.loads(json.dumps(first))
    first[2]["spec"]["tolerations"].append({"key": "x"})
    first[2]["spec"]["affinity"]["nodeAffinity"] = {}
    assert job.model_dump() == before
    assert render_job(job, 2) == snapshot
    with pytest.raises(ValueError):
        render_job(job, 0)


def test_cli_render_prints_the_same_objects(tmp_path):
    path = ROOT / "examples" / "multi-node.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "kubetune", "render", str(path), "--attempt", "2", "-n", "ml"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    docs = list(yaml.safe_load_all(out.stdout))
    (job,) = load_jobs(path)
    job.metadata.namespace = "ml"
    assert docs == render_job(job, attempt=2)
    assert "job.yaml: |" in out.stdout  # the config prints as a readable block
    # and the printed stream is what kubectl would get: every object passes strict validation
    target = tmp_path / "out.yaml"
    target.write_text(out.stdout)
    check = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSIONS[0], str(target)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr


BLOCK_TORCH = (
    "import sys\n"
    "for m in ('torch', 'transformers', 'peft', 'accelerate', 'datasets', 'bitsandbytes', 'trl'):\n"
    "    sys.modules[m] = None  # any import of these raises ImportError\n"
)


def test_operator_package_imports_without_torch():
    code = BLOCK_TORCH + (
        "import importlib, pkgutil, kubetune_operator\n"
        "mods = [m.name for m in pkgutil.iter_modules(kubetune_operator.__path__)]\n"
        "for m in mods:\n"
        "    importlib.import_module('kubetune_operator.' + m)\n"
        "assert 'render' in mods and 'naming' in mods, mods\n"
        "from kubetune.validate import load_jobs\n"
        "from kubetune_operator.render import render_job\n"
        f"render_job(load_jobs({str(ROOT / 'examples' / 'multi-node.yaml')!r})[0])\n"
        "print('ok', sorted(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    # the blocker works: importing torch that way fails
    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import torch"], capture_output=True, text=True)
    assert out.returncode != 0 and "import of torch halted" in out.stderr


def test_render_module_imports_neither_kopf_nor_kubernetes_client():
    code = (
        "import sys\n"
        "for m in ('kopf', 'kubernetes', 'torch'):\n"
        "    sys.modules[m] = None\n"
        "import kubetune_operator.render, kubetune_operator.naming, kubetune.cli\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_scratch_is_sized_for_the_scheduler_and_capped_on_the_node():
    """The model is downloaded to /tmp: the pod requests that much ephemeral storage (so it lands where it
    fits) and the emptyDir is capped at the same size (the kubelet evicts a pod that outgrows it)."""
    pod = pods(render_job(make_job({"resources": {"scratch_size": "300Gi"}})))[0]
    scratch = next(v for v in pod["spec"]["volumes"] if v["name"] == "scratch")
    assert scratch == {"name": "scratch", "emptyDir": {"sizeLimit": "300Gi"}}
    res = container(pod)["resources"]
    assert res["requests"]["ephemeral-storage"] == res["limits"]["ephemeral-storage"] == "300Gi"


def test_a_scratch_volume_is_a_generic_ephemeral_volume_off_the_nodes_disk():
    job = make_job({"resources": {"scratch_volume": {"size": "800Gi", "storage_class": "fast-nvme"}}})
    pod = pods(render_job(job))[0]
    scratch = next(v for v in pod["spec"]["volumes"] if v["name"] == "scratch")
    claim = scratch["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "800Gi"}},
                     "storageClassName": "fast-nvme"}  # fmt: skip
    assert "ephemeral-storage" not in container(pod)["resources"]["requests"]  # not on the node's disk


def test_the_trainers_termination_message_path_is_the_containers():
    c = container(pods(render_job(make_job()))[0])
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["terminationMessagePath"] == env["KUBETUNE_TERMINATION_MESSAGE_PATH"] == "/dev/termination-log"
