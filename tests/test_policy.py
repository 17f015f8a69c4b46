"""The admission policy (kubetune.policy): generated from LIMIT_RULES, and its CEL refuses what
`kubetune validate` and the operator refuse, with the same message. What it cannot see is stated here."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kubetune.policy import build_policy, render_policy_yaml
from kubetune.profile_spec import FineTuneProfile
from kubetune.profiles import resolve, select_profile
from kubetune.spec import FineTuneJobSpec
from tests import crd_admission, policy_admission
from tests.fixtures_profiles import JOB, OVER, PROFILE

ROOT = Path(__file__).resolve().parents[1]
POLICY = build_policy()
CATALOG = {"model": {"name": "qwen2.5-7b-instruct"}}


def _profile(name: str = "team-a", default: bool = False, **limits: Any) -> dict[str, Any]:
    doc = copy.deepcopy(PROFILE)
    doc["metadata"] = {"name": name, "resourceVersion": "7"}
    if default:
        doc["metadata"]["annotations"] = {"kubetune.io/default-profile": "true"}
    if limits:
        doc["spec"]["limits"] = limits
    return doc


def _stored(**fields: Any) -> dict[str, Any]:
    """The job as the API server hands it to admission: defaulted and valid for the CRD."""
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "j", "namespace": "team-a"}, "spec": {**copy.deepcopy(JOB), **fields}}  # fmt: skip
    stored, problems = crd_admission.admit(doc)
    assert problems == []
    return stored


def _python(job: dict[str, Any], profiles: list[dict[str, Any]]) -> list[str]:
    spec = FineTuneJobSpec.model_validate(job["spec"])
    chosen, problem = select_profile(spec.profile, [FineTuneProfile.model_validate(p) for p in profiles])
    if problem:
        return [f"spec.profile: {problem}"]
    return [f"{f}: {m}" for f, m in resolve(spec, chosen).violations]


def both(fields: dict[str, Any], profiles: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(what the policy denies with, what kubetune validate and the operator say) for one new job."""
    job = _stored(**fields)
    return policy_admission.denials(POLICY, job, profiles), _python(job, profiles)


def test_the_chart_template_is_what_kubetune_policy_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "kubetune", "policy", "--helm"], capture_output=True, text=True, check=True
    ).stdout
    template = ROOT / "helm" / "kubetune" / "templates" / "profile-policy.yaml"
    assert template.read_text() == printed == render_policy_yaml(helm=True), (
        "run: kubetune policy --helm > helm/kubetune/templates/profile-policy.yaml"
    )


@pytest.mark.parametrize("limit", sorted(OVER))
def test_every_limit_is_refused_at_admission_with_the_message_validate_gives(limit: str) -> None:
    value, fields, field, message = OVER[limit]
    cel, python = both({"profile": "team-a", **fields}, [_profile(**{limit: value})])
    assert cel == python == [f"{field}: {message}"]


# (what, job fields, limits, the one message or None)
CASES = [
    ("a job within every limit is admitted", {"resources": {"service_account_name": "trainer"}},
     {"max_gpus_per_node": 8, "max_nodes": 4, "max_total_gpus": 32, "max_active_deadline_seconds": 3600,
      "allowed_image_prefixes": ["registry.example/kubetune/"], "allowed_methods": ["sft"],
      "allowed_pet_types": ["lora"], "allowed_service_accounts": ["trainer"],
      "allowed_priority_classes": ["team-a"]}, None),
    ("the catalog model's gpus are the effective ones", CATALOG, {"max_gpus_per_node": 1},
     "spec.resources.gpus: 2 GPUs per node exceeds max_gpus_per_node 1 of profile team-a"),
    ("the job's gpus win over the catalog's", {**CATALOG, "resources": {"gpus": 4}}, {"max_gpus_per_node": 3},
     "spec.resources.gpus: 4 GPUs per node exceeds max_gpus_per_node 3 of profile team-a"),
    ("the job's gpus win over the defaults", {"resources": {"gpus": 2}}, {"max_gpus_per_node": 4}, None),
    ("a job value equal to the built-in default counts as unset",
     {"image": "ghcr.io/kubetune/trainer:0.1.0"}, {"allowed_image_prefixes": ["registry.example/"]}, None),
    ("the job's own image is checked", {"image": "docker.io/me/trainer:1"},
     {"allowed_image_prefixes": ["registry.example/", "ghcr.io/kubetune/"]},
     "spec.image: docker.io/me/trainer:1 is not allowed by profile team-a "
     "(allowed_image_prefixes: registry.example/, ghcr.io/kubetune/)"),
    ("the job's deadline wins over the default", {"active_deadline_seconds": 900},
     {"max_active_deadline_seconds": 1800}, None),
    ("a service account in the job is checked", {"resources": {"service_account_name": "root"}},
     {"allowed_service_accounts": ["trainer"]},
     "spec.resources.service_account_name: root is not allowed by profile team-a (allowed_service_accounts: trainer)"),
    ("gang size times gpus", {"parallel_config": {"nnodes": 2}, "resources": {"gpus": 4}},
     {"max_total_gpus": 8, "max_nodes": 2}, None),
]  # fmt: skip


