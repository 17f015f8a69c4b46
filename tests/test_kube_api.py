"""The API emulator (tests/kube_api.py) does what the real API server is documented to do.

Each test names the Kubernetes documentation it follows:
  [concepts]  https://kubernetes.io/docs/reference/using-api/api-concepts/
  [crd]       https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/
  [gc]        https://kubernetes.io/docs/concepts/architecture/garbage-collection/
  [pods]      https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination
  [labels]    https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/
  [finalizers] https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kubetune.methods import METHOD_NAMES
from tests.fixtures_kube import CRD, job_doc
from tests.kube_api import RunningAPI

FTJ = "/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs"
PODS = "/api/v1/namespaces/default/pods"
CMS = "/api/v1/namespaces/default/configmaps"
MERGE = {"Content-Type": "application/merge-patch+json"}


class Http:
    def __init__(self, url: str) -> None:
        self.url, self.s = url, requests.Session()

    def __call__(
        self, method: str, path: str, body: Any = None, headers: dict | None = None, **params: Any
    ) -> Any:
        r = self.s.request(method, self.url + path, json=body, headers=headers, params=params, timeout=10)
        return r.status_code, (r.json() if r.content else None), r.headers

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> dict:
        code, data, _ = self(method, path, body, **kw)
        assert code in (200, 201), (code, data)
        return data


@pytest.fixture(scope="module")
def server() -> Iterator[RunningAPI]:
    with RunningAPI() as api:
        api.api.install_crd(CRD)
        yield api


@pytest.fixture
def http(server: RunningAPI) -> Http:
    return Http(server.url)


def pod(name: str, labels: dict | None = None, **meta: Any) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}, **meta},
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "terminationGracePeriodSeconds": 7}}  # fmt: skip


def job(name: str, **spec: Any) -> dict:
    doc = job_doc(name, Path("/tmp/out"))
    doc["spec"].update(spec)
    return doc


# ---------------------------------------------------------------- metadata and HTTP semantics [concepts]


def test_create_fills_metadata_and_returns_201(http: Http) -> None:
    code, body, _ = http("POST", PODS, pod("meta-a"))
    meta = body["metadata"]
    assert code == 201 and meta["namespace"] == "default" and len(meta["uid"]) == 36
    assert meta["resourceVersion"].isdigit() and meta["creationTimestamp"].endswith("Z")
    assert body["status"]["phase"] == "Pending"  # a new pod's status is the server's, not the client's
    code, body, _ = http("POST", PODS, pod("meta-b", namespace="other"))
    assert code == 400 and body["reason"] == "BadRequest"  # the URL's namespace wins or it is an error


def test_duplicate_create_is_409_already_exists_and_missing_is_404(http: Http) -> None:
    http.ok("POST", PODS, pod("dup"))
    code, body, _ = http("POST", PODS, pod("dup"))
    assert (code, body["reason"], body["message"]) == (409, "AlreadyExists", 'pods "dup" already exists')
    assert body["details"] == {"name": "dup", "group": "", "kind": "pods"}
    code, body, _ = http("GET", f"{FTJ}/nope")
    assert (code, body["reason"], body["message"]) == (
        404,
        "NotFound",
        'finetunejobs.kubetune.io "nope" not found',
    )


def test_generate_name(http: Http) -> None:
    body = http.ok("POST", "/api/v1/namespaces/default/events", {"metadata": {"generateName": "ev-"}, "reason": "X",
                   "involvedObject": {"name": "a"}})  # fmt: skip
    assert body["metadata"]["name"].startswith("ev-") and len(body["metadata"]["name"]) == 8
    assert (body["apiVersion"], body["kind"]) == ("v1", "Event")  # filled from the URL


def test_resource_version_moves_on_every_write_and_only_then(http: Http) -> None:
    rv0 = int(
        http.ok("POST", CMS, {"metadata": {"name": "rv"}, "data": {"a": "1"}})["metadata"]["resourceVersion"]
    )
    rv1 = int(
        http.ok("PATCH", f"{CMS}/rv", {"data": {"a": "2"}}, headers=MERGE)["metadata"]["resourceVersion"]
    )
    rv2 = int(
        http.ok("PATCH", f"{CMS}/rv", {"data": {"a": "2"}}, headers=MERGE)["metadata"]["resourceVersion"]
    )
    assert rv1 > rv0 and rv2 == rv1  # a patch that changes nothing is not a write


def test_generation_moves_on_spec_changes_only(http: Http) -> None:
    """[crd] "incremented for all changes, except for changes to .metadata or .status"."""
    assert http.ok("POST", FTJ, job("gen"))["metadata"]["generation"] == 1
    assert (
        http.ok("PATCH", f"{FTJ}/gen", {"metadata": {"labels": {"a": "b"}}}, headers=MERGE)["metadata"][
            "generation"
        ]
        == 1
    )
    assert (
        http.ok("PATCH", f"{FTJ}/gen/status", {"status": {"phase": "Running"}}, headers=MERGE)["metadata"][
            "generation"
        ]
        == 1
    )
    assert (
        http.ok("PATCH", f"{FTJ}/gen", {"spec": {"suspend": True}}, headers=MERGE)["metadata"]["generation"]
        == 2
    )


def test_status_subresource_separates_status_from_the_rest(http: Http) -> None:
    """[crd] writes to the resource ignore status; writes to /status ignore everything else."""
    http.ok("POST", FTJ, {**job("sub"), "status": {"phase": "Running"}})
    assert "status" not in http.ok("GET", f"{FTJ}/sub")  # status on create is dropped
    body = http.ok("PATCH", f"{FTJ}/sub/status", {"status": {"phase": "Pending"}, "spec": {"suspend": True},
                   "metadata": {"labels": {"x": "y"}}}, headers=MERGE)  # fmt: skip
    assert (
        body["status"] == {"phase": "Pending"}
        and body["spec"]["suspend"] is False
        and "labels" not in body["metadata"]
    )
    body = http.ok(
        "PATCH", f"{FTJ}/sub", {"status": {"phase": "Failed"}, "spec": {"suspend": True}}, headers=MERGE
    )
    assert body["status"] == {"phase": "Pending"} and body["spec"]["suspend"] is True


def test_optimistic_concurrency(http: Http) -> None:
    """[concepts] a stale resourceVersion is a 409 Conflict; a failed JSON-patch `test` is rejected (422)."""
    rv = http.ok("POST", CMS, {"metadata": {"name": "occ"}, "data": {}})["metadata"]["resourceVersion"]
    http.ok("PATCH", f"{CMS}/occ", {"data": {"a": "1"}}, headers=MERGE)
    code, body, _ = http(
        "PATCH", f"{CMS}/occ", {"metadata": {"resourceVersion": rv}, "data": {"a": "2"}}, headers=MERGE
    )
    assert code == 409 and body["reason"] == "Conflict" and "the object has been modified" in body["message"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/data/b", "value": "3"},
    ]
    code, _, _ = http("PATCH", f"{CMS}/occ", ops, headers={"Content-Type": "application/json-patch+json"})
    assert code == 422
    current = http.ok("GET", f"{CMS}/occ")
    code, body, _ = http("PUT", f"{CMS}/occ", {**current, "data": {"c": "4"}})
    assert code == 200 and body["data"] == {"c": "4"}
    code, _, _ = http("PUT", f"{CMS}/occ", {**current, "data": {"c": "5"}})  # the same, now stale, version
    assert code == 409


def test_strategic_merge_patch_is_refused_for_custom_resources(http: Http) -> None:
    http.ok("POST", FTJ, job("smp"))
    code, body, _ = http("PATCH", f"{FTJ}/smp", {"spec": {"suspend": True}},
                         headers={"Content-Type": "application/strategic-merge-patch+json"})  # fmt: skip
    assert code == 415


def test_dry_run_stores_nothing(http: Http) -> None:
    assert http("POST", CMS, {"metadata": {"name": "dry"}}, dryRun="All")[0] == 201
    assert http("GET", f"{CMS}/dry")[0] == 404


def test_namespaces_are_served(http: Http) -> None:
    names = [n["metadata"]["name"] for n in http.ok("GET", "/api/v1/namespaces")["items"]]
    assert {"default", "kube-system"} <= set(names)
    assert http.ok("GET", "/api/v1/namespaces/default")["kind"] == "Namespace"


def test_discovery_serves_the_crd_with_its_status_subresource(http: Http) -> None:
    doc = http.ok("GET", "/apis/kubetune.io/v1alpha1")
    entries = {r["name"]: r for r in doc["resources"]}
    assert entries["finetunejobs"]["kind"] == "FineTuneJob" and entries["finetunejobs"]["shortNames"] == [
        "ftj"
    ]
    assert (
        entries["finetunejobs/status"]["shortNames"] == [] and entries["finetunejobs"]["namespaced"] is True
    )


# ---------------------------------------------------------------- selectors and watches [labels] [concepts]


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("tier=a", ["sel-1", "sel-2"]), ("tier==a", ["sel-1", "sel-2"]), ("tier!=a", ["sel-3", "sel-4"]),
        ("tier in (a,b)", ["sel-1", "sel-2", "sel-3"]), ("tier notin (a)", ["sel-3", "sel-4"]),
        ("gpu", ["sel-2"]), ("!gpu", ["sel-1", "sel-3", "sel-4"]), ("tier=a,gpu", ["sel-2"]),
    ],
)  # fmt: skip
def test_label_selectors(http: Http, selector: str, names: list[str]) -> None:
    labels = {"sel-1": {"tier": "a"}, "sel-2": {"tier": "a", "gpu": "1"}, "sel-3": {"tier": "b"}, "sel-4": {}}
    for name, lab in labels.items():
        http("POST", PODS, pod(name, {"group": "sel", **lab}))
    found = [
        p["metadata"]["name"] for p in http.ok("GET", PODS, labelSelector=f"group=sel,{selector}")["items"]
    ]
    assert found == names
    assert [
        p["metadata"]["name"] for p in http.ok("GET", PODS, fieldSelector="metadata.name=sel-3")["items"]
    ] == ["sel-3"]


def watch(http: Http, path: str, **params: Any) -> list[dict]:
    r = http.s.get(
        http.url + path, params={"watch": "true", "timeoutSeconds": "1", **params}, stream=True, timeout=10
    )
    assert r.headers["Content-Type"].startswith("application/json")
    return [json.loads(line) for line in r.iter_lines() if line]


def test_watch_from_a_resource_version_and_selector_transitions(http: Http) -> None:
    rv = http.ok("GET", CMS)["metadata"]["resourceVersion"]
    http.ok("POST", CMS, {"metadata": {"name": "w1", "labels": {"w": "yes"}}})
    http.ok("PATCH", f"{CMS}/w1", {"data": {"k": "v"}}, headers=MERGE)
    http.ok("PATCH", f"{CMS}/w1", {"metadata": {"labels": {"w": "no"}}}, headers=MERGE)  # leaves the selector
    http.ok("DELETE", f"{CMS}/w1")
    events = watch(http, CMS, resourceVersion=rv, labelSelector="w=yes")
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    events = watch(http, CMS, resourceVersion=rv, fieldSelector="metadata.name=w1")
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "MODIFIED", "DELETED"]
    assert all(int(e["object"]["metadata"]["resourceVersion"]) > int(rv) for e in events)


def test_watch_without_a_version_starts_with_the_current_objects(http: Http) -> None:
    http.ok("POST", CMS, {"metadata": {"name": "now", "labels": {"now": "1"}}})
    assert [
        (e["type"], e["object"]["metadata"]["name"]) for e in watch(http, CMS, labelSelector="now=1")
    ] == [("ADDED", "now")]


def test_watch_from_an_expired_version_is_410_gone(server: RunningAPI, http: Http) -> None:
    first = server.api._first_rv
    server.api._first_rv = 10**9
    try:
        (event,) = watch(http, CMS, resourceVersion="5")
    finally:
        server.api._first_rv = first
    assert (
        event["type"] == "ERROR" and event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"
    )


# ---------------------------------------------------------------- deletion [finalizers] [gc] [pods]


def test_finalizers_hold_deletion_until_removed(http: Http) -> None:
    http.ok("POST", CMS, {"metadata": {"name": "fin", "finalizers": ["example.com/x"]}})
    body = http.ok("DELETE", f"{CMS}/fin")
    assert body["metadata"]["deletionTimestamp"] and http("GET", f"{CMS}/fin")[0] == 200
    http.ok("PATCH", f"{CMS}/fin", {"metadata": {"finalizers": None}}, headers=MERGE)
    assert http("GET", f"{CMS}/fin")[0] == 404


def owned(owner: dict, name: str) -> dict:
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
           "uid": owner["metadata"]["uid"], "controller": True}  # fmt: skip
    return {"metadata": {"name": name, "ownerReferences": [ref]}}


def test_garbage_collection_of_dependents(http: Http) -> None:
    owner = http.ok("POST", FTJ, job("owner"))
    http.ok("POST", CMS, owned(owner, "dep-1"))
    http.ok("POST", PODS, {**pod("dep-2"), **{"metadata": owned(owner, "dep-2")["metadata"]}})
    http.ok("DELETE", f"{FTJ}/owner")
    assert http("GET", f"{CMS}/dep-1")[0] == 404 and http("GET", f"{PODS}/dep-2")[0] == 404
    # a dependent created after its owner is gone is collected too
    assert http("POST", CMS, owned(owner, "dep-3"))[0] == 201 and http("GET", f"{CMS}/dep-3")[0] == 404
    # orphan: dependents stay, without the reference
    owner = http.ok("POST", FTJ, job("owner2"))
    http.ok("POST", CMS, owned(owner, "dep-4"))
    http.ok("DELETE", f"{FTJ}/owner2", propagationPolicy="Orphan")
    assert http.ok("GET", f"{CMS}/dep-4")["metadata"]["ownerReferences"] == []


def test_graceful_deletion_of_pods_bound_to_a_node(http: Http) -> None:
    http.ok("POST", PODS, pod("loose"))
    assert http.ok("DELETE", f"{PODS}/loose") and http("GET", f"{PODS}/loose")[0] == 404  # unbound: at once
    http.ok("POST", PODS, pod("bound"))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": "bound"},
        "target": {"kind": "Node", "name": "n1"},
    }
    assert http("POST", f"{PODS}/bound/binding", binding)[0] == 201
    assert http("POST", f"{PODS}/bound/binding", binding)[0] == 409  # already bound
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    body = http.ok("DELETE", f"{PODS}/bound")
    assert body["metadata"]["deletionGracePeriodSeconds"] == 7
    # deletionTimestamp is when the grace period ends (ObjectMeta's documented meaning), not now
    due = dt.datetime.fromisoformat(body["metadata"]["deletionTimestamp"].replace("Z", "+00:00"))
    assert dt.timedelta(seconds=7) <= due - before <= dt.timedelta(seconds=9)
    assert http("GET", f"{PODS}/bound")[0] == 200  # terminating until the kubelet confirms
    http.ok("DELETE", f"{PODS}/bound", gracePeriodSeconds="0")
    assert http("GET", f"{PODS}/bound")[0] == 404


def test_eviction_marks_the_disruption_then_deletes(http: Http) -> None:
    http.ok("POST", PODS, pod("evictee"))
    http.ok("POST", f"{PODS}/evictee/binding", {"target": {"kind": "Node", "name": "n1"}})
    assert http("POST", f"{PODS}/evictee/eviction", {"apiVersion": "policy/v1", "kind": "Eviction"})[0] == 201
    body = http.ok("GET", f"{PODS}/evictee")
    assert body["metadata"]["deletionTimestamp"]
    assert [c["reason"] for c in body["status"]["conditions"] if c["type"] == "DisruptionTarget"] == [
        "EvictionByEvictionAPI"
    ]


# ---------------------------------------------------------------- custom resource admission [crd]


def test_schema_defaults_are_applied(http: Http) -> None:
    body = http.ok("POST", FTJ, {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "dflt"},
                   "spec": {"model": {"uri": "s3://models/x"}, "dataset": {"uri": "s3://data/x"}, "output": {"uri": "s3://runs/x"}}})  # fmt: skip
    assert (
        body["spec"]["restart_policy"]["max_restarts"] == 3
        and body["spec"]["pet_config"]["pet_type"] == "lora"
    )


def test_unknown_fields_are_pruned_with_a_warning_or_refused_when_strict(http: Http) -> None:
    doc = job("prune")
    doc["spec"]["pet_config"] = {"lora_rnk": 4}
    code, body, headers = http("POST", FTJ, doc)
    assert code == 201 and "lora_rnk" not in body["spec"]["pet_config"]
    assert (
        'unknown field \\"spec.pet_config.lora_rnk\\"' in headers["Warning"]
        or "spec.pet_config.lora_rnk" in headers["Warning"]
    )
    doc["metadata"]["name"] = "strict"
    code, body, _ = http("POST", FTJ, doc, fieldValidation="Strict")
    assert (
        code == 400 and body["message"] == 'strict decoding error: unknown field "spec.pet_config.lora_rnk"'
    )


@pytest.mark.parametrize(
    ("patch", "field", "message"),
    [
        ({"pet_config": {"lora_rank": 0}}, "spec.pet_config.lora_rank",
         "Invalid value: 0: spec.pet_config.lora_rank in body should be greater than or equal to 1"),
        ({"method": "rlhf"}, "spec.method",
         'Unsupported value: "rlhf": supported values: ' + ", ".join(f'"{m}"' for m in METHOD_NAMES)),
        ({"training": {"learning_rate": "fast"}}, "spec.training.learning_rate",
         'Invalid value: "string": spec.training.learning_rate in body must be of type number: "string"'),
        ({"output": {}}, "spec.output.uri", "Required value"),
        ({"pet_config": {"pet_type": "qlora"}}, "spec.pet_config.quantization",
         'Invalid value: "object": pet_type qlora needs a quantization block (bits: 4 or 8)'),
    ],
)  # fmt: skip
def test_invalid_objects_are_422_with_the_field_named(
    http: Http, patch: dict, field: str, message: str
) -> None:
    doc = job("invalid")
    doc["spec"].update(patch)
    code, body, _ = http("POST", FTJ, doc)
    assert code == 422 and body["reason"] == "Invalid"
    assert body["message"] == f'FineTuneJob.kubetune.io "invalid" is invalid: {field}: {message}'
    assert body["details"]["causes"] == [
        {"reason": body["details"]["causes"][0]["reason"], "message": message, "field": field}
    ]


def test_transition_rules_make_fields_immutable(http: Http) -> None:
    http.ok("POST", FTJ, job("immut"))
    code, body, _ = http("PATCH", f"{FTJ}/immut", {"spec": {"method": "pretrain"}}, headers=MERGE)
    assert code == 422 and body["details"]["causes"][0]["field"] == "spec.method"
    assert 'Invalid value: "string": method is immutable' in body["message"]
    assert http("PATCH", f"{FTJ}/immut", {"spec": {"suspend": True, "image": "x:1"}}, headers=MERGE)[0] == 200


def test_kubectl_get_shows_the_printer_columns(server: RunningAPI, http: Http, tmp_path: Path) -> None:
    """Server-side printing: `kubectl get` asks for a Table and shows the CRD's additionalPrinterColumns."""
    import subprocess

    http.ok("POST", FTJ, job("cols"))
    status = {"phase": "Running", "restarts": 1, "progress": {"summary": "40% (8/20)", "loss": 1.25}}
    http.ok("PATCH", f"{FTJ}/cols/status", {"status": status}, headers=MERGE)
    env = {"KUBECONFIG": str(server.kubeconfig(tmp_path / "kubeconfig")), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        ["kubectl", "get", "ftj", "cols"], env=env, capture_output=True, text=True, timeout=60
    )
    header, row = out.stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "RESTARTS", "AGE"], out.stderr
    assert row.split()[:6] == ["cols", "Running", "40%", "(8/20)", "1.25", "1"]
