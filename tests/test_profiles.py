"""FineTuneProfile: its CRD, the merge rules (a table), the catalog, and every limit, named by profile."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.crd import render_crd_yaml
from kubetune.profile_spec import FineTuneProfile
from kubetune.profiles import LIMIT_RULES, resolve, select_profile
from kubetune.spec import FineTuneJobSpec
from tests.fixtures_profiles import JOB, OVER, PROFILE

ROOT = Path(__file__).resolve().parents[1]


def profile(**limits: Any) -> FineTuneProfile:
    doc = copy.deepcopy(PROFILE)
    if limits:
        doc["spec"]["limits"] = limits
    return FineTuneProfile.model_validate(doc)


def job(**fields: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({**copy.deepcopy(JOB), **fields})


# ---------------------------------------------------------------- the CRD


def test_profile_crd_file_is_what_kubetune_crd_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "kubetune", "crd", "--kind", "FineTuneProfile"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert printed == render_crd_yaml("FineTuneProfile")
    assert (ROOT / "crds" / "finetuneprofile.yaml").read_text() == printed, (
        "run: kubetune crd --kind FineTuneProfile > crds/finetuneprofile.yaml"
    )
    crd = yaml.safe_load(printed)
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["group"] == "kubetune.io" and crd["spec"]["names"]["kind"] == "FineTuneProfile"


def test_profile_crd_passes_the_kubernetes_schema() -> None:
    run = subprocess.run(
        ["kubernetes-validate", "--strict", "-k", "1.33.0", str(ROOT / "crds" / "finetuneprofile.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_profile_defaults_are_typed_like_the_job_spec() -> None:
    doc = copy.deepcopy(PROFILE)
    doc["spec"]["defaults"]["resources"]["gpus"] = -1
    with pytest.raises(ValueError, match=r"defaults\.resources\.gpus"):
        FineTuneProfile.model_validate(doc)
    doc = copy.deepcopy(PROFILE)
    doc["spec"]["defaults"]["profile"] = "other"  # a profile cannot choose a profile
    with pytest.raises(ValueError, match=r"defaults\.profile"):
        FineTuneProfile.model_validate(doc)


# ---------------------------------------------------------------- merge rules (a table)

# (what, job fields, effective spec -> the value, expected)
MERGES = [
    ("a default fills a field the job leaves at its built-in default",
     {}, lambda s: s.image, "registry.example/kubetune/trainer:0.2.0"),
    ("the job's own value wins", {"image": "registry.example/kubetune/mine:1"},
     lambda s: s.image, "registry.example/kubetune/mine:1"),
    ("defaults reach nested blocks", {}, lambda s: s.checkpoint.every_steps, 200),
    ("a nested job value wins over the nested default", {"checkpoint": {"every_steps": 50}},
     lambda s: s.checkpoint.every_steps, 50),
    ("an optional block absent from the job comes from the profile", {},
     lambda s: (s.storage.s3.endpoint, s.storage.s3.credentials_secret), ("https://s3.internal", "team-a-s3")),
    ("maps merge by key, the job's value winning", {"resources": {"node_selector": {"pool": "a100", "zone": "b"}}},
     lambda s: s.resources.node_selector, {"pool": "a100", "zone": "b"}),
    ("maps merge by key, the profile's other keys kept", {"resources": {"node_selector": {"zone": "b"}}},
     lambda s: s.resources.node_selector, {"pool": "h100", "zone": "b"}),
    ("a list outside pod is a value: the job's replaces the default",
     {"resources": {"tolerations": [{"key": "spot", "operator": "Exists"}]}},
     lambda s: s.resources.tolerations, [{"key": "spot", "operator": "Exists"}]),
    ("pod lists are appended, the job's after the profile's", {"pod": {"image_pull_secrets": ["mine"]}},
     lambda s: s.pod.image_pull_secrets, ["regcred", "mine"]),
    ("pod env is appended, the job's after the profile's", {"pod": {"env": [{"name": "A", "value": "1"}]}},
     lambda s: [e["name"] for e in s.pod.env], ["HF_TOKEN", "A"]),
    ("pod maps merge by key", {"pod": {"labels": {"team": "b", "x": "y"}}},
     lambda s: s.pod.labels, {"kueue.x-k8s.io/queue-name": "team-a", "team": "b", "x": "y"}),
    ("a pod scalar of the job wins", {"pod": {"runtime_class_name": "gvisor"}},
     lambda s: s.pod.runtime_class_name, "gvisor"),
    ("the effective spec names its profile", {}, lambda s: s.profile, "team-a"),
    ("a catalog model gives the uri", {"model": {"name": "qwen2.5-7b-instruct"}},
     lambda s: s.model.uri, "s3://models/Qwen2.5-7B-Instruct"),
    ("a catalog model's settings win over the profile's defaults", {"model": {"name": "qwen2.5-7b-instruct"}},
     lambda s: (s.resources.gpus, s.resources.memory, s.pet_config.target_modules),
     (2, "128Gi", ".*q_proj|.*v_proj")),
    ("the job's own values win over the catalog model's", {"model": {"name": "qwen2.5-7b-instruct"},
                                                           "resources": {"gpus": 4}},
     lambda s: s.resources.gpus, 4),
]  # fmt: skip


@pytest.mark.parametrize("what,fields,pick,expected", MERGES, ids=[m[0] for m in MERGES])
def test_merge_rules(what: str, fields: dict[str, Any], pick: Any, expected: Any) -> None:
    resolved = resolve(job(**fields), profile())
    assert resolved.violations == []
    assert pick(resolved.spec) == expected


def test_without_a_profile_the_job_is_its_own_effective_spec() -> None:
    spec = job()
    assert resolve(spec, None).spec is spec


def test_a_catalog_name_without_a_profile_is_one_line() -> None:
    resolved = resolve(job(model={"name": "qwen2.5-7b-instruct"}), None)
    assert resolved.spec is None
    assert resolved.violations == [
        ("spec.model.name", "qwen2.5-7b-instruct needs a profile with a model catalog (spec.profile, or a "
                            "default profile); none applies")
    ]  # fmt: skip


def test_an_unknown_catalog_name_lists_the_known_ones() -> None:
    resolved = resolve(job(model={"name": "llama"}), profile())
    assert resolved.violations == [
        ("spec.model.name", "llama is not in the models of profile team-a (known: qwen2.5-7b-instruct)")
    ]


def test_a_bad_default_is_reported_naming_the_profile() -> None:
    doc = copy.deepcopy(PROFILE)
    doc["spec"]["defaults"]["pet_config"] = {"pet_type": "qlora"}  # qlora needs a quantization block
    resolved = resolve(job(), FineTuneProfile.model_validate(doc))
    assert resolved.spec is None
    assert resolved.violations == [
        ("spec.pet_config.quantization",
         "pet_type qlora needs a quantization block (bits: 4 or 8) (with profile team-a applied)")
    ]  # fmt: skip


def test_a_volume_name_in_both_the_profile_and_the_job_is_refused() -> None:
    doc = copy.deepcopy(PROFILE)
    doc["spec"]["pod"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    resolved = resolve(
        job(pod={"volumes": [{"name": "data", "emptyDir": {}}]}), FineTuneProfile.model_validate(doc)
    )
    assert resolved.violations == [
        ("spec.pod.volumes", "name data appears twice (the profile's and the job's)")
    ]


@pytest.mark.parametrize(
    "pod,words",
    [
        ({"env": [{"name": "KUBETUNE_ATTEMPT", "value": "9"}]}, "KUBETUNE_ATTEMPT is set by kubetune itself"),
        ({"volumes": [{"name": "scratch", "emptyDir": {}}]}, "volume name scratch is kubetune's own"),
        ({"volume_mounts": [{"name": "x", "mountPath": "/tmp/x"}]}, "mountPath /tmp/x is kubetune's own"),
        ({"labels": {"kubetune.io/job": "other"}}, "kubetune.io/job is set by kubetune itself"),
        ({"env": [{"value": "1"}]}, "every variable needs a name"),
    ],
)
def test_a_pod_block_cannot_take_kubetunes_own_names(pod: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        job(pod=pod)


# ---------------------------------------------------------------- limits


def test_every_limit_has_a_case() -> None:
    assert sorted(OVER) == sorted(r.limit for r in LIMIT_RULES)


@pytest.mark.parametrize("limit", sorted(OVER))
def test_a_job_over_a_limit_is_refused_naming_the_field_and_the_profile(limit: str) -> None:
    value, fields, field, message = OVER[limit]
    resolved = resolve(job(**fields), profile(**{limit: value}))
    assert resolved.spec is None
    assert resolved.violations == [(field, message)]


def test_limits_apply_to_what_the_profile_itself_defaults() -> None:
    """Limits are never overridden: a default over a limit is refused like the job's own value."""
    resolved = resolve(job(), profile(max_gpus_per_node=4))
    assert resolved.violations == [
        ("spec.resources.gpus", "8 GPUs per node exceeds max_gpus_per_node 4 of profile team-a")
    ]


