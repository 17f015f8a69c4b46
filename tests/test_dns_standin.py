"""The DNS stand-in (tests/dns_standin.py) behaves like cluster DNS that lags pod creation.

[dns] https://kubernetes.io/docs/concepts/services-networking/dns-pod-service/#pods
A pod with `hostname` and `subdomain` under a headless Service gets the A record
<hostname>.<subdomain>.<ns>.svc.cluster.local; until it is published a lookup fails (NXDOMAIN).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dns_standin import ClusterDNS, pod_names
from tests.fixtures_kube import Cluster
from tests.kubelet import Kubelet, wait_for

POD = "j-a1-r0.ftj-j.default.svc"

RESOLVE = """
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        infos = socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM, flags=socket.AI_CANONNAME)
        out[name] = {"ip": sorted({i[4][0] for i in infos}), "canonname": infos[0][3]}
    except socket.gaierror as e:
        out[name] = {"error": e.errno}
print(json.dumps(out))
"""


def resolve(dns: ClusterDNS, *names: str) -> dict[str, dict]:
    """getaddrinfo of each name in a fresh process that resolves through the stand-in."""
    env = {**os.environ, **dns.env(dict(os.environ))}
    proc = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def dns(tmp_path: Path) -> ClusterDNS:
    return ClusterDNS(tmp_path / "dns")


def test_a_pod_name_does_not_resolve_before_it_is_published(dns: ClusterDNS) -> None:
    got = resolve(dns, POD, f"{POD}.cluster.local")
    assert got == {POD: {"error": socket.EAI_NONAME}, f"{POD}.cluster.local": {"error": socket.EAI_NONAME}}


def test_a_published_name_resolves_to_its_address_under_both_spellings(dns: ClusterDNS) -> None:
    dns.publish([POD, f"{POD}.cluster.local"], ip="127.0.0.1")
    got = resolve(dns, POD, f"{POD}.cluster.local", f"{POD.upper()}.", "j-a1-r1.ftj-j.default.svc")
    assert got[POD] == {"ip": ["127.0.0.1"], "canonname": POD}
    assert got[f"{POD}.cluster.local"]["ip"] == ["127.0.0.1"]
    assert got[f"{POD.upper()}."]["ip"] == ["127.0.0.1"]  # DNS names are case-insensitive, FQDN dot allowed
    assert got["j-a1-r1.ftj-j.default.svc"] == {"error": socket.EAI_NONAME}  # another pod, not yet


def test_publication_reaches_a_process_that_is_already_running(dns: ClusterDNS) -> None:
    """No caching in the stand-in: a process polling the name sees it as soon as it is published."""
    poll = f"""
import socket, sys
try:
    socket.getaddrinfo("{POD}", 80)
    sys.exit("resolved before publication")
except socket.gaierror:
    pass
print("before", flush=True)  # only after the failed lookup: the test publishes when it reads this
sys.stdin.readline()  # the test publishes, then writes a line
print(socket.getaddrinfo("{POD}", 80)[0][4][0])
"""
    env = {**os.environ, **dns.env(dict(os.environ))}
    with subprocess.Popen(
        [sys.executable, "-c", poll], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "before\n"
        dns.publish([POD])
        out, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and out.strip() == "127.0.0.1"


def test_other_names_resolve_as_without_the_stand_in(dns: ClusterDNS) -> None:
    names = [
        "localhost",
        "127.0.0.1",
        socket.gethostname(),
        "does-not-exist.invalid",
        "svc",
        "my.svc.example",
    ]
    plain = subprocess.run(
        [sys.executable, "-c", RESOLVE, *names], capture_output=True, text=True, timeout=60, check=True
    )
    assert resolve(dns, *names) == json.loads(plain.stdout)
    assert resolve(dns, "localhost")["localhost"]["ip"]  # and they do resolve


def test_programs_that_are_not_python_see_the_same_records(dns: ClusterDNS) -> None:
    """libc's getaddrinfo is what is wrapped: getent (C, like libtorch's TCPStore) lags too."""
    env = {**os.environ, **dns.env(dict(os.environ))}
    before = subprocess.run(["getent", "ahostsv4", POD], env=env, capture_output=True, text=True, timeout=30)
    dns.publish([POD])
    after = subprocess.run(["getent", "ahostsv4", POD], env=env, capture_output=True, text=True, timeout=30)
    assert before.returncode == 2 and before.stdout == ""  # getent: key not found
    assert after.returncode == 0 and after.stdout.split()[0] == "127.0.0.1"


def test_a_pod_gets_the_names_of_its_hostname_and_subdomain() -> None:
    pod = {
        "metadata": {"name": "j-a1-r0", "namespace": "ml"},
        "spec": {"hostname": "j-a1-r0", "subdomain": "ftj-j"},
    }
    assert pod_names(pod) == ["j-a1-r0.ftj-j.ml.svc", "j-a1-r0.ftj-j.ml.svc.cluster.local"]
    assert pod_names({"metadata": {"name": "solo"}, "spec": {}}) == []  # no subdomain, no record


def test_the_kubelet_publishes_a_pods_names_only_after_dns_delay(cluster: Cluster) -> None:
    """Its container starts with its name unresolvable (and left in place in args, port moved);
    the name resolves `dns_delay` seconds later."""
    script = """
import socket, sys, time
name, port = sys.argv[1].rsplit(":", 1)
def resolves():
    try:
        return socket.getaddrinfo(name, int(port))[0][4][0]
    except socket.gaierror:
        return None
print("at start:", resolves(), "port", port, flush=True)
while not resolves():
    time.sleep(0.1)
print("later:", resolves(), flush=True)
"""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "j-a1-r0", "namespace": "default"},
        "spec": {
            "hostname": "j-a1-r0",
            "subdomain": "ftj-j",
            "restartPolicy": "Never",
            "containers": [
                {"name": "c", "image": "x", "command": [sys.executable, "-c", script, f"{POD}:29500"]}
            ],
        },
    }
    with Kubelet(cluster.api.url, cluster.workdir / "node", ports={29500: 41234}, dns_delay=2.0) as kubelet:
        cluster.core.create_namespaced_pod("default", pod)
        wait_for(
            lambda: cluster.core.read_namespaced_pod("j-a1-r0", "default").status.phase == "Succeeded",
            60,
            what=lambda: kubelet.log_of("j-a1-r0"),
        )
        log = kubelet.log_of("j-a1-r0")
        assert kubelet.dns is not None and POD in kubelet.dns.published()
    assert "at start: None port 41234" in log
    assert "later: 127.0.0.1" in log
