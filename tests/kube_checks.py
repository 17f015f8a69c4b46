"""Checks a real API server would make on built-in objects, offline: used by the render and Helm tests.

- `validate_strict(obj)`: the object's OpenAPI schema for a Kubernetes version (kubernetes-validate,
  strict: unknown fields fail), like `kubectl apply --validate=strict`.
- `name_problems(obj)`: what schema validation does not check: object names, label keys/values.
- `restricted_problems(pod_spec)`: the "restricted" Pod Security Standard, as the admission
  controller with `pod-security.kubernetes.io/enforce: restricted` checks it.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate

# A current release and the newest the installed kubernetes-validate knows.
K8S_VERSIONS = ("1.33", kubernetes_validate.utils.latest_version())

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # DNS-1123 label (max 63)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


def validate_strict(obj: dict[str, Any], version: str = K8S_VERSIONS[0]) -> None:
    """Raise kubernetes_validate.ValidationError when `obj` does not match its kind's schema."""
    kubernetes_validate.validate(obj, version, strict=True)


def _label_key_problems(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    out = []
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)):
        out.append(f"label prefix {prefix!r} is not a DNS subdomain")
    if len(name) > 63 or not LABEL_NAME.match(name):
        out.append(f"label name {name!r} is invalid")
    return out


def name_problems(obj: dict[str, Any]) -> list[str]:
    meta = obj["metadata"]
    name, kind = meta["name"], obj["kind"]
    out: list[str] = []
    if kind == "Service":
        ok = len(name) <= 63 and DNS_1035.match(name)
    else:
        ok = len(name) <= 253 and DNS_SUBDOMAIN.match(name)
    if not ok:
        out.append(f"{kind} name {name!r} is invalid")
    for key, value in {**meta.get("labels", {}), **_selector_labels(obj)}.items():
        out += _label_key_problems(key)
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            out.append(f"label {key}={value!r}: invalid value")
    for key in meta.get("annotations", {}):
        out += _label_key_problems(key)
    if kind == "Pod":
        spec = obj["spec"]
        for field in ("hostname", "subdomain"):
            if field in spec and (len(spec[field]) > 63 or not DNS_LABEL.match(spec[field])):
                out.append(f"pod {field} {spec[field]!r} is not a DNS label")
        for vol in spec.get("volumes", []):
            if len(vol["name"]) > 63 or not DNS_LABEL.match(vol["name"]):
                out.append(f"volume name {vol['name']!r} is not a DNS label")
    return out


def _selector_labels(obj: dict[str, Any]) -> dict[str, str]:
    spec = obj.get("spec") or {}
    sel = spec.get("selector") or {}
    return dict(sel.get("matchLabels", sel if obj["kind"] == "Service" else {}))


_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_problems(pod_spec: dict[str, Any]) -> list[str]:
    """Violations of the 'restricted' Pod Security Standard (policy version latest)."""
    out: list[str] = []
    psc = pod_spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(field):
            out.append(f"{field} is set")
    for vol in pod_spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']} uses {sorted(kinds - _RESTRICTED_VOLUMES)}")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser is 0")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    containers = pod_spec.get("containers", []) + pod_spec.get("initContainers", [])
    for ctr in containers:
        sc = ctr.get("securityContext", {})
        where = f"container {ctr['name']}"
        if sc.get("privileged"):
            out.append(f"{where} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where} does not set allowPrivilegeEscalation false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{where} does not drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{where} adds capabilities {caps['add']}")
        if not (
            sc.get("runAsNonRoot") is True or (psc.get("runAsNonRoot") is True and "runAsNonRoot" not in sc)
        ):
            out.append(f"{where} is not runAsNonRoot")
        if sc.get("runAsUser") == 0:
            out.append(f"{where} runAsUser is 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where} has no RuntimeDefault/Localhost seccomp profile")
        for port in ctr.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{where} uses hostPort {port['hostPort']}")
        for field in ("appArmorProfile", "seLinuxOptions"):
            if field in sc and sc[field].get("type") not in (None, "RuntimeDefault", "Localhost"):
                out.append(f"{where} {field} {sc[field]}")
    return out
