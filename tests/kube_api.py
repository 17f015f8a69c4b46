"""A Kubernetes API server for tests: kmock's KubernetesEmulator plus what a real API server does.

kmock (by kopf's author) serves the HTTP API, discovery and watch streams. This subclass adds
what a real kube-apiserver does and kmock does not, so that kopf, the `kubernetes` client and
kubectl see what they would see on a cluster:

- metadata: uid, resourceVersion (one global counter, bumped on every write), generation (bumped
  on spec changes only: never for metadata or status), creationTimestamp, namespace from the URL,
  generateName, apiVersion/kind filled in; a write that changes nothing changes nothing;
- HTTP semantics: 201 on create, 409 AlreadyExists, 404 NotFound, 409 Conflict on a stale
  resourceVersion (PUT, merge patch, delete preconditions), JSON patch (`test` op -> 422), merge
  patch, PUT, `dryRun=All`, Status bodies shaped like the real ones;
- the status subresource: writes to the object ignore status, writes to /status change only status;
- label selectors (=, ==, !=, in, notin, exists, !exists) and field selectors (dotted paths, = / !=)
  on list and watch; watch from a resourceVersion replays the events after it (410 when too old),
  ADDED/DELETED when an object enters or leaves a selector, `timeoutSeconds`;
- deletion: finalizers (deletionTimestamp until they are gone), graceful deletion of pods bound to
  a node (deletionTimestamp is the end of the grace period; the kubelet finishes it),
  pods/binding and pods/eviction, and garbage collection of
  dependents by ownerReferences uid (background and orphan; foreground is done as background),
  including dependents created after their owner was gone;
- CustomResourceDefinitions: creating one serves its resource; objects of it are admitted like the
  real server does: unknown fields pruned (or 400 with fieldValidation=Strict), schema defaults
  applied, the openAPIV3Schema validated (jsonschema Draft 4) and the CEL x-kubernetes-validations
  evaluated (cel-python, transition rules with oldSelf on update), 422 naming each field;
  `kubectl get` gets a Table with the CRD's printer columns; just enough OpenAPI v3 for kubectl to
  leave field validation to the server.

- mutating admission of pods: `pod_webhooks` (tests/kueue.py installs Kueue's, which gates pods);
- ValidatingAdmissionPolicies in `admission_policies`, bound to every param (tests/policy_admission.py);

Not done (not needed by kubetune's tests): strategic merge patch is treated as a merge patch,
server-side apply, deletecollection, namespace existence checks, admission of built-in kinds.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime as dt
import json
import logging
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonschema
import kmock
import yaml

from tests import crd_admission

CORE = ""
logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per request drowns test output
KEEP_EVENTS = 50_000  # watch history; older resourceVersions get 410 Gone


def now_iso(later: float = 0) -> str:
    when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=later)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """A failure the API server reports as a Status object."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def body(self) -> dict[str, Any]:
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": self.details, "code": self.code,
        }  # fmt: skip


@dataclass
class Call:
    """One API request, as the emulator needs it (from kmock's parsed Request)."""

    method: str
    resource: kmock.resource
    namespace: str | None
    name: str | None
    subresource: str | None
    params: dict[str, str]
    headers: dict[str, str]
    data: Any


@dataclass
class Kind:
    """What the server knows of a resource: names, scope, and for custom resources the schema."""

    kind: str
    namespaced: bool
    status_subresource: bool
    schema: dict | None = None  # openAPIV3Schema of a custom resource
    validator: jsonschema.Draft4Validator | None = None  # built once from the schema
    group: str = ""
    singular: str = ""
    columns: list[dict] = field(default_factory=list)  # additionalPrinterColumns of a custom resource

    def list_kind(self) -> str:
        return f"{self.kind}List"


@dataclass
class Event:
    rv: int
    resource: kmock.resource
    type: str
    obj: dict
    old: dict | None = None


# ---------------------------------------------------------------- selectors

