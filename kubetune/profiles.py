"""A FineTuneJob with its FineTuneProfile applied: the effective spec and the limits it breaks (pure).

    resolve(job spec, profile or None) -> Resolved(effective spec, [(field, message), ...])

Merge rules, in this order of precedence: the job, then the catalog model it names (spec.model.name),
then the profile's defaults.

- A job field wins unless the job leaves it at its built-in default (what `kubectl get -o yaml` shows
  for a field nobody wrote): the API server fills defaults in, so "left at the default" is all anyone
  can see of "not set", at apply time and in the operator alike. The image rule is the operator's
  default-image rule, generalised.
- Maps (node_selector, labels, affinity ...) merge by key, the job's value winning for a key.
- Lists in `pod` are appended, the job's after the profile's; other lists are values (the job's
  non-empty list replaces the default).
- Limits are never overridden: they are checked on the effective spec.

`kubetune validate/render/run --profile`, the operator and the admission policy all use these rules.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from kubetune.profile_spec import PROFILE_KIND, FineTuneProfile, _model_of
from kubetune.spec import API_VERSION, KIND, FineTuneJobSpec, PodSettings

PROFILE_VIOLATION = "ProfileViolation"


@dataclass
class Resolved:
    spec: FineTuneJobSpec | None  # the effective spec; None when it does not validate
    violations: list[tuple[str, str]] = field(default_factory=list)  # (field, message naming the profile)
    profile: str | None = None

    def message(self) -> str:
        return "; ".join(f"{f}: {m}" for f, m in self.violations)


# ---------------------------------------------------------------- merge


def _builtin(info: Any) -> Any:
    default = info.get_default(call_default_factory=True)
    return None if default is PydanticUndefined else default


def merge_defaults(model: type[BaseModel], job: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`job` (a JSON dump with built-in defaults) with `defaults` filling what it left at the default."""
    out = dict(job)
    for name, default in defaults.items():
        info = model.model_fields.get(name)
        mine = job.get(name)
        sub = _model_of(info.annotation) if info is not None else None
        if sub is not None and isinstance(default, dict) and (mine is None or isinstance(mine, dict)):
            out[name] = merge_defaults(sub, mine or {}, default)
        elif isinstance(default, dict) and isinstance(mine, dict):
            out[name] = {**default, **mine}
        elif mine is None or info is None or mine == _builtin(info):
            out[name] = default
    return out


def merge_pod(profile: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The pod block: lists appended (job after profile), maps by key, the job's scalars winning."""
    out = dict(profile)
    for name, mine in job.items():
        theirs = profile.get(name)
        if isinstance(mine, list) and isinstance(theirs, list):
            out[name] = theirs + mine
        elif isinstance(mine, dict) and isinstance(theirs, dict):
            out[name] = {**theirs, **mine}
        elif mine not in (None, [], {}):
            out[name] = mine
    return out


def _duplicates(pod: PodSettings) -> list[tuple[str, str]]:
    out = []
    for where, items, key in (
        ("volumes", pod.volumes, "name"),
        ("volume_mounts", pod.volume_mounts, "mountPath"),
    ):
        seen: set[str] = set()
        for item in items:
            if item.get(key) in seen:
                out.append(
                    (f"spec.pod.{where}", f"{key} {item[key]} appears twice (the profile's and the job's)")
                )
            seen.add(item.get(key))
    return out


# ---------------------------------------------------------------- limits


@dataclass(frozen=True)
class LimitRule:
    """One limit, stated once: `limit_violations` checks it here and kubetune.policy writes its CEL."""

    limit: str  # the field of FineTuneProfile spec.limits
    field: str  # the job field the message names
    kind: Literal["max", "allowed", "prefix"]
    reads: tuple[str, ...]  # spec paths of the effective values; a max of several bounds their product
    unit: str = ""
    # No value (None or ""): for "max", how it reads (it breaks the limit); else what it counts as (None: passes).
    unset: str | None = None


LIMIT_RULES: list[LimitRule] = [
    LimitRule("max_gpus_per_node", "spec.resources.gpus", "max", ("resources.gpus",), " GPUs per node"),
    LimitRule("max_nodes", "spec.parallel_config.nnodes", "max", ("parallel_config.nnodes",), " nodes"),
    LimitRule("max_total_gpus", "spec.resources.gpus", "max", ("resources.gpus", "parallel_config.nnodes"),
              " GPUs in all (gpus x nnodes)"),
    LimitRule("max_active_deadline_seconds", "spec.active_deadline_seconds", "max", ("active_deadline_seconds",),
              " seconds", unset="no deadline"),
    LimitRule("allowed_image_prefixes", "spec.image", "prefix", ("image",)),
    LimitRule("allowed_methods", "spec.method", "allowed", ("method",)),
    LimitRule("allowed_pet_types", "spec.pet_config.pet_type", "allowed", ("pet_config.pet_type",)),
    LimitRule("allowed_service_accounts", "spec.resources.service_account_name", "allowed",
              ("resources.service_account_name",), unset="default"),
    LimitRule("allowed_priority_classes", "spec.resources.priority_class_name", "allowed",
              ("resources.priority_class_name",)),
]  # fmt: skip


def rule_value(rule: LimitRule, spec: FineTuneJobSpec) -> Any:
    """The effective value a rule bounds; None when nothing is chosen (and `unset` says nothing else)."""
    values = []
    for path in rule.reads:
        value: Any = spec
        for part in path.split("."):
            value = getattr(value, part)
        if value is None or value == "":
            return None if rule.kind == "max" else rule.unset
        values.append(value)
    return math.prod(values) if len(values) > 1 else values[0]


def limit_message(rule: LimitRule, value: Any, limit: Any, profile: str) -> str:
    """The one wording of a broken limit (the admission policy's CEL builds the same string)."""
    if rule.kind == "max":
        shown = rule.unset if value is None else f"{value}{rule.unit}"
        return f"{shown} exceeds {rule.limit} {limit} of profile {profile}"
    return f"{value} is not allowed by profile {profile} ({rule.limit}: {', '.join(limit)})"


def _breaks(rule: LimitRule, value: Any, limit: Any) -> bool:
    if rule.kind == "max":
        return value is None or value > limit
    if value is None:
        return False  # nothing chosen (e.g. no priority class): the cluster's default applies
    if rule.kind == "prefix":
        return not any(str(value).startswith(p) for p in limit)
    return value not in limit


def limit_violations(spec: FineTuneJobSpec, profile: FineTuneProfile) -> list[tuple[str, str]]:
    limits = profile.spec.limits
    if limits is None:
        return []
    out = []
    for rule in LIMIT_RULES:
        limit = getattr(limits, rule.limit)
        if limit is None:
            continue
        value = rule_value(rule, spec)
        if _breaks(rule, value, limit):
            out.append((rule.field, limit_message(rule, value, limit, profile.name)))
    return out


# ---------------------------------------------------------------- choosing and applying a profile


def select_profile(
    requested: str | None, profiles: Iterable[FineTuneProfile]
) -> tuple[FineTuneProfile | None, str | None]:
    """(the profile a job uses, or None; a problem, or None): the one it names, else the default one."""
    profiles = list(profiles)
    if requested:
        found = next((p for p in profiles if p.name == requested), None)
        return (found, None) if found else (None, f"FineTuneProfile {requested} does not exist")
    defaults = sorted(p.name for p in profiles if p.is_default)
    if len(defaults) > 1:
        return (
            None,
            f"several FineTuneProfiles are marked default ({', '.join(defaults)}); name one in spec.profile",
        )
    return (next(p for p in profiles if p.name == defaults[0]), None) if defaults else (None, None)


def _validation_problems(spec: dict[str, Any], profile: str) -> list[tuple[str, str]]:
    from kubetune.validate import problems_of

    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "job"}, "spec": spec}
    return [(p.path, f"{p.message} (with profile {profile} applied)") for p in problems_of(doc, "job")]