def test_a_deadline_limit_needs_a_deadline() -> None:
    doc = copy.deepcopy(PROFILE)
    del doc["spec"]["defaults"]["active_deadline_seconds"]
    doc["spec"]["limits"] = {"max_active_deadline_seconds": 7200}
    resolved = resolve(job(), FineTuneProfile.model_validate(doc))
    assert resolved.violations == [
        (
            "spec.active_deadline_seconds",
            "no deadline exceeds max_active_deadline_seconds 7200 of profile team-a",
        )
    ]


def test_a_job_within_every_limit_passes() -> None:
    limits = {"max_gpus_per_node": 8, "max_nodes": 4, "max_total_gpus": 32, "max_active_deadline_seconds": 3600,
              "allowed_image_prefixes": ["registry.example/kubetune/"], "allowed_methods": ["sft"],
              "allowed_pet_types": ["lora"], "allowed_service_accounts": ["trainer"],
              "allowed_priority_classes": ["team-a"]}  # fmt: skip
    resolved = resolve(job(resources={"service_account_name": "trainer"}), profile(**limits))
    assert resolved.violations == []
    assert resolved.spec is not None


# ---------------------------------------------------------------- which profile


def _named(name: str, default: bool = False) -> FineTuneProfile:
    doc = copy.deepcopy(PROFILE)
    doc["metadata"] = {
        "name": name,
        "annotations": {"kubetune.io/default-profile": "true"} if default else {},
    }
    return FineTuneProfile.model_validate(doc)


