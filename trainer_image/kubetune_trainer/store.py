"""One small object-store interface for checkpoints, outputs and inputs: file://, pvc://, plain paths, s3://.

    store = open_store("s3://bucket/jobs/x", job.spec.storage.s3)
    store.put_bytes("progress.json", b"{...}")
    store.list("checkpoints/")           # keys under the store's root, relative to it
    store.download_dir("checkpoints/step-00000100", "/tmp/ckpt")

Keys are POSIX paths relative to the URI the store was opened at ("a/b.bin", never a leading "/").
Every write is atomic for readers: a reader sees the whole new object or the old one, never a part
(S3 objects are like that; the local store writes a temporary file and renames it).

S3 settings come from `spec.storage.s3` (endpoint, region, addressing style). Credentials, first match:
files AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) in the directory named by
$KUBETUNE_S3_CREDENTIALS_DIR (where the operator mounts the job's credentials Secret), else the
default directory /var/run/secrets/kubetune/s3 when it holds them, else boto3's own chain
(environment, web identity / IRSA, instance profile). Secrets are never logged or put in messages.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import random
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from kubetune.conventions import ENV_S3_CREDENTIALS_DIR, S3_CREDENTIALS_DIR
from kubetune.locations import local_path
from kubetune.uris import Uri, parse_uri

if TYPE_CHECKING:
    from kubetune.spec import S3Storage

log = logging.getLogger("kubetune.store")

# Where the operator mounts the credentials Secret (keys as file names); the env var overrides it.
DEFAULT_S3_CREDENTIALS_DIR = S3_CREDENTIALS_DIR

T = TypeVar("T")


class StoreError(RuntimeError):
    """An object-store operation failed for a reason retrying will not fix (names bucket and endpoint)."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist."""


class TransientStoreError(StoreError):
    """The store is unreachable or overloaded right now (connection error, 5xx, throttling)."""


class TransferAbandoned(StoreError):
    """An upload given up on purpose part-way (its `should_stop` turned true); nothing was written."""


def _clean_key(key: str) -> str:
    key = key.replace("\\", "/").lstrip("/")
    parts = [p for p in key.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"object key {key!r} must not contain '..'")
    out = "/".join(parts)
    return out + "/" if key.endswith("/") and out else out


