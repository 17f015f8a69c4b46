"""A kubelet stand-in for tests: runs the API server's pods as local processes.

It watches Pods over the HTTP API like a real kubelet, binds unscheduled pods to its node, and runs
each pod's container command as a local process (in its own process group) with the pod's env:

- volumes: configMap and secret volumes become files in a temp dir, emptyDirs temp dirs,
  persistentVolumeClaims one shared dir per claim (so pods share them like a real volume);
  every mount path in the command, args, env values and workingDir is rewritten to its local dir
  (/etc/kubetune/job.yaml -> <tmp>/<pod>/config/job.yaml);
- env: values, fieldRef (metadata.name/namespace/uid/labels, spec.nodeName, status.podIP),
  secretKeyRef and configMapKeyRef read from the API; $(VAR) expanded in command and args;
  cluster DNS names (<pod>.<service>.<ns>.svc[.cluster.local]) resolve to 127.0.0.1 (with `ports`
  moving well-known ports such as torchrun's 29500 to free ones, since every pod shares the host);
  with `dns_delay` the names stay and resolve through the DNS stand-in (tests/dns_standin.py), only
  `dns_delay` seconds after the kubelet starts the pod, as on a cluster whose DNS lags pod creation;
- status: Pending (ContainerCreating) -> Running -> Succeeded/Failed with the container's exit code
  (128+signal when killed), reason Completed/Error/OOMKilled, and the log tail as the message;
- deletion: a pod with deletionTimestamp gets SIGTERM on its main process, SIGKILL for the whole
  group after the grace period, then the kubelet confirms the deletion (grace 0), as a kubelet does.

Tests poke it: `kill(pod)` (SIGKILL, a crash), `kill(pod, signal.SIGTERM)` (preemption),
`lose_node(pod)` (the process dies unseen, the pod turns Unknown and stays Terminating).
Only restartPolicy Never and one container per pod are run (what the operator creates).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.dns_standin import ClusterDNS, pod_names

DNS = re.compile(r"\b[a-z0-9]([-a-z0-9.]*[a-z0-9])?\.svc(\.cluster\.local)?\b")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Running:
    pod: dict
    proc: asyncio.subprocess.Process | None = None
    log: Path | None = None
    started: str = ""
    deleting: bool = False
    lost: bool = False  # the node is "gone": nothing is reported any more
    oom: bool = False
    evicted: str | None = None  # the kubelet's eviction message (node pressure)
    termination_log: Path | None = None  # the container's terminationMessagePath, on this host
    task: asyncio.Task | None = None


@dataclass
class Kubelet:
    api_url: str
    workdir: Path
    node: str = "node-1"
    # Replace a pod's command (e.g. a fake trainer): pod -> argv, or None to run the pod's own.
    command_for: Callable[[dict], list[str] | None] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # What the node offers the scheduler ({"nvidia.com/gpu": "8", "ephemeral-storage": "200Gi"});
    # resources not named here are unlimited.
    capacity: dict[str, str] = field(default_factory=dict)
    # Ports of cluster addresses moved on this machine (all pods share 127.0.0.1): {29500: 41234}.
    ports: dict[int, int] = field(default_factory=dict)
    # Cluster DNS that publishes a pod's names only this many seconds after its container starts
    # (tests/dns_standin.py); None: names are rewritten to 127.0.0.1 and always resolve.
    dns_delay: float | None = None
    dns: ClusterDNS | None = field(default=None, init=False)
    pods: dict[tuple[str, str], Running] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None
    _session: aiohttp.ClientSession | None = None
    _bound: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # pod -> its requests
    _unbound: dict[tuple[str, str], dict] = field(default_factory=dict)  # pods the scheduler could not place

    # ------------------------------------------------------------ lifecycle (from the test thread)

    def __enter__(self) -> Kubelet:
        ready = threading.Event()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with aiohttp.ClientSession(self.api_url) as self._session:
                watcher = asyncio.create_task(self._watch(ready))
                await self._stop.wait()
                watcher.cancel()
                for run in list(self.pods.values()):
                    self._signal(run, signal.SIGKILL, group=True)
                await asyncio.gather(*(r.task for r in self.pods.values() if r.task), return_exceptions=True)

        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.dns_delay is not None:
            self.dns = ClusterDNS(self.workdir / "dns")
        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="kubelet", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the kubelet could not start watching pods")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop and self._stop:
            self.loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(30)

    def _call(self, fn: Callable[[], Any]) -> Any:
        assert self.loop is not None
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            result.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)
        return result[0] if result else None

    def kill(
        self, name: str, sig: int = signal.SIGKILL, namespace: str = "default", oom: bool = False
    ) -> bool:
        """Signal a pod's process: SIGKILL hits the whole container (a crash), other signals the main process."""

        def do() -> bool:
            run = self.pods.get((namespace, name))
            if run is None or run.proc is None or run.proc.returncode is not None:
                return False
            run.oom = oom
            return self._signal(run, sig, group=sig == signal.SIGKILL)

        return bool(self._call(do))

    def lose_node(self, name: str, namespace: str = "default", delete_after: float | None = None) -> bool:
        """The pod's node stops reporting, as a real control plane shows it.

        The process dies unseen (no kubelet is left to report it). The node lifecycle controller sets
        the pod's Ready condition to False (reason NodeNotReady) and leaves its phase Running. After
        `delete_after` seconds (the pod's toleration of the node.kubernetes.io/unreachable taint, 300 s
        on a default cluster) the taint manager marks it DisruptionTarget (DeletionByTaintManager) and
        deletes it gracefully, which no kubelet ever confirms: the pod stays Terminating.
        """

        def do() -> bool:
            run = self.pods.get((namespace, name))
            if run is None:
                return False
            run.lost = True
            self._signal(run, signal.SIGKILL, group=True)
            conditions = [
                c for c in (run.pod.get("status") or {}).get("conditions") or [] if c["type"] != "Ready"
            ]
            conditions.append({"type": "Ready", "status": "False", "reason": "NodeNotReady",
                               "message": "Node is not ready", "lastTransitionTime": now_iso()})  # fmt: skip
            asyncio.ensure_future(self._patch_status(run.pod, {"conditions": conditions}))
            if delete_after is not None:
                loop = asyncio.get_running_loop()
                loop.call_later(
                    delete_after, lambda: asyncio.ensure_future(self._taint_manager_delete(run.pod))
                )
            return True

        return bool(self._call(do))

    async def _taint_manager_delete(self, pod: dict) -> None:
        assert self._session is not None
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        current = await self._get(f"/api/v1/namespaces/{ns}/pods/{name}")
        conditions = [
            c
            for c in (current.get("status") or {}).get("conditions") or []
            if c["type"] != "DisruptionTarget"
        ]
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                           "message": "Taint manager: deleting due to NoExecute taint",
                           "lastTransitionTime": now_iso()})  # fmt: skip
        await self._patch_status(pod, {"conditions": conditions})
        async with self._session.delete(f"/api/v1/namespaces/{ns}/pods/{name}") as r:
            await r.read()

    def evict(self, name: str, namespace: str = "default", resource: str = "ephemeral-storage") -> bool:
        """The kubelet evicts the pod for node pressure (a hard threshold: no grace): the container is
        killed, the pod Failed with reason Evicted, and DisruptionTarget says TerminationByKubelet."""

        def do() -> bool:
            run = self.pods.get((namespace, name))
            if run is None or run.proc is None or run.proc.returncode is not None:
                return False
            run.evicted = f"The node was low on resource: {resource}. "
            return self._signal(run, signal.SIGKILL, group=True)

        return bool(self._call(do))

    def running(self) -> list[str]:
        """Names of the pods whose process is alive."""
        return sorted(
            n for (_, n), r in list(self.pods.items()) if r.proc is not None and r.proc.returncode is None
        )

    def log_of(self, name: str, namespace: str = "default") -> str:
        run = self.pods.get((namespace, name))
        return run.log.read_text(errors="replace") if run and run.log and run.log.exists() else ""

    # ------------------------------------------------------------ the watch loop

    async def _watch(self, ready: threading.Event) -> None:
        assert self._session is not None
        rv = ""
        while True:
            try:
                if not rv:
                    async with self._session.get("/api/v1/pods") as r:
                        listing = await r.json()
                    rv = listing["metadata"]["resourceVersion"]
                    for pod in listing["items"]:
                        await self._sync(pod, "ADDED")
                ready.set()
                params = {"watch": "true", "resourceVersion": rv, "timeoutSeconds": "60"}
                async with self._session.get(
                    "/api/v1/pods", params=params, timeout=aiohttp.ClientTimeout(None)
                ) as r:
                    async for line in r.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            rv = ""
                            break
                        rv = event["object"]["metadata"]["resourceVersion"]
                        await self._sync(event["object"], event["type"])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep watching, as a kubelet does
                print(f"kubelet: watch error {e!r}", file=sys.__stderr__)
                await asyncio.sleep(0.5)

    async def _sync(self, pod: dict, etype: str) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        key = (meta.get("namespace", "default"), meta["name"])
        run = self.pods.get(key)
        if run is not None and run.pod["metadata"].get("uid") != meta.get("uid"):
            self._signal(run, signal.SIGKILL, group=True)  # an older pod of the same name
            self.pods.pop(key)
            run = None
        if etype == "DELETED":
            self._unbound.pop(key, None)
            if self._bound.pop(key, None) is not None:
                await self._reschedule()
            if run is not None:
                self._signal(run, signal.SIGKILL, group=True)  # force-deleted: the container goes now
                if run.task is None or run.task.done():
                    self.pods.pop(key, None)
            return
        if run is not None:
            run.pod = pod
        if not spec.get("nodeName"):
            if not meta.get("deletionTimestamp"):
                await self._schedule(pod)
            return
        if spec["nodeName"] != self.node:
            return
        if meta.get("deletionTimestamp"):
            if run is None or run.task is None or run.task.done():
                if run is None or not run.lost:
                    await self._confirm_deletion(pod)
            elif not run.deleting:
                run.deleting = True
                grace = int(meta.get("deletionGracePeriodSeconds", 30))
                if not run.lost:
                    self._signal(run, signal.SIGTERM, group=False)
                    asyncio.get_running_loop().call_later(grace, self._signal, run, signal.SIGKILL, True)
            return
        if run is None and (pod.get("status") or {}).get("phase") in ("Pending", None):
            run = self.pods[key] = Running(pod)
            run.task = asyncio.create_task(self._run(run))

    # ------------------------------------------------------------ the scheduler (one node)

    async def _schedule(self, pod: dict) -> None:
        """Bind the pod to this node, or say why not as the scheduler does (PodScheduled False)."""
        meta, spec = pod["metadata"], pod.get("spec") or {}
        key = (meta.get("namespace", "default"), meta["name"])
        if spec.get("schedulingGates"):
            self._unbound[key] = pod
            return await self._unschedulable(
                pod, "SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates"
            )
        short = self._insufficient(pod)
        if short:
            self._unbound[key] = pod
            message = (f"0/1 nodes are available: {', '.join(f'1 Insufficient {r}' for r in short)}. "
                       "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.")  # fmt: skip
            return await self._unschedulable(pod, "Unschedulable", message)
        self._unbound.pop(key, None)
        self._bound[key] = _requests(pod)
        await self._post(f"/api/v1/namespaces/{key[0]}/pods/{key[1]}/binding",
                         {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": key[1]},
                          "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}})  # fmt: skip

    def _insufficient(self, pod: dict) -> list[str]:
        want = _requests(pod)
        short = []
        for resource, offered in self.capacity.items():
            used = sum(r.get(resource, 0.0) for r in self._bound.values())
            if want.get(resource, 0.0) > _quantity(offered) - used:
                short.append(resource)
        return short

    async def _unschedulable(self, pod: dict, reason: str, message: str) -> None:
        scheduled = next(
            (c for c in (pod.get("status") or {}).get("conditions") or [] if c["type"] == "PodScheduled"), {}
        )
        if (scheduled.get("reason"), scheduled.get("message")) == (reason, message):
            return  # said already; a new patch would only wake every watcher
        await self._patch_status(pod, {"conditions": [{"type": "PodScheduled", "status": "False", "reason": reason,
                                                       "message": message, "lastTransitionTime": now_iso()}]})  # fmt: skip

    async def _reschedule(self) -> None:
        """Capacity came free (a pod is gone): try the waiting pods again, as the scheduler's queue does."""
        for pod in list(self._unbound.values()):
            current = await self._get_or_none(pod)
            if current is None:
                self._unbound.pop(
                    (pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]), None
                )
            elif not (current.get("spec") or {}).get("nodeName"):
                await self._schedule(current)

    async def _get_or_none(self, pod: dict) -> dict | None:
        assert self._session is not None
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        async with self._session.get(f"/api/v1/namespaces/{ns}/pods/{name}") as r:
            return await r.json() if r.status == 200 else None

    # ------------------------------------------------------------ running one pod

    async def _run(self, run: Running) -> None:
        pod = run.pod
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        base = self.workdir / ns / name
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        if self.dns is not None:
            asyncio.get_running_loop().call_later(self.dns_delay or 0, self.dns.publish, pod_names(pod))
        run.log = base / "log.txt"
        await self._patch_status(pod, {
            "phase": "Pending", "hostIP": "127.0.0.1",
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}],
            "containerStatuses": [{"name": container["name"], "ready": False, "restartCount": 0,
                                   "image": container.get("image", ""), "imageID": "",
                                   "state": {"waiting": {"reason": "ContainerCreating"}}}],
        })  # fmt: skip
        try:
            mounts = await self._volumes(pod, container, base)
            # The termination message file is a host file mounted into the container, as a kubelet does.
            run.termination_log = base / "termination-log"
            run.termination_log.write_text("")
            mounts[container.get("terminationMessagePath") or "/dev/termination-log"] = run.termination_log
            env = await self._env(pod, container, mounts)
            argv = (self.command_for(pod) if self.command_for else None) or [
                *container.get("command", []),
                *container.get("args", []),
            ]
            # An absolute path that exists here is the host's (the interpreter, a test script), even
            # when it lies under a pod mount path such as /tmp (CI may clone the project there).
            argv = [
                a if a.startswith("/") and Path(a).exists() else _expand(self._rewrite(a, mounts), env)
                for a in argv
            ]
            cwd = self._rewrite(container.get("workingDir") or "", mounts) or str(base)
            Path(cwd).mkdir(parents=True, exist_ok=True)
            with open(run.log, "wb") as log:
                run.proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=cwd,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
        except Exception as e:  # noqa: BLE001 - the container could not start: the pod fails
            run.log.write_text(f"kubelet: cannot start the container: {e!r}\n")
            await self._finish(run, 128, "StartError", now_iso())
            return
        run.started = now_iso()
        if run.deleting or run.pod["metadata"].get("deletionTimestamp"):
            self._signal(run, signal.SIGTERM, group=False)
        else:
            await self._patch_status(pod, {
                "phase": "Running", "podIP": "127.0.0.1", "startTime": run.started,
                "conditions": [{"type": t, "status": "True", "lastTransitionTime": run.started}
                               for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                "containerStatuses": [{"name": container["name"], "ready": True, "started": True, "restartCount": 0,
                                       "image": container.get("image", ""), "imageID": "",
                                       "containerID": f"local://{run.proc.pid}",
                                       "state": {"running": {"startedAt": run.started}}}],
            })  # fmt: skip
        code = await run.proc.wait()
        self._signal(run, signal.SIGKILL, group=True)  # the container's other processes go with it
        code = 128 - code if code < 0 else code
        await self._finish(
            run, code, "OOMKilled" if run.oom else "Completed" if code == 0 else "Error", run.started
        )

    async def _finish(self, run: Running, code: int, reason: str, started: str) -> None:
        if run.lost:
            return
        pod = run.pod
        container = pod["spec"]["containers"][0]
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": now_iso(),
        }
        said = run.termination_log.read_text(errors="replace")[:4096] if run.termination_log else ""
        if said.strip():  # the container's own termination message wins
            terminated["message"] = said
        elif code and run.log and run.log.exists():  # terminationMessagePolicy FallbackToLogsOnError
            terminated["message"] = "\n".join(run.log.read_text(errors="replace").splitlines()[-20:])[-2048:]
        ready = [{"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now_iso()}
                 for t in ("ContainersReady", "Ready")]  # fmt: skip
        status: dict[str, Any] = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"}, *ready],
            "containerStatuses": [{"name": container["name"], "ready": False, "started": False, "restartCount": 0,
                                   "image": container.get("image", ""), "imageID": "",
                                   "state": {"terminated": terminated}}],
        }  # fmt: skip
        if run.evicted:
            status.update(phase="Failed", reason="Evicted", message=run.evicted)
            status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                         "message": run.evicted, "lastTransitionTime": now_iso()})  # fmt: skip
        await self._patch_status(pod, status)
        key = (pod["metadata"].get("namespace", "default"), pod["metadata"]["name"])
        if self._bound.pop(key, None) is not None:  # a finished pod holds no resources
            await self._reschedule()
        if run.deleting or run.pod["metadata"].get("deletionTimestamp"):
            await self._confirm_deletion(pod)

    def _signal(self, run: Running, sig: int, group: bool) -> bool:
        if run.proc is None or (run.proc.returncode is not None and not group):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(run.proc.pid, sig)
            else:
                os.kill(run.proc.pid, sig)
            return True
        return False

    # ------------------------------------------------------------ volumes and env

    async def _volumes(self, pod: dict, container: dict, base: Path) -> dict[str, Path]:
        """mountPath -> local directory, with configMap/secret contents written out."""
        ns = pod["metadata"].get("namespace", "default")
        local: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            d = base / "volumes" / vol["name"]
            if "persistentVolumeClaim" in vol:
                d = self.workdir / "pvc" / ns / vol["persistentVolumeClaim"]["claimName"]
            elif "hostPath" in vol:
                d = Path(vol["hostPath"]["path"])
            d.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol or "secret" in vol:
                resource = "configmaps" if "configMap" in vol else "secrets"
                source = vol.get("configMap") or vol.get("secret") or {}
                obj = await self._get(
                    f"/api/v1/namespaces/{ns}/{resource}/{source.get('name') or source.get('secretName')}"
                )
                data = dict(obj.get("data") or {})
                files = {i["key"]: i["path"] for i in source.get("items") or []} or {k: k for k in data}
                for key, rel in files.items():
                    (d / rel).parent.mkdir(parents=True, exist_ok=True)
                    (d / rel).write_bytes(
                        base64.b64decode(data[key]) if resource == "secrets" else data[key].encode()
                    )
            local[vol["name"]] = d
        return {
            m["mountPath"]: local[m["name"]] / m.get("subPath", "")
            for m in container.get("volumeMounts") or []
        }

    def _rewrite(self, text: str, mounts: dict[str, Path]) -> str:
        """Mount paths -> local dirs (one pass, longest first), cluster DNS names -> 127.0.0.1."""
        if mounts:
            paths = "|".join(re.escape(m.rstrip("/")) for m in sorted(mounts, key=len, reverse=True))
            local = {m.rstrip("/"): str(d) for m, d in mounts.items()}
            text = re.sub(rf"(?<![\w.-])({paths})(?=/|$|[\s:;,\"'])", lambda m: local[m.group(1)], text)
        if self.dns is None:
            text = DNS.sub("127.0.0.1", text)
        return re.sub(
            rf"\b(?P<host>127\.0\.0\.1|{DNS.pattern}):(?P<port>\d+)\b",
            lambda m: f"{m['host']}:{self.ports.get(int(m['port']), m['port'])}",
            text,
        )

    async def _env(self, pod: dict, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        ns, meta = pod["metadata"].get("namespace", "default"), pod["metadata"]
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOSTNAME": pod["spec"].get("hostname") or meta["name"], "LANG": "C.UTF-8",
            "HOME": str(self.workdir / ns / meta["name"]),
        }  # fmt: skip
        env.update(self.extra_env)
        if self.dns is not None:
            env.update(self.dns.env(env))
        fields = {
            "metadata.name": meta["name"], "metadata.namespace": ns, "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": self.node, "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
        }  # fmt: skip
        for var in container.get("env") or []:
            source = var.get("valueFrom")
            if source is None:
                value = _expand(self._rewrite(var.get("value", ""), mounts), env)
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                m = re.match(r"metadata\.(labels|annotations)\['(.+)'\]", path)
                value = (meta.get(m.group(1)) or {}).get(m.group(2), "") if m else fields.get(path, "")
            else:
                ref = source.get("secretKeyRef") or source.get("configMapKeyRef") or {}
                resource = "secrets" if "secretKeyRef" in source else "configmaps"
                obj = await self._get(f"/api/v1/namespaces/{ns}/{resource}/{ref['name']}")
                value = (obj.get("data") or {}).get(ref["key"], "")
                value = base64.b64decode(value).decode() if resource == "secrets" else value
            env[var["name"]] = value
        return env

    # ------------------------------------------------------------ API calls

    async def _get(self, path: str) -> dict:
        assert self._session is not None
        async with self._session.get(path) as r:
            r.raise_for_status()
            return await r.json()

    async def _post(self, path: str, body: dict) -> None:
        assert self._session is not None
        async with self._session.post(path, json=body) as r:
            await r.read()

    async def _patch_status(self, pod: dict, status: dict) -> None:
        assert self._session is not None
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        headers = {"Content-Type": "application/merge-patch+json"}
        for _ in range(5):  # a kubelet keeps reporting until the API server takes it
            try:
                async with self._session.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                               data=json.dumps({"status": status}), headers=headers) as r:  # fmt: skip
                    body = await r.read()
                    if r.status < 300 or r.status == 404:
                        return
                    print(f"kubelet: status of {name}: {r.status} {body[:300]!r}", file=sys.__stderr__)
            except aiohttp.ClientError as e:
                print(f"kubelet: status of {name}: {e!r}", file=sys.__stderr__)
            await asyncio.sleep(0.2)

    async def _confirm_deletion(self, pod: dict) -> None:
        assert self._session is not None
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        async with self._session.delete(
            f"/api/v1/namespaces/{ns}/pods/{name}", params={"gracePeriodSeconds": "0"}
        ) as r:
            await r.read()
        run = self.pods.get((ns, name))
        if run is not None and run.pod["metadata"].get("uid") == pod["metadata"].get("uid"):
            self.pods.pop((ns, name), None)


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}  # fmt: skip


def _quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "16Gi", "4") as a number."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text).strip())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a quantity: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _requests(pod: dict) -> dict[str, float]:
    """What the pod asks the scheduler for: the sum of its containers' requests."""
    total: dict[str, float] = {}
    for c in (pod.get("spec") or {}).get("containers") or []:
        for resource, amount in ((c.get("resources") or {}).get("requests") or {}).items():
            total[resource] = total.get(resource, 0.0) + _quantity(amount)
    return total


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str | Callable[[], str] = "",
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {said or predicate}")
        time.sleep(interval)