def test_a_job_gets_the_profile_it_names_else_the_default_one() -> None:
    profiles = [_named("a"), _named("b", default=True)]
    assert select_profile("a", profiles)[0].name == "a"
    assert select_profile(None, profiles)[0].name == "b"
    assert select_profile(None, [_named("a")]) == (None, None)
    assert select_profile("c", profiles) == (None, "FineTuneProfile c does not exist")
    two = [_named("a", default=True), _named("b", default=True)]
    assert select_profile(None, two) == (
        None, "several FineTuneProfiles are marked default (a, b); name one in spec.profile"
    )  # fmt: skip


# ---------------------------------------------------------------- the pods of a profiled job


def _profiled_job(**fields: Any) -> Any:
    from kubetune.spec import FineTuneJob
    from kubetune.validate import apply_profile

    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j", "namespace": "team-a"},
           "spec": {**copy.deepcopy(JOB), "model": {"name": "qwen2.5-7b-instruct"}, **fields}}  # fmt: skip
    prof = copy.deepcopy(PROFILE)
    prof["spec"]["pod"].update(
        env_from=[{"configMapRef": {"name": "team-a-env"}}],
        volumes=[{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
        volume_mounts=[{"name": "datasets", "mountPath": "/datasets", "readOnly": True}],
        scheduler_name="gang-scheduler",
        annotations={"example.com/cost-center": "42"},
    )
    return apply_profile(FineTuneJob.model_validate(doc), FineTuneProfile.model_validate(prof), "j.yaml")


def test_the_pod_block_reaches_every_pod_and_passes_strict_validation() -> None:
    from kubetune_operator.render import render_job
    from tests.kube_checks import K8S_VERSIONS, name_problems, restricted_problems, validate_strict

    objs = render_job(_profiled_job(pod={"env": [{"name": "MY_FLAG", "value": "1"}]},
                                    parallel_config={"nnodes": 2}))  # fmt: skip
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        spec, (ctr,) = pod["spec"], pod["spec"]["containers"]
        assert ctr["image"] == "registry.example/kubetune/trainer:0.2.0"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert [e["name"] for e in ctr["env"]][-2:] == ["HF_TOKEN", "MY_FLAG"]  # after kubetune's, job last
        assert ctr["envFrom"] == [{"configMapRef": {"name": "team-a-env"}}]
        assert {"name": "datasets", "mountPath": "/datasets", "readOnly": True} in ctr["volumeMounts"]
        assert spec["volumes"][-1]["name"] == "datasets"
        assert (spec["runtimeClassName"], spec["schedulerName"]) == ("nvidia", "gang-scheduler")
        assert spec["nodeSelector"] == {"pool": "h100"}
        assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2"  # the catalog model's
        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["team"] == "a" and labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert labels["kueue.x-k8s.io/pod-group-name"]  # the profile's queue makes the gang one pod group
        assert annotations["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert annotations["example.com/cost-center"] == "42"
        for version in K8S_VERSIONS:
            validate_strict(pod, version)
        assert name_problems(pod) == [] and restricted_problems(spec) == []
    config = yaml.safe_load(objs[1]["data"]["job.yaml"])  # the trainer reads the effective spec
    assert config["spec"]["model"]["uri"] == "s3://models/Qwen2.5-7B-Instruct"


# ---------------------------------------------------------------- the CLI


def _files(tmp_path: Path, limits: dict[str, Any], **spec: Any) -> tuple[Path, Path]:
    prof = copy.deepcopy(PROFILE)
    prof["spec"]["limits"] = limits
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(prof))
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "j"},
           "spec": {**copy.deepcopy(JOB), "model": {"name": "qwen2.5-7b-instruct"}, **spec}}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "job.yaml", tmp_path / "profile.yaml"


