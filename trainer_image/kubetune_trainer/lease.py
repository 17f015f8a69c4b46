"""One writer per output: a lease at ``<output.uri>/LEASE``.

    lease = Lease.acquire(store, job="demo", attempt=2)    # rank 0, before anything is written
    ...                                                      # a thread renews it meanwhile
    lease.release()

The lease is a small JSON document: who holds it (job, attempt, host, pid, run id), when it was
last renewed and until when it is valid (``expires_at``: renewal time + the lease time, 60 s by
default, ``$KUBETUNE_LEASE_SECONDS`` shortens it). Every change is a conditional write, so two
writers can never both believe they hold it:

- s3://: PutObject with ``If-None-Match: *`` to create it, ``If-Match: <ETag>`` to renew, take
  over or release it (AWS S3 since 2024, SeaweedFS, MinIO); a lost race is 412 PreconditionFailed;
- file:// and pvc://: ``link()`` of a fully written temporary file to create it (fails when it
  exists), and replace-if-unchanged under an exclusive ``flock`` on ``.LEASE.lock`` (the kernel
  drops a dead holder's lock) for the rest.

A new writer takes a lease over at once when it was released, when the holder is an earlier
attempt of the same job (the operator's attempt number, $KUBETUNE_ATTEMPT), or when the holder
is provably dead (this host, this boot, this PID namespace, and the process is gone); otherwise
only once it expired. Else it fails with one line naming the holder and until when. A holder
that finds its lease taken over (its renewal is refused) stops training at the next step.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubetune.locations import LEASE_FILE
from kubetune_trainer.errors import JobError
from kubetune_trainer.store import LocalStore, ObjectStore, S3Store, StoreError, with_retries

log = logging.getLogger("kubetune.lease")

ENV_LEASE_SECONDS = "KUBETUNE_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0


class LeaseHeld(JobError):
    """Another live run holds the output's lease."""


class _Conflict(Exception):
    """A conditional write lost: the object changed (or appeared) since we read it."""


def lease_seconds() -> float:
    return float(os.environ.get(ENV_LEASE_SECONDS) or DEFAULT_LEASE_SECONDS)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _host_identity() -> dict[str, str]:
    """What makes a PID meaningful: the host, its boot and the PID namespace."""
    return {
        "host": socket.gethostname(),
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_ns": os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else "",
    }