def resolve(spec: FineTuneJobSpec, profile: FineTuneProfile | None) -> Resolved:
    """The effective spec of a job under `profile`, and every limit it breaks (see the module doc)."""
    if profile is None:
        if spec.model.uri is None:
            return Resolved(None, [("spec.model.name", f"{spec.model.name} needs a profile with a model catalog "
                                    "(spec.profile, or a default profile); none applies")])  # fmt: skip
        return Resolved(spec)
    name = profile.name
    merged = spec.model_dump(mode="json", exclude_none=True)
    violations: list[tuple[str, str]] = []
    if spec.model.name is not None:
        entry = profile.spec.models.get(spec.model.name)
        if entry is None:
            known = ", ".join(sorted(profile.spec.models)) or "none"
            violations.append(
                (
                    "spec.model.name",
                    f"{spec.model.name} is not in the models of profile {name} (known: {known})",
                )
            )
        else:
            merged = merge_defaults(FineTuneJobSpec, merged, entry.as_defaults())
    if profile.spec.defaults is not None:
        merged = merge_defaults(
            FineTuneJobSpec, merged, profile.spec.defaults.model_dump(mode="json", exclude_none=True)
        )
    if profile.spec.pod is not None:
        merged["pod"] = merge_pod(
            profile.spec.pod.model_dump(mode="json", exclude_none=True), merged.get("pod") or {}
        )
    merged["profile"] = name
    if violations:
        return Resolved(None, violations, name)
    try:
        effective = FineTuneJobSpec.model_validate(merged)
    except ValidationError:
        return Resolved(None, _validation_problems(merged, name), name)
    violations = (_duplicates(effective.pod) if effective.pod else []) + limit_violations(effective, profile)
    return Resolved(None if violations else effective, violations, name)


def spec_hash(spec: FineTuneJobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def choose(
    requested: str | None, objects: Iterable[dict[str, Any]]
) -> tuple[dict[str, Any] | None, str | None]:
    """(the status record of the profile a job uses, or None; a problem, or None), from the
    FineTuneProfile objects as the API server returns them."""
    parsed = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        try:
            doc = {
                "apiVersion": API_VERSION,
                "kind": PROFILE_KIND,
                "metadata": meta,
                "spec": obj.get("spec") or {},
            }
            parsed.append((FineTuneProfile.model_validate(doc), meta.get("resourceVersion")))
        except ValidationError as e:
            if meta.get("name") == requested:  # the one asked for is unreadable (a CRD older than this code)
                first = e.errors()[0]
                return (
                    None,
                    f"FineTuneProfile {requested}: {'.'.join(map(str, first['loc']))}: {first['msg']}",
                )
    chosen, problem = select_profile(requested, (p for p, _ in parsed))
    if chosen is None:
        return None, problem
    return record(chosen, next(rv for p, rv in parsed if p is chosen)), None


def record(profile: FineTuneProfile, resource_version: str | None) -> dict[str, Any]:
    """The snapshot of a profile kept in the job's status (FineTuneJobStatus.profile)."""
    return {
        "name": profile.name,
        "resourceVersion": resource_version,
        "spec": profile.spec.model_dump(mode="json", exclude_none=True),
    }


def from_record(rec: dict[str, Any]) -> FineTuneProfile:
    """The profile as snapshotted in a job's status."""
    return FineTuneProfile.model_validate(
        {
            "apiVersion": API_VERSION,
            "kind": PROFILE_KIND,
            "metadata": {"name": rec["name"]},
            "spec": rec.get("spec") or {},
        }
    )