_REQ = re.compile(r"^\s*(!)?\s*([\w./-]+)\s*(?:(==|=|!=|\s+in\s+|\s+notin\s+)\s*(\(.*?\)|[\w./-]*))?\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p.strip()]


def label_matcher(selector: str | None) -> Callable[[dict], bool]:
    """A predicate over label dicts for a Kubernetes label selector string."""
    checks: list[Callable[[dict], bool]] = []
    for req in _split_selector(selector or ""):
        m = _REQ.match(req)
        if not m:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {req!r}")
        neg, key, op, val = m.groups()
        op = (op or "").strip()
        if neg:
            checks.append(lambda labels, k=key: k not in labels)
        elif not op:
            checks.append(lambda labels, k=key: k in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=val: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=val: labels.get(k) != v)
        else:
            values = {v.strip() for v in val.strip("()").split(",")}
            if op == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
    return lambda labels: all(check(labels) for check in checks)


def field_matcher(selector: str | None) -> Callable[[dict], bool]:
    """A predicate over objects for a field selector (`metadata.name=x,status.phase!=Failed`)."""
    checks = []
    for req in _split_selector(selector or ""):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", req)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {req!r}")
        path, op, val = m.groups()
        checks.append((path.split("."), op == "!=", val))

    def get(obj: Any, path: list[str]) -> str:
        for part in path:
            obj = obj.get(part) if isinstance(obj, dict) else None
        return "" if obj is None else str(obj)

    return lambda obj: all((get(obj, p) == v) != neg for p, neg, v in checks)


# ---------------------------------------------------------------- custom resource admission


def _go_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


def _json_type(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), "null")


def _at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _schema_cause(e: jsonschema.ValidationError) -> tuple[str, str, str]:
    """(reason, field, message) for one schema error, worded like the API server's."""
    fld = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
    v, val, inst = e.validator, e.validator_value, e.instance
    if v == "required":
        missing = next((p for p in val if p not in inst), val[0])
        return "FieldValueRequired", f"{fld}.{missing}".lstrip("."), "Required value"
    if v == "enum":
        supported = ", ".join(json.dumps(x) for x in val)
        return (
            "FieldValueNotSupported",
            fld,
            f"Unsupported value: {_go_value(inst)}: supported values: {supported}",
        )
    if v == "type":
        t = _json_type(inst)
        return (
            "FieldValueTypeInvalid",
            fld,
            f'Invalid value: "{t}": {fld} in body must be of type {val}: "{t}"',
        )
    if v in ("maxLength", "maxItems", "maxProperties"):
        if v == "maxLength":
            return "FieldValueTooLong", fld, f"Too long: may not be more than {val} bytes"
        return "FieldValueTooMany", fld, f"Too many: {len(inst)}: must have at most {val} items"
    words = {
        "minimum": f"should be greater than{'' if e.schema.get('exclusiveMinimum') else ' or equal to'} {val}",
        "maximum": f"should be less than{'' if e.schema.get('exclusiveMaximum') else ' or equal to'} {val}",
        "pattern": f"should match '{val}'",
        "minLength": f"should be at least {val} chars long",
        "minItems": f"should have at least {val} items",
    }
    detail = f"{fld} in body {words[v]}" if v in words else e.message
    return "FieldValueInvalid", fld, f"Invalid value: {_go_value(inst)}: {detail}"


def prune(node: dict, value: Any, path: str, unknown: list[str]) -> Any:
    """Drop fields the structural schema does not declare (recording their paths), as the server does."""
    if isinstance(value, dict):
        props = node.get("properties")
        keep = node.get("x-kubernetes-preserve-unknown-fields", False)
        if props is not None:
            out = {}
            for k, v in value.items():
                if k in props:
                    out[k] = prune(props[k], v, f"{path}.{k}", unknown)
                elif keep:
                    out[k] = v
                else:
                    unknown.append(f"{path}.{k}".lstrip("."))
            return out
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return {k: prune(extra, v, f"{path}.{k}", unknown) for k, v in value.items()}
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [prune(node["items"], v, f"{path}[{i}]", unknown) for i, v in enumerate(value)]
    return value


def _cel_problems(schema: dict, obj: dict, old: dict | None) -> list[str]:
    """CEL rule failures. On update only changed top-level fields are evaluated: the API server's
    validation ratcheting ignores failures on unchanged values, and cel-python is slow (~1 ms a rule)."""
    if old is None:
        return crd_admission.cel_errors(obj, old, schema)
    # The root's own rules (metadata.name) every time, without descending: the fields follow.
    root = {"x-kubernetes-validations": schema.get("x-kubernetes-validations", [])}
    out = crd_admission.cel_errors(obj, old, root)
    for key, node in (schema.get("properties") or {}).items():
        if key in obj and obj[key] != old.get(key):
            out += crd_admission.cel_errors(obj[key], old.get(key), node, f".{key}")
    return [p.lstrip(".") for p in out]


