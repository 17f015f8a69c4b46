"""The kubelet stand-in (and the control-plane parts it plays) against the documented behaviour of
real clusters: node loss, taint-manager deletion, node-pressure eviction, the scheduler's
Unschedulable and SchedulingGated conditions, and the termination message."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import kmock
import pytest

from tests.fixtures_kube import Cluster
from tests.kubelet import Kubelet, wait_for

PODS = kmock.resource("v1", "pods")
SLEEP = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def node(cluster: Cluster) -> Iterator[Kubelet]:
    with Kubelet(cluster.api.url, cluster.workdir / "node", capacity={"nvidia.com/gpu": "1"}) as k:
        yield k


def make_pod(cluster: Cluster, name: str, command: list[str] = SLEEP, gpus: int = 0, **spec: object) -> None:
    resources = {"requests": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    cluster.core.create_namespaced_pod("default", {
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 30, **spec,
                 "containers": [{"name": "main", "image": "x", "command": command, "resources": resources}]},
    })  # fmt: skip


def pod(cluster: Cluster, name: str) -> dict:
    return cluster.api.api.get_object(PODS, "default", name) or {}


def cond(p: dict, ctype: str) -> dict:
    return next((c for c in (p.get("status") or {}).get("conditions") or [] if c["type"] == ctype), {})


def running(cluster: Cluster, name: str) -> dict:
    return wait_for(lambda: (p := pod(cluster, name)).get("status", {}).get("phase") == "Running" and p, 30)


def test_a_lost_node_leaves_the_pod_running_but_not_ready_and_never_confirms_its_deletion(
    cluster: Cluster, node: Kubelet
) -> None:
    make_pod(cluster, "p")
    running(cluster, "p")
    assert node.lose_node("p", delete_after=0.5)
    p = wait_for(lambda: (p := pod(cluster, "p")) and cond(p, "DisruptionTarget") and p, 10)
    assert p["status"]["phase"] == "Running"  # the node lifecycle controller does not touch the phase
    ready = cond(p, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodeNotReady")
    assert cond(p, "DisruptionTarget")["reason"] == "DeletionByTaintManager"
    p = wait_for(lambda: (p := pod(cluster, "p")).get("metadata", {}).get("deletionTimestamp") and p, 10)
    assert not node.running()  # its process is gone, unseen
    time.sleep(2)
    assert pod(cluster, "p")  # Terminating for ever: no kubelet confirms it
    cluster.core.delete_namespaced_pod("p", "default", grace_period_seconds=0)  # a force delete does
    wait_for(lambda: not pod(cluster, "p"), 10)


def test_node_pressure_eviction_fails_the_pod_with_reason_evicted(cluster: Cluster, node: Kubelet) -> None:
    make_pod(cluster, "e")
    running(cluster, "e")
    assert node.evict("e", resource="ephemeral-storage")
    p = wait_for(lambda: (p := pod(cluster, "e"))["status"]["phase"] == "Failed" and p, 10)
    assert p["status"]["reason"] == "Evicted" and "ephemeral-storage" in p["status"]["message"]
    assert cond(p, "DisruptionTarget")["reason"] == "TerminationByKubelet"


def test_the_scheduler_reports_insufficient_resources_and_places_the_pod_once_they_free(
    cluster: Cluster, node: Kubelet
) -> None:
    make_pod(cluster, "a", gpus=1)
    running(cluster, "a")
    make_pod(cluster, "b", gpus=1)
    p = wait_for(
        lambda: (p := pod(cluster, "b")) and cond(p, "PodScheduled").get("reason") == "Unschedulable" and p,
        10,
    )
    assert "Insufficient nvidia.com/gpu" in cond(p, "PodScheduled")["message"] and not p["spec"].get(
        "nodeName"
    )
    cluster.core.delete_namespaced_pod("a", "default", grace_period_seconds=0)
    running(cluster, "b")


def test_gated_pods_are_not_scheduled_until_their_gates_are_removed(cluster: Cluster, node: Kubelet) -> None:
    make_pod(cluster, "g", schedulingGates=[{"name": "example.com/hold"}])
    p = wait_for(
        lambda: (p := pod(cluster, "g")) and cond(p, "PodScheduled").get("reason") == "SchedulingGated" and p,
        10,
    )
    assert not p["spec"].get("nodeName")
    cluster.core.patch_namespaced_pod("g", "default", {"spec": {"schedulingGates": []}})
    running(cluster, "g")


def test_the_containers_termination_message_file_becomes_its_message(cluster: Cluster, node: Kubelet) -> None:
    script = "import os, sys; open('/dev/termination-log', 'w').write('one line'); sys.exit(65)"
    make_pod(cluster, "t", command=[sys.executable, "-c", script])
    p = wait_for(lambda: (p := pod(cluster, "t"))["status"]["phase"] == "Failed" and p, 30)
    terminated = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["message"]) == (65, "one line")
