"""What the API server does with a FineTuneJob on create/update, from the CRD file alone:
apply schema defaults, validate the OpenAPI schema, evaluate the CEL x-kubernetes-validations
(transition rules with oldSelf on update). Used by the CRD tests and the API emulator."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parents[1] / "crds" / "finetunejob.yaml"


@cache
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Fill schema defaults like the API server does (parents first, then their children)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def _json_schema(node: Any) -> Any:
    """The OpenAPI node as JSON Schema draft 4 (what the API server's checks amount to)."""
    if isinstance(node, dict):
        out = {k: _json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if (
            node.get("type") == "object"
            and "properties" in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False  # the API server prunes or (strict) rejects unknown fields
        return out
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    return node


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(_json_schema(schema()))
    out = []
    for err in validator.iter_errors(obj):
        path = ".".join(str(p) for p in err.absolute_path)
        out.append(f"{path}: {err.message}")
    return out


_env = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _env.program(_env.compile(rule))


def cel_errors(obj: Any, old: Any = None, node: dict[str, Any] | None = None, path: str = "") -> list[str]:
    """Evaluate every x-kubernetes-validations rule that applies to `obj` (and `old` for transitions)."""
    node = schema() if node is None else node
    out = []
    for v in node.get("x-kubernetes-validations", []):
        if "oldSelf" in v["rule"]:
            if old is None:
                continue  # transition rules only run on update
            activation = {"self": celpy.json_to_cel(obj), "oldSelf": celpy.json_to_cel(old)}
        else:
            activation = {"self": celpy.json_to_cel(obj)}
        try:
            result = bool(_program(v["rule"]).evaluate(activation))
        except (TypeError, celpy.CELEvalError):
            result = False  # the API server rejects an object whose rule fails to evaluate
        if not result:
            field = path + v.get("fieldPath", "")
            out.append(f"{field.lstrip('.')}: {v['message']}")
    if isinstance(obj, dict) and "properties" in node:
        for name, sub in node["properties"].items():
            if name in obj:
                old_value = old.get(name) if isinstance(old, dict) else None
                out += cel_errors(obj[name], old_value, sub, f"{path}.{name}")
    elif isinstance(obj, list) and "items" in node:
        for i, item in enumerate(obj):
            out += cel_errors(item, None, node["items"], f"{path}[{i}]")
    return out


def admit(obj: dict[str, Any], old: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Default, then validate like the API server; returns (stored object, problems)."""
    stored = apply_defaults(schema(), obj)
    problems = schema_errors(stored)
    if not problems:
        problems = cel_errors(stored, apply_defaults(schema(), old) if old else None)
    return stored, problems