def admit_custom(kind: Kind, obj: dict, old: dict | None, strict: bool) -> tuple[dict, list[str]]:
    """Prune, default and validate a custom resource; returns (object to store, warnings)."""
    schema = kind.schema or {}
    unknown: list[str] = []
    meta = obj.get("metadata", {})
    obj = {**prune(schema, {k: v for k, v in obj.items() if k != "metadata"}, "", unknown), "metadata": meta}
    if unknown and strict:
        raise ApiError(
            400, "BadRequest", "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown)
        )
    obj = crd_admission.apply_defaults(schema, obj)
    if kind.validator is None:
        kind.validator = jsonschema.Draft4Validator(crd_admission._json_schema(schema))
    validator = kind.validator
    causes = [
        _schema_cause(e) for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    ]
    if not causes:
        for problem in _cel_problems(schema, obj, old):
            fld, _, message = problem.partition(": ")
            shown = _json_type(_at(obj, fld)) if _at(obj, fld) is not None else "object"
            causes.append(("FieldValueInvalid", fld, f'Invalid value: "{shown}": {message}'))
    if causes:
        name = meta.get("name", "")
        texts = [f"{f}: {m}" for _, f, m in causes]
        joined = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
        raise ApiError(
            422, "Invalid", f'{kind.kind}.{kind.group} "{name}" is invalid: {joined}',
            {"name": name, "group": kind.group, "kind": kind.kind,
             "causes": [{"reason": r, "message": m, "field": f} for r, f, m in causes]},
        )  # fmt: skip
    return obj, [f'unknown field "{u}"' for u in unknown]


# ---------------------------------------------------------------- the server


def _res(group: str, version: str, plural: str) -> kmock.resource:
    return kmock.resource(group, version, plural)


def _qualified(resource: kmock.resource) -> str:
    """`pods` or `finetunejobs.kubetune.io`, as the server's messages name a resource."""
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


NAMESPACES = _res(CORE, "v1", "namespaces")
PODS = _res(CORE, "v1", "pods")
CRDS = _res("apiextensions.k8s.io", "v1", "customresourcedefinitions")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?(?:/(status|finalize))?/?$")


