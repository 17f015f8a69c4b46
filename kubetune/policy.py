"""The ValidatingAdmissionPolicy that refuses a FineTuneJob over its profile's limits at `kubectl apply` (pure).

Generated from kubetune.profiles.LIMIT_RULES, the rules `kubetune validate` and the operator check, with
the same messages (`kubetune policy`, and `kubetune policy --helm` for the chart's template).

How it fits the API server:
- The binding selects every FineTuneProfile (paramRef.selector {}); the API server evaluates the policy
  once per profile, so each rule is guarded by `variables.checked`: this profile is the job's (the one
  in spec.profile, else the one annotated default) and a catalog model the job names is in it.
- The effective value of a field is computed in CEL with the merge rules of kubetune.profiles: the job's
  value unless it is the built-in default, else the catalog entry's, else the profile's defaults, else
  the built-in default (the API server has filled it in).
- An UPDATE is checked only when it changes a field the rules read: kopf's finalizers, Kueue's
  spec.suspend and the status go through even after a profile was tightened (a job keeps the profile
  it started with; the operator checks updates against that snapshot).
"""

from __future__ import annotations

import json
import typing
from typing import Any

import yaml

from kubetune import profile_spec as ps
from kubetune import spec as s
from kubetune.profiles import LIMIT_RULES, LimitRule, _builtin

POLICY_NAME = "kubetune-profile-limits"
_ENTRY = "params.spec.models[object.spec.model.name]"


def _lit(value: Any) -> str:
    return json.dumps(value)  # a JSON string or number is a CEL literal


def _has(root: str, path: str) -> str:
    parts = path.split(".")
    return " && ".join(f"has({root}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _field(path: str) -> tuple[str, Any, bool]:
    """(CEL type 'string' or 'int', built-in default, optional) of a spec path."""
    model: Any = s.FineTuneJobSpec
    for part in path.split("."):
        info = model.model_fields[part]
        model = ps._model_of(info.annotation) or info.annotation
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)] or [info.annotation]
    kind = "int" if args[0] is int else "string"  # str and Literal[...] of strings
    return kind, _builtin(info), type(None) in typing.get_args(info.annotation)


def _var(path: str) -> str:
    return path.replace(".", "_")


def _layers(path: str) -> list[tuple[str, str]]:
    """(presence, value) of each layer giving `path`, highest precedence first."""
    out = [(_has("object.spec", path), f"object.spec.{path}")]
    source = ps.catalog_source(path)
    if source is not None:
        out.append((f"variables.catalog && {_has(_ENTRY, source)}", f"{_ENTRY}.{source}"))
    out.append((_has("params", f"spec.defaults.{path}"), f"params.spec.defaults.{path}"))
    return out


def _effective(path: str) -> list[dict[str, str]]:
    """Variables holding the effective value of `path` (and, when optional, whether it is set)."""
    kind, builtin, optional = _field(path)
    layers = _layers(path)
    if optional:  # no built-in default: the first layer that has it; '' or 0 when none does
        expr = '""' if kind == "string" else "0"
        for present, value in reversed(layers):
            expr = f"({present}) ? {value} : ({expr})"
        out = [{"name": _var(path), "expression": expr}]
        if kind == "int":  # 0 may be a value: say whether there is one
            out.insert(
                0, {"name": f"{_var(path)}_set", "expression": " || ".join(f"({p})" for p, _ in layers)}
            )
        return out
    (job_has, job), *middle, (defaults_has, defaults) = layers
    expr = f"({defaults_has}) ? {defaults} : {_lit(builtin)}"
    for present, value in reversed([(job_has, job), *middle]):
        expr = f"({present} && {value} != {_lit(builtin)}) ? {value} : ({expr})"
    return [{"name": _var(path), "expression": expr}]


def _unset(path: str) -> str | None:
    """CEL for "no value" (None or ''), as rule_value reads it; None when the field always has one."""
    kind, _, optional = _field(path)
    if not optional:
        return None
    return f'variables.{_var(path)} == ""' if kind == "string" else f"!variables.{_var(path)}_set"


