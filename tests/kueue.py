"""A Kueue stand-in for plain-pod groups: its pod webhook and its admission, nothing else.

Kueue's pod integration gates every pod that carries the `kueue.x-k8s.io/queue-name` label: its
mutating webhook adds the scheduling gate `kueue.x-k8s.io/admission` at creation, so the scheduler
leaves the pod alone (PodScheduled False, reason SchedulingGated). For a pod group
(`kueue.x-k8s.io/pod-group-name` + the `kueue.x-k8s.io/pod-group-total-count` annotation) Kueue
creates one Workload once all of the group's pods exist and, when the queue admits it, removes the
gate from every pod of the group. A pod created later for an admitted group (a replacement) is
ungated at once, while the Workload stays admitted.

Not done: quotas, preemption of workloads, the finalizer Kueue puts on pods, node selectors of the
flavor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import kmock

from tests.kube_api import KubeAPI

GATE = "kueue.x-k8s.io/admission"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
PODS = kmock.resource("v1", "pods")


@dataclass
class Kueue:
    api: KubeAPI
    admitted: set[tuple[str, str]] = field(default_factory=set)  # (namespace, pod group)

    def install(self) -> Kueue:
        self.api.pod_webhooks.append(self._gate)
        return self

    def _gate(self, pod: dict) -> None:
        meta = pod["metadata"]
        if QUEUE_LABEL not in (meta.get("labels") or {}):
            return
        group = (meta.get("namespace", "default"), (meta.get("labels") or {}).get(GROUP_LABEL, meta["name"]))
        if group in self.admitted:
            return  # a replacement pod of an admitted group
        gates = pod.setdefault("spec", {}).setdefault("schedulingGates", [])
        if not any(g.get("name") == GATE for g in gates):
            gates.append({"name": GATE})

    def group_pods(self, namespace: str, group: str) -> list[dict]:
        return [
            p for p in self.api.objects(PODS, namespace, f"{GROUP_LABEL}={group}")
            if not p["metadata"].get("deletionTimestamp")
        ]  # fmt: skip

    def admit(self, namespace: str, group: str) -> bool:
        """Admit the group's Workload: only once every pod of the group exists (total-count)."""
        pods = self.group_pods(namespace, group)
        total = int((pods[0]["metadata"].get("annotations") or {}).get(COUNT_ANNOTATION) or 0) if pods else 0
        if not pods or len(pods) < total:
            return False
        self.admitted.add((namespace, group))
        with self.api.mutex:
            for pod in pods:
                stored = self.api._store[PODS][(namespace, pod["metadata"]["name"])]
                new = {**stored, "spec": {**stored["spec"], "schedulingGates": [
                    g for g in stored["spec"].get("schedulingGates") or [] if g.get("name") != GATE]}}  # fmt: skip
                if not new["spec"]["schedulingGates"]:
                    del new["spec"]["schedulingGates"]
                self.api._replace(PODS, stored, new)
        return True
