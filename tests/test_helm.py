"""The Helm chart, linted and rendered by the real Helm (v4 SDK in-process, helm-python-sdk)."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.fixtures_helm import CHART, NAMESPACE, RELEASE, render
from tests.fixtures_kube import kopf_parses
from tests.kube_checks import K8S_VERSIONS, name_problems, restricted_problems, validate_strict

ROOT = Path(__file__).resolve().parents[1]

# Value sets every check runs on: defaults, a namespaced install with everything switched on.
NAMESPACED = {
    "watchNamespaces": ["team-a", "team-b"],
    "logLevel": "debug",
    "trainer": {"defaultImage": "registry.local/kubetune/trainer:0.1.0"},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
    "podAnnotations": {"example.com/team": "ml"},
    "priorityClassName": "system-cluster-critical",
    "env": [{"name": "EXTRA", "value": "1"}],
    "s3": {"credentialsSecret": "operator-s3-read"},
    "profiles": {
        "h100-team-a": yaml.safe_load((ROOT / "examples/platform/profile.yaml").read_text())["spec"]
    },
    "defaultProfile": "h100-team-a",
}
VALUE_SETS = {"defaults": {}, "namespaced": NAMESPACED}
# Kinds kubernetes-validate has no schema for (they are not built in): checked by hand below.
NOT_BUILT_IN = {"ServiceMonitor", "FineTuneProfile"}


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as ch:
        yield ch


def notes(chart: helm.Chart, values: dict | None = None) -> str:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)["kubetune/templates/NOTES.txt"]


def one(objs: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    found = [
        o
        for o in objs
        if o["kind"] == kind
        and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_clean(values):
    report = helm.lint(CHART, values, strict=True, kube_version="v1.33.0", namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_and_render_reject_bad_values(chart):
    report = helm.lint(CHART, {"logLevel": "loud"})
    assert any("logLevel" in e for e in report["errors"])
    with pytest.raises(helm.HelmError, match="watchNamespaces"):
        chart.render({"watchNamespaces": ["Not_A_Namespace"]}, name=RELEASE)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_every_rendered_object_passes_strict_validation(chart, values, version):
    objs = render(chart, values)
    unchecked = set()
    for obj in objs:
        try:
            validate_strict(obj, version)
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.add(obj["kind"])
        assert name_problems(obj) == [], obj["metadata"]["name"]
    assert unchecked <= NOT_BUILT_IN
    # the chart's CRD is installed too (from crds/), and is valid the same way
    for crd in chart.crds:
        validate_strict(yaml.safe_load(crd["data"]), version)


def test_service_monitor_shape(chart):
    objs = render(chart, NAMESPACED)
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [svc["spec"]["ports"][0]["name"]]
    assert "ServiceMonitor" not in {o["kind"] for o in render(chart)}  # off by default


@pytest.mark.parametrize("file", ["finetunejob.yaml", "finetuneprofile.yaml"])
def test_chart_crds_are_the_generated_crds(chart, file):
    """helm/kubetune/crds/ holds copies of crds/*.yaml; they must not drift."""
    copy = CHART / "crds" / file
    assert copy.read_bytes() == (ROOT / "crds" / file).read_bytes(), (
        f"helm/kubetune/crds/{file} differs from crds/{file}: cp crds/{file} helm/kubetune/crds/"
    )
    names = {c["name"]: yaml.safe_load(c["data"])["metadata"]["name"] for c in chart.crds}
    assert names == {
        "crds/finetunejob.yaml": "finetunejobs.kubetune.io",
        "crds/finetuneprofile.yaml": "finetuneprofiles.kubetune.io",
    }


def _container(objs: list[dict]) -> dict:
    (ctr,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return ctr


def test_deployment_runs_kopf_on_the_operator_module(chart):
    objs = render(chart)
    dep = one(objs, "Deployment")
    ctr = _container(objs)
    argv = ctr["command"] + ctr["args"]
    assert argv[:3] == ["kopf", "run", "--standalone"]
    assert "--module=kubetune_operator.handlers" in argv
    assert "--all-namespaces" in argv and not any(a.startswith("--namespace") for a in argv)
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"] == {"type": "Recreate"}
    # kopf's liveness endpoint is what the kubelet probes
    liveness = next(a.split("=", 1)[1] for a in argv if a.startswith("--liveness="))
    assert liveness == "http://0.0.0.0:8080/healthz"
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    probe = ctr["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    env = {e["name"]: e for e in ctr["env"]}
    assert env["KUBETUNE_METRICS_PORT"]["value"] == str(ports["metrics"]) == "9090"
    assert "KUBETUNE_TRAINER_IMAGE" not in env
    assert ctr["image"] == "ghcr.io/kubetune/operator:0.1.0"  # appVersion by default
    pod = dep["spec"]["template"]
    assert restricted_problems(pod["spec"]) == []
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    # the metrics service reaches the pod's metrics port
    svc = one(objs, "Service")
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert pod["spec"]["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_kopf_accepts_the_rendered_command_line(chart, values):
    ctr = _container(render(chart, values))
    params = kopf_parses(ctr["command"] + ctr["args"])
    assert params["standalone"] is True
    assert params["modules"] == ("kubetune_operator.handlers",)
    assert params["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    if values.get("watchNamespaces"):
        assert params["namespaces"] == tuple(values["watchNamespaces"])
        assert params["clusterwide"] is False
    else:
        assert params["clusterwide"] is True


def test_kopf_parser_rejects_a_bad_flag():
    with pytest.raises(Exception, match="no-such-flag"):
        kopf_parses(["kopf", "run", "--no-such-flag"])


def test_log_levels_map_to_kopf_flags(chart):
    def args(level: str) -> list[str]:
        return _container(render(chart, {"logLevel": level}))["args"]

    assert "--debug" in args("debug")
    assert "--quiet" in args("warning")
    assert not {"--debug", "--quiet", "--verbose"} & set(args("info"))


def test_namespaced_install_options(chart):
    objs = render(chart, NAMESPACED)
    ctr = _container(objs)
    assert "--namespace=team-a" in ctr["args"] and "--namespace=team-b" in ctr["args"]
    assert "--all-namespaces" not in ctr["args"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["KUBETUNE_TRAINER_IMAGE"]["value"] == "registry.local/kubetune/trainer:0.1.0"
    assert env["EXTRA"]["value"] == "1"
    pod = one(objs, "Deployment")["spec"]["template"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["metadata"]["annotations"]["example.com/team"] == "ml"
    sa = one(objs, "ServiceAccount")
    assert sa["metadata"]["annotations"] == NAMESPACED["serviceAccount"]["annotations"]
    assert "team-a, team-b" in notes(chart, NAMESPACED)
    assert "every namespace" in notes(chart)


# ---------------------------------------------------------------- RBAC

OPERATOR_RULES = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "patch"},
    ("kubetune.io", "finetunejobs/status"): {"get", "patch", "update"},
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("", "pods"): {"get", "list", "watch", "create", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "delete"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
KOPF_CLUSTER_RULES = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("kubetune.io", "finetuneprofiles"): {"get", "list"},  # cluster-scoped: read at a job's first reconcile
}
ALL_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def grants(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def bound_to(objs: list[dict], binding_kind: str, role: dict) -> list[dict]:
    return [
        b
        for b in objs
        if b["kind"] == binding_kind
        and b["roleRef"]["name"] == role["metadata"]["name"]
        and b["roleRef"]["kind"] == role["kind"]
        and b["metadata"].get("namespace") == role["metadata"].get("namespace")
    ]


def test_rbac_cluster_wide_is_least_privilege(chart):
    objs = render(chart)
    role = one(objs, "ClusterRole", RELEASE)
    assert grants(role) == {**OPERATOR_RULES, **KOPF_CLUSTER_RULES}
    assert not [o for o in objs if o["kind"] in ("Role", "RoleBinding")]
    (binding,) = bound_to(objs, "ClusterRoleBinding", role)
    sa = one(objs, "ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]


def test_rbac_job_authors_edit_jobs_and_only_read_profiles(chart):
    """FineTuneJobs join the built-in edit/view roles; profiles are written by a separate admin role."""
    objs = render(chart)
    edit, view = one(objs, "ClusterRole", f"{RELEASE}-edit"), one(objs, "ClusterRole", f"{RELEASE}-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert grants(edit) == {("kubetune.io", "finetunejobs"): ALL_VERBS}
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert grants(view) == {
        ("kubetune.io", r): {"get", "list", "watch"}
        for r in ("finetunejobs", "finetunejobs/status", "finetuneprofiles")
    }
    admin = one(objs, "ClusterRole", f"{RELEASE}-profile-admin")
    assert grants(admin) == {("kubetune.io", "finetuneprofiles"): ALL_VERBS}
    assert not any(k.startswith("rbac.authorization.k8s.io/aggregate") for k in admin["metadata"]["labels"])


def test_rbac_namespaced_grants_only_the_watched_namespaces(chart):
    objs = render(chart, NAMESPACED)
    cluster = one(objs, "ClusterRole", RELEASE)
    # cluster-wide only what kopf reads to follow CRDs and the watched namespaces' existence
    assert grants(cluster) == {**KOPF_CLUSTER_RULES, ("", "namespaces"): {"list", "watch"}}
    roles = [o for o in objs if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    sa = one(objs, "ServiceAccount")
    for role in roles:
        assert grants(role) == OPERATOR_RULES
        (binding,) = bound_to(objs, "RoleBinding", role)
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
        ]


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rbac_never_touches_secrets_or_wildcards(chart, values):
    for obj in render(chart, values):
        if obj["kind"] in ("ClusterRole", "Role"):
            for (group, resource), verbs in grants(obj).items():
                assert resource != "secrets" and "*" not in (group, resource) and "*" not in verbs
                assert not verbs & {"escalate", "bind", "impersonate"}


def test_rbac_and_service_account_can_be_left_out(chart):
    objs = render(chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount"}
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_operator_reads_s3_with_its_own_secret_only_when_given(chart):
    from kubetune.conventions import ENV_S3_CREDENTIALS_DIR, S3_CREDENTIALS_DIR

    pod = one(render(chart, NAMESPACED), "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert {"name": ENV_S3_CREDENTIALS_DIR, "value": S3_CREDENTIALS_DIR} in container["env"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == S3_CREDENTIALS_DIR)
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "operator-s3-read"
    default = one(render(chart), "Deployment")["spec"]["template"]["spec"]
    assert all("secret" not in v for v in default["volumes"])


# ---------------------------------------------------------------- profiles and the admission policy


def test_values_create_profiles_the_operator_can_read(chart):
    from kubetune.profile_spec import FineTuneProfile
    from tests.crd_admission import _json_schema

    (obj,) = [o for o in render(chart, NAMESPACED) if o["kind"] == "FineTuneProfile"]
    profile = FineTuneProfile.model_validate(obj)
    assert profile.name == "h100-team-a" and profile.is_default
    assert obj["spec"] == NAMESPACED["profiles"]["h100-team-a"]
    assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kubetune"
    crd = yaml.safe_load((CHART / "crds" / "finetuneprofile.yaml").read_text())
    schema = _json_schema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert list(jsonschema.Draft4Validator(schema).iter_errors(obj)) == []  # the API server takes it
    two = {"profiles": {"a": {}, "b": {"limits": {"max_nodes": 2}}}}
    assert [o["metadata"] for o in render(chart, two) if o["kind"] == "FineTuneProfile"][1].get(
        "annotations"
    ) is None
    assert "FineTuneProfile" not in {o["kind"] for o in render(chart)}


def test_profile_values_are_checked_before_anything_is_applied(chart):
    from kubetune.profile_spec import FineTuneProfileSpec, Limits

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["profiles"]
    assert set(schema["additionalProperties"]["properties"]) == set(FineTuneProfileSpec.model_fields)
    assert set(schema["additionalProperties"]["properties"]["limits"]["properties"]) == set(
        Limits.model_fields
    )
    with pytest.raises(helm.HelmError, match="max_gpu"):  # a misspelt limit would limit nothing
        chart.render({"profiles": {"a": {"limits": {"max_gpu": 8}}}}, name=RELEASE)
    with pytest.raises(helm.HelmError, match="defaultProfile b is not one of the profiles"):
        chart.render({"profiles": {"a": {}}, "defaultProfile": "b"}, name=RELEASE)


def test_the_admission_policy_is_the_generated_one_bound_to_every_profile(chart):
    from kubetune.policy import build_policy

    objs = render(chart)
    policy = one(objs, "ValidatingAdmissionPolicy")
    binding = one(objs, "ValidatingAdmissionPolicyBinding")
    assert policy["metadata"]["name"] == f"{RELEASE}-profile-limits"
    assert policy["spec"] == build_policy()["spec"]
    assert policy["spec"]["paramKind"] == {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneProfile"}
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
        "validationActions": ["Deny"],
    }
    off = {o["kind"] for o in render(chart, {"admissionPolicy": {"enabled": False}})}
    assert not off & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