@attrs.define(kw_only=True)
class KubeAPI(kmock.KubernetesEmulator):
    """kmock's emulator with a real API server's semantics (see the module docstring)."""

    _store: dict[kmock.resource, dict[tuple[str | None, str], dict]] = attrs.field(factory=dict, init=False)
    _kinds: dict[kmock.resource, Kind] = attrs.field(factory=dict, init=False)
    _log: list[Event] = attrs.field(factory=list, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _first_rv: int = attrs.field(default=0, init=False)  # watches from before this get 410
    _tick: asyncio.Event | None = attrs.field(default=None, init=False)  # set on the next write
    _tick_loop: asyncio.AbstractEventLoop | None = attrs.field(default=None, init=False)
    mutex: threading.RLock = attrs.field(factory=threading.RLock, init=False)
    # Mutating admission for new pods, run in order on the object before it is stored.
    pod_webhooks: list[Callable[[dict], None]] = attrs.field(factory=list, init=False)
    # ValidatingAdmissionPolicies, each bound to every object of its paramKind (paramRef.selector {}).
    admission_policies: list[dict] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Watch streams are JSON lines; client-go refuses kmock's default application/octet-stream.
        (
            (self.fallback**1)[kmock.action.WATCH]
            << kmock.headers({"Content-Type": "application/json"})
            << self._serve_watch
        )
        # The built-in kinds of a recent cluster, for discovery (kmock's bundle; its load_bundled() warns).
        self.resources.load_path(Path(kmock.__file__).parent / "_internal" / "resources.json.gz")
        for res in list(self.resources):
            info = self.resources[res]
            self._kinds[res] = Kind(
                kind=info.kind or "", namespaced=bool(info.namespaced),
                status_subresource="status" in info.subresources, group=res.group or "",
                singular=info.singular or "",
            )  # fmt: skip
        for ns in ("default", "kube-system"):
            self._put_new(
                NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            )

    # ------------------------------------------------------------ entry points

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw.path.startswith("/openapi/v3"):
            return aiohttp.web.json_response(self._openapi_v3(raw.path[len("/openapi/v3") :].strip("/")))
        # kmock cannot parse /api/v1/namespaces[/name] (it reads "namespaces" as a namespace prefix).
        m = _NAMESPACES_PATH.match(raw.path)
        if m and not (raw.method == "GET" and raw.query.get("watch") in ("true", "1")):
            data = await raw.json() if raw.can_read_body else None
            call = Call(
                raw.method, NAMESPACES, None, m.group(1), m.group(2), dict(raw.query), dict(raw.headers), data
            )
            return self._respond(call)
        return await super().__call__(raw)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or res.plural is None or request.action == kmock.action.WATCH:
            return await super()._handle(request)  # discovery; watch streams via _serve_watch below
        call = Call(
            str(request.method.value), res, request.namespace, request.name, request.subresource,
            dict(request.params), dict(request.headers), request.data,
        )  # fmt: skip
        return self._respond(call)

    async def _serve_version(self, request: kmock.Request) -> Any:
        doc = await super()._serve_version(request)
        for entry in doc["resources"]:  # kmock gives subresources their parent's names; the server does not
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], singularName="", verbs=["get", "patch", "update"])
        return doc

    def _openapi_v3(self, group_version: str) -> dict:
        """Just enough OpenAPI v3 for kubectl to see that the server validates fields itself."""
        with self.mutex:
            kinds = list(self._kinds.items())
        if not group_version:
            gvs = {f"apis/{r.group}/{r.version}" if r.group else f"api/{r.version}" for r, _ in kinds}
            return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}"} for gv in sorted(gvs)}}
        param = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
        paths = {}
        for r, kind in kinds:
            if (f"apis/{r.group}/{r.version}" if r.group else f"api/{r.version}") != group_version:
                continue
            gvk = {"group": r.group, "version": r.version, "kind": kind.kind}
            scope = "namespaces/{namespace}/" if kind.namespaced else ""
            paths[f"/{group_version}/{scope}{r.plural}/{{name}}"] = {
                verb: {"x-kubernetes-group-version-kind": gvk, "parameters": [param], "responses": {}}
                for verb in ("patch", "put")
            }
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths}

    def _respond(self, call: Call) -> aiohttp.web.StreamResponse:
        try:
            with self.mutex:
                code, body, warnings = self._serve(call)
        except ApiError as e:
            return aiohttp.web.json_response(e.body(), status=e.code)
        headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
        return aiohttp.web.json_response(body, status=code, headers=headers)

    def _serve(self, c: Call) -> tuple[int, Any, list[str]]:
        kind = self._kinds.get(c.resource)
        if kind is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not kind.namespaced:
            c.namespace = None
        as_table = "as=Table" in c.headers.get("Accept", "") and kind.columns
        if c.method == "GET" and c.name:
            obj = self._existing(c, kind)
            return 200, table(kind, [obj], obj["metadata"]["resourceVersion"]) if as_table else obj, []
        if c.method == "GET":
            listing = self.list_objects(c.resource, c.namespace, c.params)
            return (
                200,
                table(kind, listing["items"], listing["metadata"]["resourceVersion"])
                if as_table
                else listing,
                [],
            )
        if c.method == "POST" and c.name and c.subresource in ("binding", "eviction") and c.resource == PODS:
            return self._pod_subresource(c, kind)
        if c.method == "POST" and not c.name:
            return self._create(c, kind)
        if c.method in ("PATCH", "PUT") and c.name:
            return self._update(c, kind)
        if c.method == "DELETE" and c.name:
            return 200, self._delete(c.resource, c.namespace, c.name, self._delete_options(c)), []
        raise ApiError(405, "MethodNotAllowed", f"{c.method} is not supported here")

    # ------------------------------------------------------------ reading

    def _existing(self, c: Call, kind: Kind) -> dict:
        obj = self._store.get(c.resource, {}).get((c.namespace, c.name or ""))
        if obj is None:
            raise ApiError(404, "NotFound", f'{_qualified(c.resource)} "{c.name}" not found',
                           {"name": c.name, "group": kind.group, "kind": c.resource.plural})  # fmt: skip
        return obj

    def get_object(self, resource: kmock.resource, namespace: str | None, name: str) -> dict | None:
        """The stored object (for tests), or None."""
        with self.mutex:
            return copy.deepcopy(self._store.get(resource, {}).get((namespace, name)))

    def objects(
        self, resource: kmock.resource, namespace: str | None = None, labels: str | None = None
    ) -> list[dict]:
        """Stored objects of a resource (for tests), optionally in one namespace and by label selector."""
        with self.mutex:
            return copy.deepcopy(
                self.list_objects(resource, namespace, {"labelSelector": labels or ""})["items"]
            )

    def _matcher(self, params: dict[str, str], name: str | None = None) -> Callable[[dict], bool]:
        labels = label_matcher(params.get("labelSelector"))
        fields = field_matcher(params.get("fieldSelector"))
        return lambda o: (
            labels(o["metadata"].get("labels") or {})
            and fields(o)
            and (name is None or o["metadata"]["name"] == name)
        )

    def list_objects(self, resource: kmock.resource, namespace: str | None, params: dict[str, str]) -> dict:
        match = self._matcher(params)
        kind = self._kinds[resource]
        items = [
            o for (ns, _), o in sorted(self._store.get(resource, {}).items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
            if (namespace is None or ns == namespace) and match(o)
        ]  # fmt: skip
        api_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        return {"apiVersion": api_version, "kind": kind.list_kind(), "metadata": {"resourceVersion": str(self._rv)},
                "items": items}  # fmt: skip

    async def _serve_watch(self, request: kmock.Request) -> Any:
        """Watch events after `resourceVersion` (or the current objects as ADDED, then what follows)."""
        yield b""  # start streaming now
        params = dict(request.params)
        resource = request.resource
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params.get("timeoutSeconds") or 1800)
        namespace = request.namespace if self._kinds[resource].namespaced else None
        match = self._matcher(params, request.name)

        def in_scope(o: dict | None) -> bool:
            return (
                o is not None
                and (namespace is None or o["metadata"].get("namespace") == namespace)
                and match(o)
            )

        since_text = params.get("resourceVersion") or "0"
        with self.mutex:
            since = int(since_text) if since_text.isdigit() else 0
            if since == 0:
                since = self._rv
                initial = [o for o in self.list_objects(resource, namespace, params)["items"] if match(o)]
            elif since < self._first_rv:
                initial = None
            else:
                initial = []
        if initial is None:
            yield {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": f"too old resource version: {since} ({self._first_rv})", "reason": "Expired", "code": 410}}  # fmt: skip
            return
        for obj in initial:
            yield {"type": "ADDED", "object": obj}
        while True:
            with self.mutex:
                start = bisect.bisect_right(self._log, since, key=lambda e: e.rv)
                events = self._log[start:]
                tick = self._ticker()
            for ev in events:
                since = ev.rv
                if ev.resource != resource:
                    continue
                now_in, was_in = in_scope(ev.obj), in_scope(ev.old)
                if ev.type == "MODIFIED" and now_in != was_in:
                    yield {"type": "ADDED" if now_in else "DELETED", "object": ev.obj}
                elif now_in or (ev.type == "DELETED" and was_in):
                    yield {"type": ev.type, "object": ev.obj}
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(tick.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _ticker(self) -> asyncio.Event:
        if self._tick is None:
            self._tick = asyncio.Event()
            self._tick_loop = asyncio.get_running_loop()
        return self._tick

    # ------------------------------------------------------------ writing

    def _record(self, resource: kmock.resource, etype: str, obj: dict, old: dict | None) -> None:
        self._log.append(Event(self._rv, resource, etype, obj, old))
        if len(self._log) > 2 * KEEP_EVENTS:
            del self._log[:KEEP_EVENTS]
            self._first_rv = self._log[0].rv - 1
        if self._tick is not None:
            tick, self._tick = self._tick, None
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is self._tick_loop:
                tick.set()
            elif self._tick_loop is not None:
                self._tick_loop.call_soon_threadsafe(tick.set)

    def _bump(self, obj: dict) -> dict:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        return obj

    def _put_new(self, resource: kmock.resource, namespace: str | None, obj: dict) -> dict:
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_iso())
        if namespace is not None:
            meta["namespace"] = namespace
        if "spec" in obj or self._kinds[resource].schema is not None:
            meta["generation"] = 1
        self._bump(obj)
        self._store.setdefault(resource, {})[(namespace, meta["name"])] = obj
        self._record(resource, "ADDED", obj, None)
        return obj

    def _create(self, c: Call, kind: Kind) -> tuple[int, dict, list[str]]:
        obj = copy.deepcopy(c.data)
        if not isinstance(obj, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        api_version = f"{c.resource.group}/{c.resource.version}" if c.resource.group else c.resource.version
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind.kind)
        if (obj["apiVersion"], obj["kind"]) != (api_version, kind.kind):
            raise ApiError(400, "BadRequest", f"the API version in the data ({obj['apiVersion']}) does not match "
                           f"the expected API version ({api_version}) or kind ({obj['kind']} != {kind.kind})")  # fmt: skip
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            c.namespace = c.namespace or meta.get("namespace") or "default"
            if meta.get("namespace") not in (None, c.namespace):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                               "sent on the request")  # fmt: skip
        else:
            meta.pop("namespace", None)
        for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation"):
            meta.pop(key, None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
        name = meta.get("name") or ""
        if not name or not _NAME.match(name) or len(name) > 253:
            self._invalid(kind, name, "metadata.name", "Required value: name or generateName is required" if not name
                          else f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                          "alphanumeric characters, '-' or '.'")  # fmt: skip
        if (c.namespace, name) in self._store.get(c.resource, {}):
            raise ApiError(409, "AlreadyExists", f'{_qualified(c.resource)} "{name}" already exists',
                           {"name": name, "group": kind.group, "kind": c.resource.plural})  # fmt: skip
        if kind.status_subresource:
            obj.pop("status", None)
        if c.resource == PODS:
            obj["status"] = {"phase": "Pending", "qosClass": "Burstable"}
            for mutate in self.pod_webhooks:  # mutating admission webhooks (Kueue's pod webhook)
                mutate(obj)
        warnings: list[str] = []
        if kind.schema is not None:
            obj, warnings = admit_custom(kind, obj, None, c.params.get("fieldValidation") == "Strict")
        self._validating_policies(c, kind, obj, None)
        if c.params.get("dryRun") == "All":
            return 201, obj, warnings
        obj = self._put_new(c.resource, c.namespace, obj)
        if c.resource == CRDS:
            self._serve_crd(obj)
        self._collect_if_orphaned(c.resource, obj)
        return 201, obj, warnings

    def _validating_policies(self, c: Call, kind: Kind, obj: dict, old: dict | None) -> None:
        """Refuse like the API server when a ValidatingAdmissionPolicy denies (naming the first denial)."""
        from tests import policy_admission

        operation = "UPDATE" if old is not None else "CREATE"
        for policy in self.admission_policies:
            rules = policy["spec"]["matchConstraints"]["resourceRules"]
            if not any(c.resource.group in r["apiGroups"] and c.resource.plural in r["resources"]
                       and operation in r["operations"] for r in rules):  # fmt: skip
                continue
            wanted = policy["spec"]["paramKind"]
            params = [o for res, k in self._kinds.items() if k.kind == wanted["kind"]
                      for o in self._store.get(res, {}).values()]  # fmt: skip
            denied = policy_admission.denials(policy, obj, params, old)
            if denied:  # the API server names the first denial; reason Invalid: 422, the text as a cause
                name, job = policy["metadata"]["name"], obj["metadata"].get("name", "")
                text = f"ValidatingAdmissionPolicy '{name}' with binding '{name}' denied request: {denied[0]}"
                raise ApiError(
                    422, "Invalid", f'{_qualified(c.resource)} "{job}" is forbidden: {text}',
                    {"name": job, "group": kind.group, "kind": c.resource.plural, "causes": [{"message": text}]},
                )  # fmt: skip

    def _invalid(self, kind: Kind, name: str, fld: str, message: str) -> None:
        raise ApiError(
            422, "Invalid", f'{kind.kind}{"." + kind.group if kind.group else ""} "{name}" is invalid: {fld}: {message}',
            {"name": name, "group": kind.group, "kind": kind.kind,
             "causes": [{"reason": "FieldValueInvalid", "message": message, "field": fld}]},
        )  # fmt: skip

    def _update(self, c: Call, kind: Kind) -> tuple[int, dict, list[str]]:
        old = self._existing(c, kind)
        ctype = c.headers.get("Content-Type", "application/json").split(";")[0]
        if c.method == "PUT":
            new = copy.deepcopy(c.data)
        elif ctype == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, c.data)
            except jsonpatch.JsonPatchTestFailed as e:
                raise ApiError(
                    422, "Invalid", f"the server rejected our request due to an error in our request: {e}"
                ) from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", f"the server could not apply the JSON patch: {e}") from None
        elif ctype == "application/merge-patch+json" or (
            ctype == "application/strategic-merge-patch+json" and kind.schema is None
        ):  # strategic merge patch works on built-in kinds only; it is treated as a merge patch here
            new = merge_patch(old, c.data)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media "
                "types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            )
        if not isinstance(new, dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a JSON object")
        new = copy.deepcopy(new)  # a merge patch shares untouched subtrees with the stored object
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if sent_rv not in (None, "", old["metadata"]["resourceVersion"]) and (
            c.method == "PUT" or ctype != "application/json-patch+json"
        ):
            raise self._conflict(c, kind)
        new.setdefault("metadata", {})
        if c.subresource == "status":
            new = {**copy.deepcopy(old), "status": new.get("status")}
            if new["status"] is None:
                del new["status"]
        elif c.subresource:
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({c.subresource})"
            )
        else:
            if kind.status_subresource:
                new = {k: v for k, v in new.items() if k != "status"}
                if "status" in old:
                    new["status"] = old["status"]
            meta = new["metadata"]
            for key in ("uid", "name", "namespace", "creationTimestamp", "deletionTimestamp", "generation"):
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        warnings: list[str] = []
        if kind.schema is not None:
            new, warnings = admit_custom(kind, new, old, c.params.get("fieldValidation") == "Strict")
        if not c.subresource:
            self._validating_policies(c, kind, new, old)
        if new == old or c.params.get("dryRun") == "All":
            return 200, new, warnings
        if "generation" in old["metadata"]:
            ignored = ("metadata", "status") if kind.status_subresource else ("metadata",)
            changed = {k: v for k, v in new.items() if k not in ignored} != {
                k: v for k, v in old.items() if k not in ignored
            }
            new["metadata"]["generation"] = old["metadata"]["generation"] + changed
        self._replace(c.resource, old, new)
        return 200, new, warnings

    def _conflict(self, c: Call, kind: Kind) -> ApiError:
        what = f'{_qualified(c.resource)} "{c.name}"'
        return ApiError(409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been modified; "
                        "please apply your changes to the latest version and try again",
                        {"name": c.name, "group": kind.group, "kind": c.resource.plural})  # fmt: skip

    def _replace(self, resource: kmock.resource, old: dict, new: dict) -> None:
        meta = new["metadata"]
        key = (meta.get("namespace"), meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._cascade(self._remove(resource, key, new), None)
            return
        self._store[resource][key] = self._bump(new)
        self._record(resource, "MODIFIED", new, old)

    # ------------------------------------------------------------ deleting

    def _delete_options(self, c: Call) -> dict:
        opts = dict(c.data) if isinstance(c.data, dict) else {}
        for key in ("propagationPolicy", "gracePeriodSeconds", "dryRun"):
            if key in c.params:
                opts[key] = c.params[key]
        return opts

    def _delete(self, resource: kmock.resource, namespace: str | None, name: str, opts: dict) -> dict:
        kind = self._kinds[resource]
        c = Call("DELETE", resource, namespace, name, None, {}, {}, None)
        obj = self._existing(c, kind)
        pre = opts.get("preconditions") or {}
        if any(pre.get(k) not in (None, obj["metadata"].get(k)) for k in ("uid", "resourceVersion")):
            raise self._conflict(c, kind)
        if opts.get("dryRun") in ("All", ["All"]):
            return obj
        meta = obj["metadata"]
        grace = opts.get("gracePeriodSeconds")
        graceful = (
            resource == PODS and (obj.get("spec") or {}).get("nodeName")
            and (obj.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and str(grace) != "0"
        )  # fmt: skip
        if meta.get("finalizers") or (graceful and not meta.get("deletionTimestamp")):
            if meta.get("deletionTimestamp"):
                return obj
            new = copy.deepcopy(obj)
            new["metadata"]["deletionTimestamp"] = now_iso()
            if graceful:
                seconds = int(
                    grace if grace is not None else obj["spec"].get("terminationGracePeriodSeconds", 30)
                )
                new["metadata"]["deletionGracePeriodSeconds"] = seconds
                # the server sets deletionTimestamp to when the grace period ends, not to now
                new["metadata"]["deletionTimestamp"] = now_iso(seconds)
            self._store[resource][(namespace, name)] = self._bump(new)
            self._record(resource, "MODIFIED", new, obj)
            self._cascade(new, opts.get("propagationPolicy"))
            return new
        if graceful and meta.get("deletionTimestamp") is not None and str(grace) != "0":
            return obj  # already terminating; the kubelet finishes it
        removed = self._remove(resource, (namespace, name), copy.deepcopy(obj))
        self._cascade(removed, opts.get("propagationPolicy"))
        return removed

    def _remove(self, resource: kmock.resource, key: tuple[str | None, str], last: dict) -> dict:
        old = self._store[resource].pop(key)
        self._bump(last)
        self._record(resource, "DELETED", last, old)
        if resource == CRDS:
            for version in last["spec"]["versions"]:
                res = _res(last["spec"]["group"], version["name"], last["spec"]["names"]["plural"])
                self._kinds.pop(res, None)
                self.resources.pop(res, None)
        return last

    def _dependents(self, uid: str) -> Iterator[tuple[kmock.resource, dict]]:
        for resource, objs in list(self._store.items()):
            for obj in list(objs.values()):
                if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or []):
                    yield resource, obj

    def _cascade(self, owner: dict, policy: str | None) -> None:
        """The garbage collector: delete (or orphan) what the deleted object owned."""
        uid = owner["metadata"]["uid"]
        if policy == "Orphan":
            for resource, obj in list(self._dependents(uid)):
                new = copy.deepcopy(obj)
                new["metadata"]["ownerReferences"] = [
                    r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid
                ]
                self._replace(resource, obj, new)
            return
        if owner["metadata"].get("finalizers"):
            return  # not gone yet: its dependents go when it does
        for resource, obj in list(self._dependents(uid)):
            if not obj["metadata"].get("deletionTimestamp"):
                self._delete(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"], {})

    def _collect_if_orphaned(self, resource: kmock.resource, obj: dict) -> None:
        """The garbage collector deletes dependents whose every owner is gone (by uid)."""
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs:
            return
        alive = {o["metadata"]["uid"] for objs in self._store.values() for o in objs.values()}
        if not any(ref.get("uid") in alive for ref in refs):
            self._delete(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"], {})

    # ------------------------------------------------------------ pods and CRDs

    def _pod_subresource(self, c: Call, kind: Kind) -> tuple[int, dict, list[str]]:
        pod = self._existing(c, kind)
        body = c.data if isinstance(c.data, dict) else {}
        if c.subresource == "binding":
            if (pod.get("spec") or {}).get("nodeName"):
                raise ApiError(
                    409, "Conflict", f'pod {c.name} is already assigned to node "{pod["spec"]["nodeName"]}"'
                )
            new = copy.deepcopy(pod)
            new["spec"]["nodeName"] = (body.get("target") or {}).get("name", "node")
            self._replace(PODS, pod, new)
        else:  # eviction: the pod gets a DisruptionTarget condition, then a graceful delete
            new = copy.deepcopy(pod)
            conditions = [
                x for x in (new.get("status") or {}).get("conditions", []) if x["type"] != "DisruptionTarget"
            ]
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                               "message": "Eviction API: evicting", "lastTransitionTime": now_iso()})  # fmt: skip
            new.setdefault("status", {})["conditions"] = conditions
            self._replace(PODS, pod, new)
            self._delete(PODS, c.namespace, c.name or "", body.get("deleteOptions") or {})
        return (
            201,
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201},
            [],
        )

    def _serve_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            res = _res(spec["group"], version["name"], names["plural"])
            subresources = set((version.get("subresources") or {}).keys())
            self.resources[res] = kmock.ResourceInfo(
                kind=names["kind"], singular=names.get("singular", names["kind"].lower()),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                verbs={"create", "delete", "get", "list", "patch", "update", "watch"},
                shortnames=set(names.get("shortNames", [])), categories=set(names.get("categories", [])),
                subresources=subresources,
            )  # fmt: skip
            self._kinds[res] = Kind(
                kind=names["kind"], namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in subresources, schema=version["schema"]["openAPIV3Schema"],
                group=spec["group"], singular=names.get("singular", ""),
                columns=version.get("additionalPrinterColumns") or [],
            )  # fmt: skip
        new = copy.deepcopy(crd)
        new["status"] = {
            "acceptedNames": names, "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [{"type": t, "status": "True", "reason": r, "lastTransitionTime": now_iso()}
                           for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))],
        }  # fmt: skip
        self._replace(CRDS, crd, new)

    def install_crd(self, path: str | Path) -> None:
        """Create a CRD from a YAML file, as `kubectl apply -f crds/` would."""
        crd = yaml.safe_load(Path(path).read_text())
        with self.mutex:
            self._serve(Call("POST", CRDS, None, None, None, {}, {}, crd))


