"""Getting an input here: a URI's local path, fetching s3:// into the one cache layout.

    path = to_local("s3://bucket/models/qwen", spec.storage.s3, field="spec.model.uri")

Every input the trainer reads (the model, its adapter and tokenizer, the dataset, the checkpoint it
resumes from) comes through :func:`fetch_tree`: the files go to a temporary directory next to the
destination, every size (and whatever the caller's `verify` checks, e.g. sha256 or safetensors
completeness) is checked, :data:`kubetune.locations.COMPLETE_MARKER` is written last and the
directory is renamed into place, under a file lock, so ranks sharing a node fetch once and a killed
download is never mistaken for a complete one. Where a URI's copy lives is
:func:`kubetune.locations.cache_path`; a local URI (file://, a path, pvc://) is used in place
(:func:`kubetune.locations.local_path`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.locations import COMPLETE_MARKER, cache_path, local_path
from kubetune.uris import Uri, parse_uri
from kubetune_trainer.errors import JobError
from kubetune_trainer.store import ObjectNotFound, ObjectStore, StoreError, open_store, with_retries

if TYPE_CHECKING:
    from kubetune.spec import S3Storage

log = logging.getLogger("kubetune.locations")


class IncompleteFetch(ValueError):
    """What arrived is not what the store listed (or fails the caller's check); the message says which."""


def read_marker(dest: Path) -> dict[str, Any] | None:
    """The record a complete fetch left in `dest`, or None (absent, or unreadable: fetch again)."""
    try:
        doc = json.loads((dest / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_tree(
    store: ObjectStore,
    files: dict[str, int],
    dest: Path,
    *,
    record: dict[str, Any],
    what: str,
    reuse: Callable[[dict[str, Any]], bool] | None = None,
    verify: Callable[[Path], list[str]] | None = None,
    workers: int = 4,
) -> Path:
    """Download `files` ({key: size}, keys relative to `store`) into `dest`, complete or not at all.

    `record` is written into the marker (with the files); `reuse(marker)` says whether an existing
    complete copy will do (default: it holds the same files). `verify(tmp_dir)` returns problems
    beyond the sizes (checked always). Raises IncompleteFetch (nothing is left behind), ObjectNotFound
    when a listed object vanished, StoreError from the store; disk space is checked first (JobError).
    """
    reuse = reuse or (lambda marker: marker.get("files") == files)

    def done() -> bool:
        marker = read_marker(dest)
        return marker is not None and reuse(marker)

    if done():
        return dest
    with _file_lock(dest.with_name(dest.name + ".lock")):
        if done():  # another rank of this node finished while we waited
            return dest
        from kubetune_trainer.diskspace import ensure_free_space

        total = sum(files.values())
        # fail before the first byte, not with a truncated shard half-way
        ensure_free_space(dest.parent, total, what)
        tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("%s: %d files, %.1f MB from %s", what, len(files), total / 1e6, store.uri)
        try:
            ObjectStore._parallel(
                [
                    lambda k=k: with_retries(
                        lambda: store.get_file(k, tmp / k), what=f"download {store.uri_for(k)}"
                    )
                    for k in files
                ],
                workers,
            )
            problems = _size_problems(tmp, files) or (verify(tmp) if verify else [])
            if problems:
                raise IncompleteFetch("; ".join(problems[:5]))
            (tmp / COMPLETE_MARKER).write_text(json.dumps({**record, "files": files}, indent=1) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest


def _size_problems(root: Path, files: dict[str, int]) -> list[str]:
    out = []
    for key, size in files.items():
        p = root / key
        got = p.stat().st_size if p.is_file() else None
        if got != size:
            out.append(f"{key} is incomplete ({'nothing' if got is None else got} of {size} bytes)")
    return out


def fetch(
    uri: str,
    s3: S3Storage | None = None,
    *,
    field: str,
    select: Callable[[list[str]], list[str]] | None = None,
    verify: Callable[[Path], list[str]] | None = None,
) -> Path:
    """An s3:// object or prefix in the local cache (:func:`kubetune.locations.cache_path`).

    A prefix comes back as the directory of the objects under it, keeping their relative paths; a
    URI naming one object as the path of that file (in its own cache directory). `select(keys)`
    picks which of the listed keys to fetch (all by default; it may raise JobError when none fit);
    a later fetch that selects more fetches again. A complete copy is reused without asking the store.
    A user-fixable problem (nothing there, access denied, an incomplete object) is a JobError naming
    `field` (when given); an unreachable store stays a TransientStoreError (a later attempt may succeed).
    """
    u = parse_uri(uri)
    if u.scheme != "s3":
        raise ValueError(f"fetch takes s3:// URIs, got {uri}")
    dest = cache_path(uri)
    pick = select or (lambda keys: keys)

    def covered(marker: dict[str, Any]) -> bool:
        if marker.get("single"):
            return True
        listing = marker.get("listing")
        return isinstance(listing, dict) and set(pick(sorted(listing))) <= set(marker.get("files") or {})

    marker = read_marker(dest)
    if marker is not None and covered(marker):
        return _result(dest, marker)
    try:
        store = open_store(uri, s3)
        listing = with_retries(lambda: store.sizes(""), what=f"listing {uri}")
        single = None
        if not listing:  # not a prefix: perhaps the URI names one object
            parent_key, _, name = u.path.rpartition("/")
            parent = open_store(str(Uri("s3", u.netloc, parent_key)), s3)
            if name and with_retries(lambda: parent.exists(name), what=f"looking up {uri}"):
                store, single = parent, name
                listing = {name: with_retries(lambda: parent.size(name), what=f"looking up {uri}")}
        if not listing:
            raise JobError(f"{_at(field)}{uri}: no such object or prefix")
        keys = [single] if single else pick(sorted(listing))
        files = {k: listing[k] for k in keys}
        record = {"uri": uri, "listing": listing, "single": single}
        fetch_tree(
            store, files, dest, record=record, what=f"{_at(field)}downloading {uri}", verify=verify,
            reuse=lambda m: covered(m) and set(m.get("listing") or {}) == set(listing),
        )  # fmt: skip
    except IncompleteFetch as e:
        raise JobError(f"{_at(field)}{uri}: {e}") from None
    except ObjectNotFound as e:
        raise JobError(f"{_at(field)}{uri}: {e} (deleted while it was fetched?)") from None
    except StoreError as e:
        from kubetune_trainer.store import is_transient

        if is_transient(e):
            raise
        raise JobError(f"{_at(field)}{uri}: {e}") from None
    return _result(dest, read_marker(dest) or {})


def _at(field: str) -> str:
    """ "spec.model.uri: " to start a message with ("" where the caller names the place itself)."""
    return f"{field}: " if field else ""


def _result(dest: Path, marker: dict[str, Any]) -> Path:
    single = marker.get("single")
    return dest / single if single else dest


def to_local(
    uri: str,
    s3: S3Storage | None = None,
    *,
    field: str,
    select: Callable[[list[str]], list[str]] | None = None,
    verify: Callable[[Path], list[str]] | None = None,
) -> Path:
    """The local path of a file://, plain-path, pvc:// or s3:// input (s3:// fetched; see `fetch`).

    A local URI that does not exist is a JobError naming `field` (for pvc://, asking whether the
    claim is mounted); hf:// is not a location (model_loading and data_sources load hub ids).
    """
    try:
        u = parse_uri(uri)
    except ValueError as e:
        raise JobError(f"{_at(field)}{e}") from None
    if u.scheme == "s3":
        return fetch(uri, s3, field=field, select=select, verify=verify)
    path = local_path(u)
    if path is None:
        raise JobError(f"{_at(field)}{uri} is a Hugging Face hub id, not a location")
    if not path.exists():
        hint = " (is the claim mounted in this pod?)" if u.scheme == "pvc" else ""
        raise JobError(f"{_at(field)}{uri}: no such file or directory{hint}")
    return path


__all__ = ["IncompleteFetch", "fetch", "fetch_tree", "read_marker", "to_local"]