class ObjectStore(ABC):
    """A flat key -> bytes store rooted at a URI. Keys are relative to the root."""

    uri: str

    # -- the primitives every backend implements
    @abstractmethod
    def put_file(
        self, local: str | os.PathLike, key: str, *, should_stop: Callable[[], bool] | None = None
    ) -> None:
        """Upload a local file to `key` (atomically replaces an existing object).

        `should_stop`: polled while the bytes go out; when it turns true the upload stops part-way
        (TransferAbandoned) and leaves no object (a slow upload must not delay a more urgent one).
        """

    @abstractmethod
    def get_file(self, key: str, local: str | os.PathLike) -> Path:
        """Download `key` to the local path (parents created; written atomically). ObjectNotFound if absent."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write bytes to `key` (atomically)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read `key`. ObjectNotFound if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) of every object whose key starts with `prefix`.

        Pass "dir/" for the objects under a directory-like prefix; "dir" also matches "dir2/x".
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object `key` exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete `key`; no error when it is absent."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of `key` in bytes. ObjectNotFound if absent."""

    # -- built from the primitives (backends may do better)
    def sizes(self, prefix: str = "") -> dict[str, int]:
        """{key: size in bytes} for every object whose key starts with `prefix` (one listing on S3)."""
        return {k: self.size(k) for k in self.list(prefix)}

    def fingerprints(self, prefix: str = "") -> dict[str, str]:
        """{key: a string that changes when the object does} for every object under `prefix`, without
        reading them (S3: ETag and size from one listing; elsewhere the size)."""
        return {k: str(v) for k, v in self.sizes(prefix).items()}

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Names of the immediate 'subdirectories' under `prefix` (e.g. ["step-00000100", ...]), sorted."""
        prefix = _clean_key(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        names = set()
        for key in self.list(prefix):
            rest = key[len(prefix) :]
            if "/" in rest:
                names.add(rest.split("/", 1)[0])
        return sorted(names)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; returns how many."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def upload_dir(
        self, local_dir: str | os.PathLike, prefix: str, *, exclude: Iterable[str] = (), workers: int = 4
    ) -> list[str]:
        """Upload every file under `local_dir` to `prefix/<relative path>`; returns the keys written.

        `exclude`: relative paths not to upload (e.g. a marker the caller writes last itself).
        """
        root = Path(local_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        skip = {str(x).replace("\\", "/") for x in exclude}
        jobs = []
        for path in sorted(root.rglob("*")):
            if path.is_file():
                rel = path.relative_to(root).as_posix()
                if rel not in skip:
                    jobs.append((path, self._join(prefix, rel)))
        self._parallel([lambda p=p, k=k: self.put_file(p, k) for p, k in jobs], workers)
        return [k for _, k in jobs]

    def download_dir(self, prefix: str, local_dir: str | os.PathLike, *, workers: int = 4) -> Path:
        """Download every object under `prefix/` into `local_dir`, keeping the relative layout."""
        prefix = _clean_key(prefix)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out = Path(local_dir)
        out.mkdir(parents=True, exist_ok=True)
        keys = self.list(prefix)
        self._parallel([lambda k=k: self.get_file(k, out / k[len(prefix) :]) for k in keys], workers)
        return out

    def uri_for(self, key: str = "") -> str:
        """The full URI of `key` (for messages and status)."""
        key = _clean_key(key)
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def sub(self, prefix: str) -> ObjectStore:
        """A store rooted at `prefix` under this one."""
        return _SubStore(self, prefix)

    @staticmethod
    def _join(prefix: str, key: str) -> str:
        prefix = _clean_key(prefix).rstrip("/")
        key = _clean_key(key)
        return f"{prefix}/{key}" if prefix else key

    @staticmethod
    def _parallel(calls: list[Callable[[], Any]], workers: int) -> None:
        if workers <= 1 or len(calls) <= 1:
            for c in calls:
                c()
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(calls))) as pool:
            futures = [pool.submit(c) for c in calls]
            for f in futures:
                f.result()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class _SubStore(ObjectStore):
    def __init__(self, parent: ObjectStore, prefix: str) -> None:
        self.parent = parent
        self.prefix = _clean_key(prefix).rstrip("/")
        self.uri = parent.uri_for(self.prefix)

    def _k(self, key: str) -> str:
        return self._join(self.prefix, key) if key else (self.prefix + "/" if self.prefix else "")

    def put_file(
        self, local: str | os.PathLike, key: str, *, should_stop: Callable[[], bool] | None = None
    ) -> None:
        self.parent.put_file(local, self._k(key), should_stop=should_stop)

    def get_file(self, key: str, local: str | os.PathLike) -> Path:
        return self.parent.get_file(self._k(key), local)

    def put_bytes(self, key: str, data: bytes) -> None:
        self.parent.put_bytes(self._k(key), data)

    def get_bytes(self, key: str) -> bytes:
        return self.parent.get_bytes(self._k(key))

    def list(self, prefix: str = "") -> list[str]:
        base = self.prefix + "/" if self.prefix else ""
        full = base + _clean_key(prefix)
        return [k[len(base) :] for k in self.parent.list(full)]

    def exists(self, key: str) -> bool:
        return self.parent.exists(self._k(key))

    def delete(self, key: str) -> None:
        self.parent.delete(self._k(key))

    def size(self, key: str) -> int:
        return self.parent.size(self._k(key))

    def delete_prefix(self, prefix: str) -> int:
        base = self.prefix + "/" if self.prefix else ""
        return self.parent.delete_prefix(base + _clean_key(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = self.prefix + "/" if self.prefix else ""
        return {k[len(base) :]: v for k, v in self.parent.sizes(base + _clean_key(prefix)).items()}

    def fingerprints(self, prefix: str = "") -> dict[str, str]:
        base = self.prefix + "/" if self.prefix else ""
        return {k[len(base) :]: v for k, v in self.parent.fingerprints(base + _clean_key(prefix)).items()}


# ---------------------------------------------------------------- local files (file://, paths, pvc://)


class LocalStore(ObjectStore):
    """A directory on a local or mounted file system (a PVC, NFS, a developer's disk)."""

    def __init__(self, root: str | os.PathLike, uri: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = uri or str(self.root)

    def path(self, key: str) -> Path:
        """The local path of `key` (no copy needed to read it)."""
        return self.root / _clean_key(key).rstrip("/")

    def put_file(
        self, local: str | os.PathLike, key: str, *, should_stop: Callable[[], bool] | None = None
    ) -> None:
        del should_stop  # a local copy is quick
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get_file(self, key: str, local: str | os.PathLike) -> Path:
        src = self.path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist")
        return _atomic_local_write(Path(local), lambda tmp: shutil.copyfile(src, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        dst = self.path(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _atomic_local_write(dst, lambda tmp: Path(tmp).write_bytes(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def list(self, prefix: str = "") -> list[str]:
        prefix = _clean_key(prefix)
        # Walk the deepest directory that contains every match, then filter by the raw prefix.
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / base_rel if base_rel else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an atomic write in progress
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    out.append(rel)
        return sorted(out)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.uri_for(key)} does not exist") from None

    def delete(self, key: str) -> None:
        p = self.path(key)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        self._prune_empty_dirs(p.parent)

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(prefix)
        clean = _clean_key(prefix)
        if clean.endswith("/"):
            d = self.path(clean)
            if d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                self._prune_empty_dirs(d.parent)
        return n

    def _prune_empty_dirs(self, d: Path) -> None:
        while d != self.root and self.root in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent


def _atomic_local_write(dst: Path, write: Callable[[str], Any]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dst


# ---------------------------------------------------------------- S3


_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests", "500", "502", "503", "504",
}  # fmt: skip
_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "AuthorizationHeaderMalformed", "403", "Forbidden",
}  # fmt: skip


def read_credentials_dir(directory: str | os.PathLike) -> dict[str, str] | None:
    """Credentials from a mounted Secret: files AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY [, AWS_SESSION_TOKEN]."""
    d = Path(directory)
    key_id, secret = d / "AWS_ACCESS_KEY_ID", d / "AWS_SECRET_ACCESS_KEY"
    if not (key_id.is_file() and secret.is_file()):
        return None
    creds = {
        "aws_access_key_id": key_id.read_text().strip(),
        "aws_secret_access_key": secret.read_text().strip(),
    }
    token = d / "AWS_SESSION_TOKEN"
    if token.is_file() and token.read_text().strip():
        creds["aws_session_token"] = token.read_text().strip()
    return creds


def _credentials() -> tuple[dict[str, str], str]:
    """(boto3 credential kwargs, a description of where they came from — never the values)."""
    env_dir = os.environ.get(ENV_S3_CREDENTIALS_DIR)
    if env_dir:
        creds = read_credentials_dir(env_dir)
        if creds is None:
            raise StoreError(
                f"${ENV_S3_CREDENTIALS_DIR}={env_dir} holds no AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY files"
            )
        return creds, f"files in ${ENV_S3_CREDENTIALS_DIR} ({env_dir})"
    creds = read_credentials_dir(DEFAULT_S3_CREDENTIALS_DIR)
    if creds is not None:
        return creds, f"files in {DEFAULT_S3_CREDENTIALS_DIR}"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}, "the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables"
    return {}, "boto3's default chain (web identity, profile, instance metadata)"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed (connection problems, timeouts, 5xx, throttling)."""
    if isinstance(exc, TransientStoreError):
        return True
    if isinstance(exc, StoreError):
        return False
    try:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
    except ImportError:  # pragma: no cover - boto3 is a trainer dependency
        return isinstance(exc, (ConnectionError, TimeoutError))
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, NoCredentialsError):
        return False
    if isinstance(exc, BotoCoreError):
        return "timeout" in type(exc).__name__.lower() or "connection" in type(exc).__name__.lower()
    # boto3's transfer manager wraps failures of parts in its own exceptions
    if type(exc).__name__ in ("S3UploadFailedError", "RetriesExceededError"):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError))


def worst_case_wait(attempts: int, base_delay: float = 0.5, max_delay: float = 30.0) -> float:
    """The most seconds :func:`with_retries` sleeps in all before giving up after `attempts` calls."""
    return sum(min(max_delay, base_delay * 2 ** (k - 1)) for k in range(1, attempts))


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = 8,
    deadline: float | None = None,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> T:
    """Call `fn` until it succeeds, retrying transient store errors with exponential backoff and jitter.

    This is kubetune's one retry loop for the object store (checkpoint uploads and downloads, fetched
    inputs, the lease, the write probe all go through it; nothing retries around it). Worst case:

    - `attempts`=N: at most N calls of `fn`, and between them at most
      :func:`worst_case_wait` (N) seconds of sleep in all: try k waits
      min(max_delay, base_delay * 2**(k-1)) times a jitter in [0.5, 1]. The defaults (8, 0.5 s, 30 s)
      sleep at most 61.5 s. Each call is itself one store request that botocore may try up to
      S3Store's `max_attempts` times before it counts as one failure here.
    - `deadline` (a time.monotonic() value): no sleep reaches past it; the last error is raised at
      the first failure after it. attempts=None retries until `deadline` or `should_stop()`.

    Non-transient errors (bad credentials, missing bucket) are raised at once, after one call.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            out_of_attempts = attempts is not None and attempt >= attempts
            out_of_time = deadline is not None and time.monotonic() >= deadline
            stopped = should_stop is not None and should_stop()
            if out_of_attempts or out_of_time or stopped:
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - time.monotonic()))
            log.warning("%s failed (%s: %s); retry %d in %.1fs", what, type(e).__name__, e, attempt, delay)
            sleep(delay)


class S3Store(ObjectStore):
    """An s3:// prefix through boto3 (AWS, MinIO, SeaweedFS, Ceph RGW ...)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        settings: S3Storage | None = None,
        *,
        multipart_threshold: int = 64 * 1024 * 1024,
        multipart_chunksize: int = 16 * 1024 * 1024,
        max_concurrency: int = 8,
        max_attempts: int = 6,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        credentials: dict[str, str] | None = None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = _clean_key(prefix).rstrip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint = settings.endpoint if settings else None
        region = settings.region if settings else None
        style = settings.addressing_style if settings else "auto"
        self.endpoint = (
            endpoint
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS S3"
        )
        if credentials is not None:  # explicit (tests, tools); pods use the Secret files or the environment
            creds, self.credentials_source = dict(credentials), "the credentials given to open_store"
        else:
            creds, self.credentials_source = _credentials()
        session = boto3.session.Session(**creds)
        config = Config(
            region_name=region,
            # botocore retries throttling, 5xx and connection errors with exponential backoff itself
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, max_concurrency * 2),
            s3={"addressing_style": style},
            signature_version="s3v4",
        )
        self.client = session.client("s3", endpoint_url=endpoint, config=config)
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=True,
        )

    def _key(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, e: Exception, op: str, key: str | None = None) -> Exception:
        """Turn a boto error into one that names bucket, key and endpoint, and never a secret."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}" if key is not None else f"bucket {self.bucket!r}"
        at = f"at endpoint {self.endpoint}"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"{op} {where} {at}: no S3 credentials found (looked in {self.credentials_source}); set "
                f"storage.s3.credentials_secret or give the pod an identity"
            )
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "NoSuchBucket":
                return StoreError(f"{op} {where} {at}: bucket {self.bucket!r} does not exist")
            if code in ("NoSuchKey", "404", "NotFound"):
                if key is None:
                    return StoreError(f"{op} {where} {at}: bucket {self.bucket!r} does not exist")
                return ObjectNotFound(f"s3://{self.bucket}/{self._key(key)} does not exist ({at})")
            if code in _AUTH_CODES:
                return StoreError(
                    f"{op} {where} {at}: access denied ({code}); check the credentials from "
                    f"{self.credentials_source} and their permissions on bucket {self.bucket!r}"
                )
            if is_transient(e):
                return TransientStoreError(f"{op} {where} {at}: {code or status} (transient)")
            return StoreError(
                f"{op} {where} {at}: {code or status}: {e.response.get('Error', {}).get('Message', '')}"
            )
        if is_transient(e):
            return TransientStoreError(f"{op} {where} {at}: cannot reach the store ({type(e).__name__}: {e})")
        return e

    def _call(self, op: str, key: str | None, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as e:
            err = self._error(_unwrap(e), op, key)
            if err is e:
                raise
            raise err from e

    def put_file(
        self, local: str | os.PathLike, key: str, *, should_stop: Callable[[], bool] | None = None
    ) -> None:
        def progress(_sent: int) -> None:  # boto3's transfer callback: raising aborts the upload
            if should_stop is not None and should_stop():
                raise TransferAbandoned(f"upload to {self.uri_for(key)} abandoned part-way")

        self._call(
            "upload to",
            key,
            lambda: self.client.upload_file(
                str(local), self.bucket, self._key(key), Config=self.transfer, Callback=progress
            ),
        )

    def get_file(self, key: str, local: str | os.PathLike) -> Path:
        def download(tmp: str) -> None:
            self._call(
                "download",
                key,
                lambda: self.client.download_file(self.bucket, self._key(key), tmp, Config=self.transfer),
            )

        return _atomic_local_write(Path(local), download)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            "write", key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        )

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call("read", key, get)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        base = self.prefix + "/" if self.prefix else ""

        def run() -> dict[str, int]:
            out = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.startswith(base) and not k.endswith("/"):
                        out[k[len(base) :]] = int(obj["Size"])
            return dict(sorted(out.items()))

        return self._call("list", prefix, run)

    def list(self, prefix: str = "") -> list[str]:
        return list(self.sizes(prefix))

    def fingerprints(self, prefix: str = "") -> dict[str, str]:
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        base = self.prefix + "/" if self.prefix else ""

        def run() -> dict[str, str]:
            out = {}
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.startswith(base) and not k.endswith("/"):
                        out[k[len(base) :]] = f"{obj.get('ETag', '').strip(chr(34))}:{int(obj['Size'])}"
            return dict(sorted(out.items()))

        return self._call("list", prefix, run)

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._call("stat", key, lambda: self._head(key)) is not None

    def size(self, key: str) -> int:
        head = self._call("stat", key, lambda: self._head(key))
        if head is None:
            raise ObjectNotFound(
                f"s3://{self.bucket}/{self._key(key)} does not exist (at endpoint {self.endpoint})"
            )
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]

            def run(batch: list[str] = batch) -> None:
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(k)} for k in batch], "Quiet": True},
                )
                for err in resp.get("Errors", []):
                    raise StoreError(f"delete s3://{self.bucket}/{err.get('Key')}: {err.get('Code')}")

            try:
                self._call("delete", prefix, run)
            except StoreError:
                for k in batch:  # stores without DeleteObjects: one by one
                    self.delete(k)
        return len(keys)