def _kubetune(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kubetune", *map(str, args)], capture_output=True, text=True)


def test_validate_with_a_profile_names_the_field_and_the_profile(tmp_path: Path) -> None:
    job_file, profile_file = _files(tmp_path, {"max_nodes": 2}, parallel_config={"nnodes": 4})
    run = _kubetune("validate", job_file, "--profile", profile_file)
    assert run.returncode == 1
    assert (
        run.stderr
        == f"{job_file} (j): spec.parallel_config.nnodes: 4 nodes exceeds max_nodes 2 of profile team-a\n"
    )
    run = _kubetune("validate", job_file)  # without the profile: valid, with a warning
    assert run.returncode == 0 and "pass --profile FILE to resolve it here" in run.stderr


def test_render_with_a_profile_prints_the_effective_pods(tmp_path: Path) -> None:
    job_file, profile_file = _files(tmp_path, {"max_nodes": 2})
    run = _kubetune("render", job_file, "--profile", profile_file)
    assert run.returncode == 0, run.stderr
    pod = [d for d in yaml.safe_load_all(run.stdout) if d["kind"] == "Pod"][0]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    run = _kubetune("render", job_file)  # a catalog model cannot be rendered without its profile
    assert run.returncode == 1
    assert run.stderr.strip().endswith("none applies; pass --profile FILE")


def test_a_profile_file_with_a_mistake_is_one_line(tmp_path: Path) -> None:
    job_file, profile_file = _files(tmp_path, {"max_nodes": 0})
    run = _kubetune("validate", job_file, "--profile", profile_file)
    assert run.returncode == 1
    assert run.stderr == f"{profile_file} (team-a): spec.limits.max_nodes: must be >= 1, got 0\n"


def test_run_applies_the_profile_before_anything_starts(tmp_path: Path) -> None:
    job_file, profile_file = _files(
        tmp_path, {"allowed_pet_types": ["lora"]}, pet_config={"pet_type": "full"}
    )
    run = _kubetune("run", job_file, "--profile", profile_file)
    assert run.returncode == 1
    assert run.stderr == (
        f"{job_file} (j): spec.pet_config.pet_type: full is not allowed by profile team-a (allowed_pet_types: lora)\n"
    )


# ---------------------------------------------------------------- examples/platform

PLATFORM = ROOT / "examples" / "platform"


def test_the_platform_example_job_is_short_and_valid_with_its_profile() -> None:
    job_file, profile_file = PLATFORM / "job.yaml", PLATFORM / "profile.yaml"
    lines = job_file.read_text().split("\nspec:\n", 1)[1].splitlines()
    assert 0 < len(lines) <= 8
    run = _kubetune("validate", job_file, "--profile", profile_file)
    assert (run.returncode, run.stderr) == (0, ""), run.stderr
    assert run.stdout == f"{job_file}: support-bot-lora: valid (sft, lora)\n"
    from tests import crd_admission

    _, problems = crd_admission.admit(yaml.safe_load(job_file.read_text()))  # the API server takes it
    assert problems == []


def test_the_platform_example_profile_brings_the_gpu_pool_to_the_pods() -> None:
    from kubetune.validate import apply_profile, load_job, load_profile
    from kubetune_operator.render import render_job
    from tests.kube_checks import K8S_VERSIONS, validate_strict

    prof = load_profile(PLATFORM / "profile.yaml")
    job = apply_profile(load_job(PLATFORM / "job.yaml"), prof, "job.yaml")
    (pod,) = [o for o in render_job(job) if o["kind"] == "Pod"]
    spec, (ctr,) = pod["spec"], pod["spec"]["containers"]
    assert ctr["image"] == "registry.example.com/kubetune/trainer:0.1.0"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}} in ctr[
        "env"
    ]
    assert ctr["resources"]["limits"]["nvidia.com/gpu"] == "2"  # the catalog model's, under the pool's 8
    assert ctr["resources"]["limits"]["ephemeral-storage"] == "800Gi"
    assert (spec["serviceAccountName"], spec["priorityClassName"]) == ("trainer", "team-a")
    assert {"name": "AWS_ENDPOINT_URL_S3", "value": "https://s3.internal.example.com"} in ctr["env"]
    assert {"name": "s3-credentials", "secret": {"secretName": "team-a-s3", "defaultMode": 0o440}} in spec[
        "volumes"
    ]
    for version in K8S_VERSIONS:
        validate_strict(pod, version)
