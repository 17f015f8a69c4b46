"""A gang meets through torchrun's c10d rendezvous while cluster DNS lags pod creation.

The pods run the rendered command for real (supervise -> torchrun, c10d rendezvous at
<rank 0 pod>.<service>.<ns>.svc) with only the worker swapped for the fake trainer; the DNS
stand-in publishes each pod's name `dns_delay` seconds after it starts, so both torchruns start
before any name resolves (on a cluster: the EndpointSlice and CoreDNS have not caught up yet).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures_kube import FAKE_TRAINER, Cluster, free_port, job_doc
from tests.kubelet import Kubelet, wait_for

pytestmark = pytest.mark.slow

DNS_DELAY = 15.0  # longer than torchrun takes to start (import torch), so no rank sees a name at start


def torchrun_of_fake_trainer(pod: dict) -> list[str]:
    """The pod's own supervise -- torchrun ... line, running the fake trainer instead of -m kubetune_trainer."""
    cmd = list(pod["spec"]["containers"][0]["command"])
    worker = cmd.index("-m", cmd.index("torchrun"))
    assert cmd[worker + 1] == "kubetune_trainer", cmd
    return [*cmd[:worker], str(FAKE_TRAINER), *cmd[worker + 2 :]]


@pytest.fixture
def lagging_dns_kubelet(cluster: Cluster) -> Iterator[Kubelet]:
    env = {"FAKE_STEP_SECONDS": "0.05", "OMP_NUM_THREADS": "1"}
    with Kubelet(cluster.api.url, cluster.workdir / "node", command_for=torchrun_of_fake_trainer,
                 extra_env=env, ports={29500: free_port()}, dns_delay=DNS_DELAY) as k:  # fmt: skip
        yield k


def test_two_node_gang_meets_although_pod_names_resolve_only_after_torchrun_started(
    cluster: Cluster, lagging_dns_kubelet: Kubelet, operator: object, tmp_path: Path
) -> None:
    kubelet = lagging_dns_kubelet
    cluster.create_job(job_doc("rdzv", tmp_path / "out", nnodes=2, steps=20, every=5))
    pods = ("rdzv-a1-r0", "rdzv-a1-r1")

    def logs() -> str:
        return "\n".join(f"--- {p}\n{kubelet.log_of(p)[-3000:]}" for p in pods)

    # Ends in success, or in the first restart (a rank gave up on the rendezvous).
    status = wait_for(
        lambda: (
            (s := cluster.status("rdzv")).get("phase") in ("Succeeded", "Failed")
            or s.get("restarts") or s.get("attempt", 1) > 1
        ) and s,
        120,
        what=lambda: f"the job to finish; status {cluster.status('rdzv')}\n{logs()}",
    )  # fmt: skip
    assert status["phase"] == "Succeeded", (status, logs())
    assert (status["attempt"], status.get("restarts", 0)) == (1, 0), status
    # The rendezvous really waited on DNS: rank 1 looked rank 0's name up before it was published.
    assert "rdzv-a1-r0.ftj-rdzv.default.svc" in kubelet.log_of("rdzv-a1-r1")
    assert "cannot be retrieved (gai error" in kubelet.log_of("rdzv-a1-r1"), logs()
    assert (tmp_path / "out" / "final" / "adapter").is_dir()