def _unwrap(e: Exception) -> Exception:
    """boto3's transfer manager wraps ClientErrors (S3UploadFailedError); find the original."""
    seen = e
    for _ in range(5):
        inner = seen.__cause__ or seen.__context__
        if inner is None:
            break
        from botocore.exceptions import ClientError

        if isinstance(inner, ClientError):
            return inner
        seen = inner  # type: ignore[assignment]
    if type(e).__name__ == "S3UploadFailedError":
        # the message ends with the original "An error occurred (Code) when calling ..."
        text = str(e)
        for code in ("NoSuchBucket", *sorted(_AUTH_CODES)):
            if f"({code})" in text:
                from botocore.exceptions import ClientError

                return ClientError({"Error": {"Code": code, "Message": text}}, "PutObject")
    return e


def probe_write(store: ObjectStore, field: str) -> None:
    """Put and delete a small object under `store`'s root, so that credentials that may not write
    fail before anything is loaded or trained: StoreError in one line naming `field` (the spec field
    of the location), the URI and where the credentials came from. An unreachable store raises
    TransientStoreError (a later attempt may succeed)."""
    key = f".kubetune-write-probe-{uuid.uuid4().hex[:12]}"

    def probe() -> None:
        store.put_bytes(key, b"kubetune write probe\n")
        store.delete(key)

    try:
        with_retries(probe, what=f"write probe of {store.uri}", attempts=6)
    except TransientStoreError:
        raise
    except (StoreError, OSError) as e:
        source = getattr(store, "credentials_source", None)
        creds = f"; S3 credentials from {source}" if source and source not in str(e) else ""
        raise StoreError(f"{field}: cannot write to {store.uri}: {e}{creds}") from None