def _validation(rule: LimitRule) -> dict[str, str]:
    limit = f"params.spec.limits.{rule.limit}"
    value = " * ".join(f"variables.{_var(p)}" for p in rule.reads)
    unset = " || ".join(u for u in map(_unset, rule.reads) if u) or None
    name = "params.metadata.name"
    if rule.kind == "max":
        ok = (
            f"{value} <= {limit}" if unset is None else f"!({unset}) && {value} <= {limit}"
        )  # no value breaks it
        shown = f"string({value}) + {_lit(rule.unit)}"
        if unset is not None:
            shown = f"(({unset}) ? {_lit(rule.unset)} : {shown})"
        message = f'{shown} + " exceeds {rule.limit} " + string({limit}) + " of profile " + {name}'
    else:
        if unset is not None and rule.unset is not None:
            value = f"(({unset}) ? {_lit(rule.unset)} : {value})"
        test = f"{limit}.exists(p, {value}.startsWith(p))" if rule.kind == "prefix" else f"{value} in {limit}"
        ok = test if unset is None or rule.unset is not None else f"({unset}) || {test}"
        message = f'{value} + " is not allowed by profile " + {name} + " ({rule.limit}: " + {limit}.join(", ") + ")"'
    return {
        "expression": f"!variables.checked || !({_has('params', f'spec.limits.{rule.limit}')}) || ({ok})",
        "message": f"{rule.field} breaks {rule.limit} of the job's FineTuneProfile",
        "messageExpression": f"{_lit(rule.field + ': ')} + {message}",
    }


def _reads() -> list[str]:
    return list(dict.fromkeys(p for r in LIMIT_RULES for p in r.reads))


def _changed() -> str:
    """CEL: an UPDATE changes a top-level spec field the rules (or the choice of profile) read."""
    fields = dict.fromkeys(["profile", "model", *(p.split(".")[0] for p in _reads())])
    return " || ".join(
        f"has(object.spec.{f}) != has(oldObject.spec.{f}) || "
        f"(has(object.spec.{f}) && object.spec.{f} != oldObject.spec.{f})"
        for f in fields
    )


def variables() -> list[dict[str, str]]:
    annotation = _lit(ps.DEFAULT_PROFILE_ANNOTATION)
    out = [
        {
            "name": "applies",  # this profile is the job's: the one it names, else the default one
            "expression": "has(object.spec.profile) ? object.spec.profile == params.metadata.name : "
            f"(has(params.metadata.annotations) && {annotation} in params.metadata.annotations && "
            f'params.metadata.annotations[{annotation}] == "true")',
        },
        {
            "name": "catalog",  # the job names a catalog model of this profile
            "expression": "has(object.spec.model.name) && has(params.spec) && has(params.spec.models) && "
            "object.spec.model.name in params.spec.models",
        },
        {
            "name": "checked",
            "expression": "variables.applies && (!has(object.spec.model.name) || variables.catalog)",
        },
    ]
    for path in _reads():
        out += _effective(path)
    return out


def validations() -> list[dict[str, str]]:
    catalog = {
        "expression": "!variables.applies || !has(object.spec.model.name) || variables.catalog",
        "message": "spec.model.name is not in the models of the job's FineTuneProfile",
        "messageExpression": '"spec.model.name: " + object.spec.model.name + " is not in the models of profile " + '
        "params.metadata.name",
    }
    return [catalog, *map(_validation, LIMIT_RULES)]


def build_policy(name: str = POLICY_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": s.API_VERSION, "kind": ps.PROFILE_KIND},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [s.GROUP],
                        "apiVersions": [s.VERSION],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [s.PLURAL],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "limited-fields-change",
                    "expression": f'request.operation == "CREATE" || {_changed()}',
                }
            ],
            "variables": variables(),
            "validations": validations(),
        },
    }


def build_binding(name: str = POLICY_NAME, policy: str = POLICY_NAME) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": policy,
            # Every profile; `variables.checked` keeps the job's own. None at all: nothing to limit.
            "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
            "validationActions": ["Deny"],
        },
    }


_NAME, _LABELS = "@@name@@", "@@labels@@"
HELM_NAME = '{{ include "kubetune.fullname" . }}-profile-limits'


def render_policy_yaml(helm: bool = False) -> str:
    """The policy and its binding as YAML; `helm`: the chart's template (release name, labels, a switch)."""
    if not helm:
        header = "# Generated by `kubetune policy` from kubetune/profiles.py.\n"
        docs = [build_policy(), build_binding()]
        return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in docs)
    docs = []
    for doc in (build_policy(_NAME), build_binding(_NAME, _NAME)):
        doc["metadata"]["labels"] = _LABELS
        docs.append(yaml.safe_dump(doc, sort_keys=False, width=120))
    text = "---\n".join(docs)
    text = text.replace(f"labels: '{_LABELS}'", 'labels:\n    {{- include "kubetune.labels" . | nindent 4 }}')
    text = text.replace(f"'{_NAME}'", HELM_NAME)
    return (
        "{{- /* Generated by `kubetune policy --helm` from kubetune/profiles.py. Do not edit by hand. */}}\n"
        "{{- if .Values.admissionPolicy.enabled }}\n" + text + "{{- end }}\n"
    )