def _age(stamp: str) -> str:
    """A timestamp as `kubectl get` shows an age: 45s, 3m12s, 17m, 5h, 2d."""
    seconds = int(
        (
            dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        ).total_seconds()
    )
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h" if seconds < 48 * 3600 else f"{seconds // 86400}d"


def table(kind: Kind, objs: list[dict], resource_version: str) -> dict:
    """Server-side printing (`Accept: ...;as=Table`) with the CRD's additionalPrinterColumns."""
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name", "priority": 0}]
    columns += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""), "description": c.get("description", ""),
                 "priority": c.get("priority", 0)} for c in kind.columns]  # fmt: skip

    def cell(obj: dict, col: dict) -> Any:
        value = _at(obj, col["jsonPath"].lstrip("."))
        return _age(value) if value is not None and col["type"] == "date" else value

    rows = [{"cells": [o["metadata"]["name"], *(cell(o, c) for c in kind.columns)],
             "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}
            for o in objs]  # fmt: skip
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns, "rows": rows}  # fmt: skip


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# ---------------------------------------------------------------- running it for sync tests


@dataclass
class RunningAPI:
    """A KubeAPI served on a loopback port from its own thread (for synchronous tests and tools)."""

    api: KubeAPI = field(default_factory=KubeAPI)
    url: str = ""
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None

    def __enter__(self) -> RunningAPI:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            try:
                self._stop = asyncio.Event()
                async with self.api, kmock.Server(self.api) as server:
                    self.url = str(server.url).rstrip("/")
                    self.loop = asyncio.get_running_loop()
                    ready.set()
                    await self._stop.wait()
            except BaseException as e:  # noqa: BLE001 - reported to the starting thread
                failure.append(e)
                ready.set()

        self._thread = threading.Thread(target=asyncio.run, args=(serve(),), name="kube-api", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """Write a kubeconfig pointing at this server (for kopf, the kubernetes client and kubectl)."""
        path = Path(path)
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "test"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}],
        }))  # fmt: skip
        return path