# ---------------------------------------------------------------- opening


def open_store(uri: str, s3: S3Storage | None = None, **s3_options: Any) -> ObjectStore:
    """An ObjectStore rooted at `uri` (s3://bucket/prefix, file:///path, a plain path, pvc://claim/path).

    `s3` is `job.spec.storage.s3` (endpoint, region, addressing style); None means AWS defaults
    (boto3 also honours $AWS_ENDPOINT_URL). `s3_options` tune S3Store (multipart sizes, concurrency).
    """
    u: Uri = parse_uri(uri)
    if u.scheme == "s3":
        return S3Store(u.netloc, u.path, s3, **s3_options)
    if u.scheme == "hf":
        raise ValueError(f"{uri} is a Hugging Face hub id, not an object store; use s3://, file:// or pvc://")
    path = local_path(u)
    assert path is not None
    return LocalStore(path, uri=str(uri).rstrip("/") if u.scheme == "pvc" else str(path))


__all__ = [
    "ObjectStore", "LocalStore", "S3Store", "StoreError", "ObjectNotFound", "TransientStoreError", "TransferAbandoned",
    "open_store", "probe_write", "with_retries", "worst_case_wait", "is_transient", "read_credentials_dir",
    "ENV_S3_CREDENTIALS_DIR", "DEFAULT_S3_CREDENTIALS_DIR",
]  # fmt: skip