def _process_start(pid: int) -> str:
    """The process's start time since boot (a reused PID has another), or "" when unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else ""


def _iso(t: float) -> str:
    return (
        _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@dataclass
class LeaseRecord:
    job: str
    attempt: int
    host: str
    boot_id: str
    pid_ns: str
    pid: int
    pid_start: str
    run_id: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    released: bool = False

    def to_json(self) -> bytes:
        d = asdict(self)
        d["expires"] = _iso(self.expires_at)  # for people reading the object
        return (json.dumps(d, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        d = json.loads(data)
        fields = cls.__dataclass_fields__
        return cls(**{k: d[k] for k in fields if k in d})

    @property
    def holder(self) -> str:
        return f"job {self.job} attempt {self.attempt}, pid {self.pid} on {self.host}"

    def dead(self) -> bool:
        """Provably gone: a process of this host, boot and PID namespace that no longer runs."""
        here = _host_identity()
        if (self.host, self.boot_id, self.pid_ns) != (here["host"], here["boot_id"], here["pid_ns"]):
            return False
        if not here["boot_id"]:
            return False  # no /proc: cannot tell
        start = _process_start(self.pid)
        return start == "" or (self.pid_start != "" and start != self.pid_start)


# ---------------------------------------------------------------- conditional writes per backend


class _S3Cas:
    def __init__(self, store: S3Store, key: str) -> None:
        self.store, self.key = store, key

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        s = self.store

        def get() -> tuple[bytes, str] | None:
            try:
                r = s.client.get_object(Bucket=s.bucket, Key=s._key(self.key))
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return r["Body"].read(), r["ETag"]

        return s._call("read", self.key, get)

    def write(self, data: bytes, etag: str | None) -> str:
        """Create (etag None) or replace the version `etag`; _Conflict when that lost a race."""
        from botocore.exceptions import ClientError

        s = self.store
        cond = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}

        def put() -> str | None:
            try:
                return s.client.put_object(Bucket=s.bucket, Key=s._key(self.key), Body=data, **cond)["ETag"]
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code"))
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                # 409: a conditional write raced another one (AWS); NoSuchKey: If-Match on a deleted lease
                if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey") or status in (
                    409,
                    412,
                ):
                    return None
                raise

        etag_now = s._call("write", self.key, put)
        if etag_now is None:
            raise _Conflict()
        return etag_now


class _LocalCas:
    def __init__(self, store: LocalStore, key: str) -> None:
        self.path = store.path(key)
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")

    @staticmethod
    def _etag(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, self._etag(data)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, data: bytes, etag: str | None) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            with self._locked():
                if etag is None:
                    try:
                        os.link(tmp, self.path)  # atomic, and fails when it exists (like O_EXCL)
                    except FileExistsError:
                        raise _Conflict() from None
                else:
                    current = self.read()
                    if current is None or current[1] != etag:
                        raise _Conflict()
                    os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return self._etag(data)


def _cas(store: ObjectStore, key: str) -> _S3Cas | _LocalCas:
    if isinstance(store, S3Store):
        return _S3Cas(store, key)
    if isinstance(store, LocalStore):
        return _LocalCas(store, key)
    raise TypeError(f"no lease for {type(store).__name__}")


# ---------------------------------------------------------------- the lease


class Lease:
    """This run's lease on an output (see the module docstring)."""

    def __init__(self, store: ObjectStore, record: LeaseRecord, etag: str, seconds: float) -> None:
        self.store = store
        self.record = record
        self.etag = etag
        self.seconds = seconds
        self.lost: str | None = None  # why the lease is no longer ours
        self.took_over: str | None = None  # whose lease this run took over, and why
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri_for(LEASE_FILE)

    @classmethod
    def acquire(
        cls,
        store: ObjectStore,
        *,
        job: str,
        attempt: int = 0,
        seconds: float | None = None,
        renew: bool = True,
    ) -> Lease:
        """Take the output's lease or raise LeaseHeld naming the holder; starts renewing it."""
        seconds = lease_seconds() if seconds is None else seconds
        cas = _cas(store, LEASE_FILE)
        me, run_id = os.getpid(), uuid.uuid4().hex[:12]
        for _ in range(20):  # every lost race re-reads what won it
            now = time.time()
            record = LeaseRecord(
                job=job, attempt=attempt, pid=me, pid_start=_process_start(me), run_id=run_id,
                acquired_at=now, renewed_at=now, expires_at=now + seconds, **_host_identity(),
            )  # fmt: skip
            current = with_retries(cas.read, what=f"reading {store.uri_for(LEASE_FILE)}")
            why = None
            if current is not None:
                try:
                    held = LeaseRecord.from_json(current[0])
                except (ValueError, TypeError, KeyError):
                    held, why = None, "unreadable"
                if held is not None and held.run_id == run_id:  # our own write, its answer lost
                    lease = cls(store, held, current[1], seconds)
                    if renew:
                        lease.start_renewing()
                    return lease
                if held is not None:
                    why = _takeover_reason(held, job=job, attempt=attempt, now=now)
                    if why is None:
                        raise LeaseHeld(
                            f"spec.output.uri {store.uri}: another run is writing this output ({held.holder}); "
                            f"its lease {store.uri_for(LEASE_FILE)} is valid until {_iso(held.expires_at)} "
                            f"unless renewed; stop that run, wait, or write elsewhere (--output)"
                        )
            data, expected = record.to_json(), None if current is None else current[1]
            try:
                etag = with_retries(
                    lambda data=data, expected=expected: cas.write(data, expected),
                    what=f"writing {store.uri_for(LEASE_FILE)}",
                )
            except _Conflict:
                continue
            lease = cls(store, record, etag, seconds)
            if current is not None and why != "released":
                lease.took_over = f"{held.holder if held else 'an unreadable lease'} ({why})"
                log.warning("took over the lease %s from %s", lease.uri, lease.took_over)
            if renew:
                lease.start_renewing()
            return lease
        raise StoreError(f"could not take the lease {store.uri_for(LEASE_FILE)}: it keeps changing")

    # ------------------------------------------------------------ renewing
    def renew(self) -> bool:
        """Extend the lease; False (and `lost` says why) when another run took it."""
        with self._lock:
            if self.lost is not None or self.record.released:
                return False
            now = time.time()
            record = LeaseRecord(
                **{**asdict(self.record), "renewed_at": now, "expires_at": now + self.seconds}
            )
            try:
                self.etag = _cas(self.store, LEASE_FILE).write(record.to_json(), self.etag)
            except _Conflict:
                current = _cas(self.store, LEASE_FILE).read()
                other = "the lease was removed"
                if current is not None:
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        other = f"now held by {LeaseRecord.from_json(current[0]).holder}"
                self.lost = f"this run lost the lease {self.uri} ({other}); another run writes the output"
                log.error("%s", self.lost)
                return False
            self.record = record
            return True

    def start_renewing(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.seconds / 3):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # the store is down: try again; it expires if it stays down
                    log.warning("could not renew the lease %s: %s", self.uri, e)

        self._thread = threading.Thread(target=loop, name="kubetune-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Mark the lease released (a conditional write: never someone else's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self.lost is not None or self.record.released:
                return
            record = LeaseRecord(**{**asdict(self.record), "released": True, "expires_at": time.time()})
            try:
                self.etag = _cas(self.store, LEASE_FILE).write(record.to_json(), self.etag)
                self.record = record
            except _Conflict:
                pass
            except Exception as e:  # it expires by itself
                log.warning("could not release the lease %s: %s", self.uri, e)


def _takeover_reason(held: LeaseRecord, *, job: str, attempt: int, now: float) -> str | None:
    if held.released:
        return "released"
    if held.job == job and attempt > 0 and attempt > held.attempt:
        return f"attempt {attempt} replaces attempt {held.attempt}"
    if held.dead():
        return "its process is gone"
    if now >= held.expires_at:
        return f"expired at {_iso(held.expires_at)}"
    return None


def lease_callback(lease: Lease) -> Any:
    """A TrainerCallback (rank 0) that stops the run at the next step once the lease is lost."""
    from transformers import TrainerCallback

    class LeaseCallback(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if lease.lost is not None:
                raise JobError(lease.lost)
            return control

    return LeaseCallback()


__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "ENV_LEASE_SECONDS",
    "LEASE_FILE",
    "Lease",
    "LeaseHeld",
    "LeaseRecord",
    "lease_callback",
]