@pytest.mark.parametrize("what,fields,limits,message", CASES, ids=[c[0] for c in CASES])
def test_admission_computes_the_effective_spec_like_the_merge_rules(
    what: str, fields: dict[str, Any], limits: dict[str, Any], message: str | None
) -> None:
    cel, python = both({"profile": "team-a", **fields}, [_profile(**limits)])
    assert cel == python == ([message] if message else [])


def test_several_broken_limits_are_all_named_in_order() -> None:
    limits = {"max_gpus_per_node": 4, "allowed_methods": ["pretrain"], "allowed_priority_classes": ["x"]}
    cel, python = both({"profile": "team-a"}, [_profile(**limits)])
    assert cel == python and len(cel) == 3  # the API server's response names the first


def test_only_the_jobs_profile_limits_it() -> None:
    strict, loose = _profile("team-a", max_nodes=1), _profile("team-b")
    over = {"parallel_config": {"nnodes": 2}}
    assert both({"profile": "team-b", **over}, [strict, loose]) == ([], [])
    message = "spec.parallel_config.nnodes: 2 nodes exceeds max_nodes 1 of profile team-a"
    assert both({"profile": "team-a", **over}, [strict, loose]) == ([message], [message])
    # naming none: the default profile's limits apply, a profile not marked default's do not
    assert both(over, [strict, loose]) == ([], [])
    default = _profile("team-a", default=True, max_nodes=1)
    assert both(over, [default, loose]) == ([message], [message])


def test_no_profile_at_all_admits() -> None:
    assert both({"parallel_config": {"nnodes": 8}}, []) == ([], [])


def test_an_update_is_checked_only_when_it_changes_a_limited_field() -> None:
    """kopf's finalizers and Kueue's suspend pass after a profile was tightened; the job keeps its snapshot."""
    old = _stored(profile="team-a", resources={"gpus": 8})
    tightened = [_profile(max_gpus_per_node=4)]
    same = copy.deepcopy(old)
    same["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    assert policy_admission.denials(POLICY, same, tightened, old) == []
    suspended = _stored(profile="team-a", resources={"gpus": 8}, suspend=True)
    assert policy_admission.denials(POLICY, suspended, tightened, old) == []
    more = _stored(profile="team-a", resources={"gpus": 16})
    assert policy_admission.denials(POLICY, more, tightened, old) == [
        "spec.resources.gpus: 16 GPUs per node exceeds max_gpus_per_node 4 of profile team-a"
    ]


def test_the_platform_example_is_admitted_and_a_bigger_gang_refused() -> None:
    import yaml

    platform = ROOT / "examples" / "platform"
    profile = yaml.safe_load((platform / "profile.yaml").read_text())
    job = yaml.safe_load((platform / "job.yaml").read_text())
    stored, _ = crd_admission.admit(job)
    assert policy_admission.denials(POLICY, stored, [profile]) == []
    job["spec"]["parallel_config"] = {"nnodes": 5}
    stored, _ = crd_admission.admit(job)
    assert policy_admission.denials(POLICY, stored, [profile]) == [
        "spec.parallel_config.nnodes: 5 nodes exceeds max_nodes 4 of profile h100-team-a"
    ]


# ---------------------------------------------------------------- what the policy cannot see
# Each evaluation sees one profile and the job, not the other profiles nor the merged spec's schema:
# these the operator refuses (Failed, ProfileViolation); the policy admits them or says less.


def test_gap_a_profile_that_does_not_exist_is_refused_by_the_operator_only() -> None:
    cel, python = both({"profile": "nope"}, [_profile(max_nodes=1)])
    assert cel == [] and python == ["spec.profile: FineTuneProfile nope does not exist"]


def test_gap_two_default_profiles_are_refused_by_the_operator_only() -> None:
    cel, python = both({}, [_profile("a", default=True), _profile("b", default=True)])
    assert cel == []
    assert python == [
        "spec.profile: several FineTuneProfiles are marked default (a, b); name one in spec.profile"
    ]


def test_gap_an_unknown_catalog_model_is_refused_without_the_known_names() -> None:
    """The policy cannot list the catalog in a fixed order (CEL maps have none); the rest is the same."""
    cel, python = both({"profile": "team-a", "model": {"name": "llama"}}, [_profile()])
    assert cel == ["spec.model.name: llama is not in the models of profile team-a"]
    assert python == [cel[0] + " (known: qwen2.5-7b-instruct)"]


def test_gap_a_catalog_model_without_any_profile_is_refused_by_the_operator_only() -> None:
    cel, python = both(CATALOG, [_profile()])  # team-a is not marked default
    assert cel == [] and python[0].startswith("spec.model.name: qwen2.5-7b-instruct needs a profile")


def test_gap_an_effective_spec_the_schema_refuses_is_refused_by_the_operator_only() -> None:
    bad = _profile()
    bad["spec"]["defaults"]["pet_config"] = {"pet_type": "qlora"}  # without a quantization block
    bad["spec"]["pod"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    assert both({"profile": "team-a"}, [bad])[0] == []
    cel, python = both({"profile": "team-a", "pod": {"volumes": [{"name": "data", "emptyDir": {}}]}},
                       [_profile() | {"spec": {**_profile()["spec"], "pod": bad["spec"]["pod"]}}])  # fmt: skip
    assert cel == [] and python == ["spec.pod.volumes: name data appears twice (the profile's and the job's)"]
