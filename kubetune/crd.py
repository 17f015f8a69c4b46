"""Generate the FineTuneJob and FineTuneProfile CustomResourceDefinitions from the pydantic models (pure)."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune import profile_spec as ps
from kubetune import spec as s

# Bounds keep CEL cost estimates of the API server low (unbounded strings/lists cost the maximum).
_MAX_STRING = 4096
_MAX_ITEMS = 64
_LONG_STRINGS = {"system_prompt": 65536}


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
            extra = {k: v for k, v in node.items() if k != "$ref"}
            target.update(extra)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any], name: str = "") -> dict[str, Any]:
    """Turn one resolved JSON-schema node into a Kubernetes structural OpenAPI v3 node."""
    node = dict(node)
    node.pop("title", None)
    if node.pop("x-kubetune-string-or-list", False):
        desc = node.get("description", "")
        return {
            "description": desc,
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) == string || (type(self) == list && self.all(x, type(x) == string))",
                    "message": "must be a string (regex or 'all-linear') or a list of module names",
                }
            ],
        }
    scalars = node.pop("x-kubetune-scalar-enum", None)
    if scalars is not None:
        # booleans and strings in one field (true / 'offload'): no structural type says that, so CEL does
        bools = [str(v).lower() for v in scalars if isinstance(v, bool)]
        strings = [v for v in scalars if isinstance(v, str)]
        alternatives = [f"(type(self) == bool && self == {b})" for b in bools]
        alternatives.append(f"(type(self) == string && self in [{', '.join(repr(v) for v in strings)}])")
        shown = ", ".join(str(v).lower() if isinstance(v, bool) else repr(v) for v in scalars)
        return {
            "description": node.get("description", ""),
            "x-kubernetes-preserve-unknown-fields": True,
            "x-kubernetes-validations": [
                {"rule": " || ".join(alternatives), "message": f"must be one of {shown}"}
            ],
        }
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"field {name!r}: unions other than Optional are not structural")
        merged = {**options[0], **node}
        if merged.get("default", 0) is None:
            merged.pop("default")
            merged["x-kubetune-absent-by-default"] = True  # Optional: no `default: {}` for it
        return _structural(merged, name)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        first = node["enum"][0]
        node["type"] = "integer" if isinstance(first, int) else "string"
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if bound in node and not isinstance(node[bound], bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties")
        if props is not None:
            node["properties"] = {k: _structural(v, k) for k, v in props.items()}
            node.pop("additionalProperties", None)
            for k, v in node["properties"].items():
                absent = v.pop("x-kubetune-absent-by-default", False)
                # Sub-blocks with defaults are materialised so the API server fills their fields too.
                if (
                    v.get("type") == "object"
                    and "properties" in v
                    and k not in node.get("required", [])
                    and not absent
                ):
                    v.setdefault("default", {})
        else:
            extra = node.get("additionalProperties")
            if isinstance(extra, dict) and extra:
                node["additionalProperties"] = _structural(extra, name)
                node.setdefault("maxProperties", _MAX_ITEMS)
            else:
                node.pop("additionalProperties", None)
                node["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        node["items"] = _structural(node.get("items", {"type": "string"}), name)
        node.setdefault("maxItems", _MAX_ITEMS)
    elif kind == "string":
        node.setdefault("maxLength", _LONG_STRINGS.get(name, _MAX_STRING))
    if "default" in node and node["default"] in ([], None):
        node.pop("default")
    return node


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI schema of a pydantic model."""
    raw = model.model_json_schema()
    return _structural(_resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {})))


def spec_schema() -> dict[str, Any]:
    schema = schema_of(s.FineTuneJobSpec)
    root = {"type": "object", "properties": {"spec": schema}}
    for rule in s.CROSS_FIELD_RULES:
        validation = {"rule": rule.cel, "message": rule.message}
        relative = rule.path[len(rule.scope) :]  # fieldPath is relative to the node holding the rule
        if relative:
            validation["fieldPath"] = relative
        _at(root, rule.scope).setdefault("x-kubernetes-validations", []).append(validation)
    for field in s.IMMUTABLE_FIELDS:
        schema["properties"][field].setdefault("x-kubernetes-validations", []).append(
            {
                "rule": "self == oldSelf",
                "message": f"{field} is immutable once the job exists; create a new FineTuneJob instead",
            }
        )
    return schema


def status_schema() -> dict[str, Any]:
    raw = s.FineTuneJobStatus.model_json_schema()
    schema = _structural(_resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {})))
    schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": s.SHORT_NAMES,
                "categories": s.CATEGORIES,
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
                        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "priority": 1},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A fine-tuning job: model, data, method and how to run it. "
                            "The kubetune operator runs it as a gang of torchrun pods.",
                            "required": ["spec"],
                            # Only a root rule can see metadata.name; no fieldPath, as metadata has no
                            # declared properties for it to point at (the message names the field).
                            "x-kubernetes-validations": [
                                {"rule": s.JOB_NAME_CEL, "message": s.JOB_NAME_MESSAGE}
                            ],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                # Status is written by the operator only: no defaults there.
                                "status": _strip_defaults(status_schema()),
                            },
                        }
                    },
                }
            ],
        },
    }


def build_profile_crd() -> dict[str, Any]:
    """The cluster-scoped FineTuneProfile CustomResourceDefinition (no status: nothing reconciles it)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{ps.PROFILE_PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Cluster",
            "names": {
                "kind": ps.PROFILE_KIND,
                "listKind": f"{ps.PROFILE_KIND}List",
                "plural": ps.PROFILE_PLURAL,
                "singular": ps.PROFILE_SINGULAR,
                "shortNames": ps.PROFILE_SHORT_NAMES,
                "categories": s.CATEGORIES,
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": [
                        {
                            "name": "Default",
                            "type": "string",
                            "jsonPath": ".metadata.annotations.kubetune\\.io/default-profile",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "What a platform team sets once for FineTuneJobs: defaults, pod "
                            "settings, limits and a model catalog. A job names it in spec.profile.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": _strip_defaults(schema_of(ps.FineTuneProfileSpec)),
                            },
                        }
                    },
                }
            ],
        },
    }


CRD_KINDS = {"FineTuneJob": build_crd, "FineTuneProfile": build_profile_crd}


def render_crd_yaml(kind: str = "FineTuneJob") -> str:
    header = "# Generated by `kubetune crd` from kubetune/spec.py. Do not edit by hand.\n"
    if kind != "FineTuneJob":
        header = f"# Generated by `kubetune crd --kind {kind}` from kubetune/profile_spec.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(CRD_KINDS[kind](), sort_keys=False, width=120, allow_unicode=True)
