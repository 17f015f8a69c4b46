"""The CRD is generated from the spec, is a valid structural CRD, and agrees with `kubetune validate`."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import spec as s
from kubetune.crd import render_crd_yaml
from kubetune.validate import SpecError, load_jobs_text, load_yaml_documents
from tests import crd_admission as api
from tests.fixtures_spec import BAD_COMBINATIONS, BAD_FIELDS, BASE, EXAMPLES, set_field

ROOT = Path(__file__).resolve().parents[1]


def test_crd_file_is_what_kubetune_crd_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "kubetune", "crd"], capture_output=True, text=True, check=True
    ).stdout
    assert printed == render_crd_yaml()
    assert (ROOT / "crds" / "finetunejob.yaml").read_text() == printed, (
        "run: kubetune crd > crds/finetunejob.yaml"
    )


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0", "1.37.0"])
def test_crd_passes_the_kubernetes_schema(version: str) -> None:
    run = subprocess.run(
        ["kubernetes-validate", "--strict", "-k", version, str(ROOT / "crds" / "finetunejob.yaml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "passed" in run.stdout


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural_and_documented() -> None:
    for path, node in _walk(api.schema()):
        forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions", "title"} & set(node)
        assert not forbidden, f"{path}: {forbidden} is not structural"
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if path.startswith(".spec.") and "[]" not in path and "{}" not in path:
            assert node.get("description"), f"{path} has no description for kubectl explain"
        if node.get("type") == "string" and path.startswith(".spec"):
            assert "maxLength" in node, f"{path}: unbounded strings make CEL cost estimates fail"
        if node.get("type") == "array" and path.startswith(".spec"):
            assert "maxItems" in node, path


def test_crd_metadata() -> None:
    crd = api.crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and "kubetune" in names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Phase",
        "Progress",
        "Loss",
        "Restarts",
        "Age",
    ]


def test_every_spec_field_is_in_the_schema() -> None:
    from kubetune.spec import FineTuneJobSpec

    props = api.schema()["properties"]["spec"]["properties"]
    assert set(props) == set(FineTuneJobSpec.model_fields)
    assert set(props["pet_config"]["properties"]) >= {
        "pet_type", "lora_rank", "lora_alpha", "lora_dropout", "target_modules", "freeze_trainable_layers", "quantization",
    }  # fmt: skip


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_admitted_by_the_crd(path: Path) -> None:
    for doc in load_yaml_documents(path.read_text()):
        stored, problems = api.admit(doc)
        assert problems == []
        # what the API server stores (with its defaults) is still a valid job for the operator
        (job,) = load_jobs_text(yaml.safe_dump(stored))
        assert job.metadata.name == doc["metadata"]["name"]


@pytest.mark.parametrize("case,path,value,field,words", BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_schema_rejects_bad_field_too(case: str, path: str, value: Any, field: str, words: str) -> None:
    doc = set_field(BASE, path, value)
    _, problems = api.admit(doc)
    python_rejects = True
    try:
        load_jobs_text(yaml.safe_dump(doc))
        python_rejects = False
    except SpecError:
        pass
    assert python_rejects
    # The CRD catches what a schema can say; URIs and regexes beyond its pattern are the CLI's job.
    beyond_schema = {"target-modules-bad-regex", "inline-secret-key", "inline-access-key", "hf-no-org",
                     "memory-not-quantity", "pvc-bad-claim", "target-modules-empty-list",
                     "model-uri-http", "target-modules-backreference"}  # fmt: skip
    if case not in beyond_schema:
        assert problems, f"{case}: the API server would accept it"


@pytest.mark.parametrize("case,patch,field,words", BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS])
def test_cel_rules_say_what_validate_says(case: str, patch: dict[str, Any], field: str, words: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(patch)
    _, problems = api.admit(doc)
    with pytest.raises(SpecError) as e:
        load_jobs_text(yaml.safe_dump(doc))
    python = sorted(f"{p.path}: {p.message}" for p in e.value.problems)
    assert sorted(problems) == python


def test_cel_rules_accept_every_example() -> None:
    for path in EXAMPLES:
        for doc in load_yaml_documents(path.read_text()):
            assert api.cel_errors(api.apply_defaults(api.schema(), doc)) == [], path


def test_immutable_fields_are_rejected_on_update_but_suspend_is_not() -> None:
    old, _ = api.admit(BASE)
    changed = set_field(old, "spec.pet_config.lora_rank", 32)
    _, problems = api.admit(changed, old)
    assert problems == [
        "spec.pet_config: pet_config is immutable once the job exists; create a new FineTuneJob instead"
    ]
    _, problems = api.admit(set_field(old, "spec.suspend", True), old)
    assert problems == []


def test_target_modules_accepts_string_or_list_only() -> None:
    for value, ok in [("all-linear", True), (["q_proj", "v_proj"], True), (["q_proj", 3], False), (7, False)]:
        _, problems = api.admit(set_field(BASE, "spec.pet_config.target_modules", value))
        assert (problems == []) is ok, (value, problems)


# Per-field CEL rules of hostile inputs: the API server says what `kubetune validate` says.
HOSTILE_CEL_CASES = [
    c
    for c in BAD_FIELDS
    if "'..' path segments" in c[4] or c[0].startswith(("s3-endpoint-with", "s3-endpoint-no"))
]


@pytest.mark.parametrize(
    "case,path,value,field,words", HOSTILE_CEL_CASES, ids=[c[0] for c in HOSTILE_CEL_CASES]
)
def test_field_rules_say_what_validate_says(case: str, path: str, value: Any, field: str, words: str) -> None:
    doc = set_field(BASE, path, value)
    _, problems = api.admit(doc)
    with pytest.raises(SpecError) as e:
        load_jobs_text(yaml.safe_dump(doc))
    (python,) = [f"{p.path}: {p.message}" for p in e.value.problems]
    (cel,) = problems
    assert python.startswith(cel) and words in cel, (python, cel)


BAD_NAMES = ["qwen2.5-lora", "j" * 64, "lora-", "-lora", "Lora", "lora_7b", "a" * 253]
GOOD_NAMES = ["a", "7b-lora", "j" * 63, "qwen25-7b-lora"]


@pytest.mark.parametrize("name", BAD_NAMES + GOOD_NAMES, ids=[n[:20] for n in BAD_NAMES + GOOD_NAMES])
def test_job_names_are_checked_at_admission_like_validate(name: str) -> None:
    doc = set_field(BASE, "metadata.name", name)
    _, problems = api.admit(doc)
    try:
        load_jobs_text(yaml.safe_dump(doc))
        python: list[str] = []
    except SpecError as e:
        python = [f"{p.path}: {p.message}" for p in e.problems]
    if name in GOOD_NAMES:
        assert problems == python == []
    else:
        (cel,) = problems
        (line,) = python
        assert cel == f": {s.JOB_NAME_MESSAGE}"
        assert line.replace("metadata.name: ", "metadata.name ", 1).startswith(s.JOB_NAME_MESSAGE)


@pytest.fixture(scope="module")
def api_server() -> Any:
    from tests.fixtures_kube import CRD
    from tests.kube_api import RunningAPI

    with RunningAPI() as running:
        running.api.install_crd(CRD)
        yield running


@pytest.mark.parametrize(
    "name,patch,words",
    [
        ("qwen2.5-lora", {}, "metadata.name must be a DNS-1123 label"),
        ("j" * 64, {}, "metadata.name must be a DNS-1123 label"),
        ("huge", {"parallel_config": {"nnodes": 1000000000}}, "spec.parallel_config.nnodes in body should be less than or equal to 512"),
        ("procs", {"parallel_config": {"nproc_per_node": 65}}, "less than or equal to 64"),
        ("escape", {"model": {"uri": "pvc://claim/../../etc"}}, "spec.model.uri: Invalid value: \"string\": must not contain '..'"),
        ("creds", {"storage": {"s3": {"endpoint": "http://KEY:SECRET@minio:9000"}}}, "spec.storage.s3.endpoint: Invalid value: \"string\": must not hold credentials"),
    ],
    ids=["dotted-name", "long-name", "nnodes", "nproc", "dot-dot", "endpoint-userinfo"],
)  # fmt: skip
def test_the_api_server_refuses_hostile_jobs(api_server: Any, name: str, patch: dict, words: str) -> None:
    import requests

    doc = copy.deepcopy(BASE)
    doc["metadata"] = {"name": name, "namespace": "default"}
    doc["spec"].update(patch)
    r = requests.post(
        f"{api_server.url}/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs", json=doc, timeout=10
    )
    assert r.status_code == 422, r.text
    assert words in r.json()["message"], r.json()["message"]
