"""The operator with FineTuneProfiles, end to end on the API emulator and the kubelet stand-in: the
profile's image, pull secrets, env and node selector reach the pods, a job over a limit is Failed
(ProfileViolation), and a profile edited while a job runs does not change that job."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures_kube import ROOT, Cluster, job_doc
from tests.kubelet import Kubelet, wait_for

pytestmark = pytest.mark.slow

PROFILE = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneProfile",
    "metadata": {"name": "pool-a"},
    "spec": {
        "defaults": {
            "image": "registry.example/kubetune/trainer:0.2.0",
            "resources": {"node_selector": {"pool": "a"}, "cpu": "1", "memory": "1Gi"},
        },
        "pod": {
            "image_pull_secrets": ["regcred"],
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        },
        "limits": {"max_nodes": 2},
        "models": {"tiny": {"uri": "s3://models/tiny"}},
    },
}


def install(cluster: Cluster, profile: dict[str, Any]) -> dict:
    cluster.api.api.install_crd(ROOT / "crds" / "finetuneprofile.yaml")
    cluster.core.create_namespaced_secret(
        "default", {"metadata": {"name": "hf"}, "stringData": {"token": "hf_x"}, "type": "Opaque"}
    )
    return cluster.custom.create_cluster_custom_object("kubetune.io", "v1alpha1", "finetuneprofiles", profile)


def profiled_job(name: str, out: Path, **spec: Any) -> dict:
    doc = job_doc(name, out, **spec)
    doc["spec"]["profile"] = "pool-a"
    doc["spec"]["model"] = {"name": "tiny"}
    return doc


def test_a_profiled_job_runs_to_succeeded_with_the_profiles_pod_settings(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    profile = install(cluster, PROFILE)
    cluster.create_job(profiled_job("short", tmp_path / "out", steps=10))
    status = cluster.wait_phase("short", "Succeeded", timeout=60)
    record = status["profile"]
    assert (record["name"], record["resourceVersion"]) == ("pool-a", profile["metadata"]["resourceVersion"])
    assert len(record["hash"]) == 16
    pods = cluster.pods("short")
    assert len(pods) == 2
    for pod in pods:
        spec, (ctr,) = pod["spec"], pod["spec"]["containers"]
        assert ctr["image"] == "registry.example/kubetune/trainer:0.2.0"
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["nodeSelector"] == {"pool": "a"}
        assert ctr["env"][-1] == PROFILE["spec"]["pod"]["env"][0]


def test_a_job_over_a_limit_fails_with_profile_violation(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    install(cluster, PROFILE)
    cluster.create_job(profiled_job("wide", tmp_path / "out", nnodes=3))
    status = cluster.wait_phase("wide", "Failed", timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "ProfileViolation"
    assert status["message"] == "spec.parallel_config.nnodes: 3 nodes exceeds max_nodes 2 of profile pool-a"
    assert cluster.pods("wide") == []
    assert ("Warning", "ProfileViolation") in cluster.events("wide")


def test_with_the_admission_policy_a_job_over_a_limit_is_refused_at_apply(
    cluster: Cluster, tmp_path: Path
) -> None:
    from kubetune.policy import build_policy

    install(cluster, PROFILE)
    cluster.api.api.admission_policies.append(build_policy())  # as the chart installs it
    job = tmp_path / "wide.yaml"
    job.write_text(yaml.safe_dump(profiled_job("wide", tmp_path / "out", nnodes=3)))
    run = cluster.kubectl("apply", "-f", str(job))
    assert run.returncode == 1
    assert run.stderr.strip().endswith(
        "ValidatingAdmissionPolicy 'kubetune-profile-limits' with binding 'kubetune-profile-limits' denied "
        "request: spec.parallel_config.nnodes: 3 nodes exceeds max_nodes 2 of profile pool-a"
    )
    assert cluster.kubectl("get", "finetunejobs").stdout.strip() in (
        "",
        "No resources found in default namespace.",
    )
    job.write_text(yaml.safe_dump(profiled_job("narrow", tmp_path / "out", nnodes=2)))
    assert cluster.kubectl("apply", "-f", str(job)).returncode == 0


def test_a_profile_edit_does_not_change_a_running_job(
    cluster: Cluster, kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    install(cluster, PROFILE)
    out = tmp_path / "out"
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(profiled_job("steady", out, steps=60, every=5))
    cluster.wait_phase("steady", "Running", timeout=30)
    edited = copy.deepcopy(PROFILE)
    edited["spec"]["defaults"]["image"] = "registry.example/kubetune/trainer:9.9.9"
    edited["spec"]["limits"]["max_nodes"] = 1  # the running job is over it now: it must not matter
    cluster.custom.patch_cluster_custom_object(
        "kubetune.io", "v1alpha1", "finetuneprofiles", "pool-a", {"spec": edited["spec"]}
    )
    cluster.core.delete_namespaced_pod("steady-a1-r1", "default")  # a new attempt is built from the snapshot
    wait_for(lambda: any(p["metadata"]["name"].startswith("steady-a2") for p in cluster.pods("steady")), 30,
             what="attempt 2")  # fmt: skip
    status = cluster.wait_phase("steady", "Succeeded", timeout=90)
    assert status["attempt"] == 2
    images = {p["spec"]["containers"][0]["image"] for p in cluster.pods("steady")}
    assert images == {"registry.example/kubetune/trainer:0.2.0"}
