"""The tokenized-data cache: a restart, a new attempt or another node loads the data a run built before
instead of reading and tokenizing the dataset again.

    data, outcome = cached_build_data(recipe, job, tokenizer, seed=42, device_type="cpu")

An entry lives in the job's output store, ``<output>/cache/data/<key>/``
(:data:`kubetune.locations.DATA_CACHE_DIR`): ``train/`` (and ``eval/``) written by ``datasets``'
``save_to_disk`` (Arrow), then ``COMMITTED`` last (what the recipe built besides the rows: counts,
end-of-turn ids, pad id; and every file's size). Only a committed entry is read. The key is a digest of
everything that changes the rows (:func:`key_inputs`):

- the tokenizer: a digest of its files (or, for one built in memory, of its serialised vocabulary),
  its special tokens, chat template and size;
- the data: every file of ``dataset.uri`` and each ``dataset.mix`` source, by content digest (local
  files) or ETag and size (s3://, one listing, nothing downloaded);
- the spec: the whole ``dataset`` block but its URIs, ``training.seq_length / packing /
  group_by_length / seed``, the method, and any dotted spec paths a recipe lists in its
  ``data_key_fields``;
- the code that builds the data (the data pipeline's and the recipes' source files).

Rank 0 of a run builds a missing entry and writes it, with a ``BUILDING`` marker while it does;
other ranks wait for its ``COMMITTED`` (``$KUBETUNE_DATA_CACHE_WAIT_SECONDS``, default 900) and read
it, and build the data themselves (without writing) when rank 0 announces no build within a minute,
gives up writing, or takes longer than that.

A hit on a local output memory-maps the entry in place; an s3:// entry is fetched once per node into
``$KUBETUNE_CACHE_DIR/data/<key>/`` (the node that wrote it keeps its copy there). The start that
builds an entry trains on it too, memory-mapped, so the rows are not held in the process, and hands
the memory tokenizing used back to the OS (:func:`release_build_memory`). Loading gives the same rows
in the same order as the build that wrote them, so a resumed run sees exactly the batches it would
have seen.

Not cached: ``dataset.streaming`` (read as it is trained) and ``hf://`` datasets (no cheap digest).
An entry that cannot be read (missing or truncated files, a bad marker) is rebuilt after one warning
line; a cache that cannot be written costs a warning, never the run. Entries of other keys are left
in place (delete ``<output>/cache/`` to reclaim the space).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.locations import (
    CACHE_DATA_DIR,
    COMMITTED_FILE,
    DATA_CACHE_DIR,
    cache_root,
    local_path,
    output_uri,
)
from kubetune.uris import parse_uri

if TYPE_CHECKING:
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.recipes.base import Recipe
    from kubetune_trainer.store import ObjectStore

log = logging.getLogger("kubetune.data")

ENV_WAIT = "KUBETUNE_DATA_CACHE_WAIT_SECONDS"
_DEFAULT_WAIT = 900.0
_POLL = 1.0
_BUILDING_GRACE = 60.0  # how long another rank waits for rank 0 to announce its build
BUILDING_FILE = "BUILDING"  # rank 0 is building this entry; removed once COMMITTED is written
# spec.training fields that change the rows (the others change how they are trained on)
TRAINING_FIELDS = ("seq_length", "packing", "group_by_length", "seed")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
# the data pipeline: a change to any of these changes what a build produces
_CODE = (
    "datasets_build.py",
    "chat_render.py",
    "formats.py",
    "packing.py",
    "data_sources.py",
    "data_cache.py",
)
_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class CacheOutcome:
    """What the cache did for one build: ``hit``, ``miss`` (built; written when `wrote`), ``rebuilt``
    (the entry was unreadable), ``off`` (not cacheable; `reason` says why)."""

    status: str
    uri: str | None = None
    reason: str = ""
    wrote: bool = False

    def describe(self) -> str:
        if self.status == "hit":
            return f"data cache: hit, {self.uri} (not tokenized again)"
        if self.status == "off":
            return f"data cache: not used ({self.reason})"
        what = "rebuilt" if self.status == "rebuilt" else "miss"
        done = (
            f"written to {self.uri}" if self.wrote else f"not written ({self.reason})" if self.reason else ""
        )
        return f"data cache: {what}, tokenized; {done}".rstrip("; ")


class _Corrupt(Exception):
    """An entry that is there but cannot be read; the message says why."""


# ---------------------------------------------------------------- the key


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@cache
def _cached_file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return _file_digest(Path(path))


def file_digest(path: Path) -> str:
    """sha256 of a file's content (remembered in this process while size, mtime and inode stay)."""
    st = path.stat()
    return _cached_file_digest(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def source_digest(uri: str, s3: Any = None) -> dict[str, str] | None:
    """{file: digest} of what a data URI reads, or None where no cheap digest exists (hf://, or
    nothing there: the build says what is wrong)."""
    u = parse_uri(uri)
    if u.scheme == "hf":
        return None
    if u.scheme == "s3":
        from kubetune.uris import Uri
        from kubetune_trainer.data_sources import _data_keys
        from kubetune_trainer.store import open_store, with_retries

        store = open_store(uri, s3)
        listing = with_retries(lambda: store.fingerprints(""), what=f"listing {uri}")
        if not listing:  # perhaps one object
            parent_key, _, name = u.path.rpartition("/")
            parent = open_store(str(Uri("s3", u.netloc, parent_key)), s3)
            listing = {
                k: v
                for k, v in with_retries(lambda: parent.fingerprints(name), what=f"listing {uri}").items()
                if k == name
            }
            return listing or None
        keys = _data_keys(uri)(sorted(listing))
        return {k: listing[k] for k in keys}
    path = local_path(u)
    if path is None or not path.exists():
        return None
    if path.is_file():
        return {path.name: file_digest(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return {p.relative_to(path).as_posix(): file_digest(p) for p in files}


def tokenizer_digest(tokenizer: Any) -> str:
    """A digest of what the tokenizer turns text into: its files where it was loaded from a directory
    (else its serialised vocabulary), special tokens, chat template and size."""
    h = hashlib.sha256()
    where = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    files = [where / n for n in _TOKENIZER_FILES if where.name and (where / n).is_file()]
    for f in files:
        h.update(f"{f.name}:{file_digest(f)}\n".encode())
    if not files:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        h.update(vocab.encode())
    extra = {
        "class": type(tokenizer).__name__,
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.eos_token_id,
        "bos": getattr(tokenizer, "bos_token_id", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "size": len(tokenizer),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


@cache
def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for p in [*(here / n for n in _CODE), *sorted((here / "recipes").glob("*.py"))]:
        if p.is_file():
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _dotted(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj


def key_inputs(recipe: Recipe, job: Any, tokenizer: Any, *, seed: int) -> tuple[dict[str, Any] | None, str]:
    """(everything the rows depend on, ""), or (None, why the data cannot be cached)."""
    spec = job.spec
    ds = spec.dataset
    if ds.streaming:
        return None, "dataset.streaming reads the data as it trains"
    s3 = _s3(spec)
    sources = []
    for field, src in [
        ("spec.dataset.uri", ds),
        *((f"spec.dataset.mix[{i}].uri", m) for i, m in enumerate(ds.mix)),
    ]:
        digest = source_digest(src.uri, s3)
        if digest is None:
            return None, f"{field}: {src.uri} is not a file or directory here, or a hub id (no cheap digest)"
        sources.append(digest)
    dataset = ds.model_dump(mode="json", exclude={"uri", "mix"})
    dataset["mix"] = [m.model_dump(mode="json", exclude={"uri"}) for m in ds.mix]
    inputs = {
        "recipe": f"{type(recipe).__module__}.{type(recipe).__qualname__}",
        "method": spec.method,
        "seed": seed,
        "dataset": dataset,
        "training": {f: getattr(spec.training, f) for f in TRAINING_FIELDS},
        "recipe_fields": {f: _dotted(spec, f) for f in getattr(recipe, "data_key_fields", ())},
        "data": sources,
        "tokenizer": tokenizer_digest(tokenizer),
        "code": _code_digest(),
    }
    return inputs, ""


def data_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- reading and writing entries


def _meta(
    built: BuiltData, pad_id: int | None, files: dict[str, int], inputs: dict[str, Any]
) -> dict[str, Any]:
    return {
        "stats": built.stats.as_dict(),
        "method": built.method,
        "packed": built.packed,
        "end_of_turn_token_ids": list(built.end_of_turn_token_ids),
        "collator": built.data_collator is not None,
        "pad_token_id": pad_id,
        "rows": {
            s: len(d)
            for s, d in zip(_SPLITS, (built.train_dataset, built.eval_dataset), strict=True)
            if d is not None
        },
        "files": files,
        "inputs": {k: v for k, v in inputs.items() if k not in ("data",)},
        "created": time.time(),
    }


def _read_marker(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The entry's COMMITTED record; None when not committed; _Corrupt when unreadable."""
    from kubetune_trainer.store import ObjectNotFound

    try:
        raw = store.get_bytes(f"{key}/{COMMITTED_FILE}")
    except ObjectNotFound:
        return None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "stats" not in meta:
            raise ValueError("not a cache record")
    except ValueError as e:
        raise _Corrupt(f"{COMMITTED_FILE} is unreadable ({e})") from None
    return meta


def _local_entry(store: ObjectStore, key: str, meta: dict[str, Any], cache_uri: str) -> Path:
    """The entry's directory on this machine: in place for a local output, else fetched once per node."""
    from kubetune_trainer.locations import IncompleteFetch, fetch_tree
    from kubetune_trainer.store import LocalStore, ObjectNotFound

    files = {str(k): int(v) for k, v in meta["files"].items()}
    if isinstance(store, LocalStore):
        root = store.path(key)
        for rel, size in files.items():
            p = root / rel
            got = p.stat().st_size if p.is_file() else None
            if got != size:
                raise _Corrupt(f"{rel} is {'missing' if got is None else f'{got} of {size} bytes'}")
        return root
    dest = cache_root() / CACHE_DATA_DIR / key
    try:
        return fetch_tree(
            store.sub(key), files, dest, record={"uri": f"{cache_uri}/{key}"},
            what=f"data cache: fetching {cache_uri}/{key}",
        )  # fmt: skip
    except (IncompleteFetch, ObjectNotFound) as e:
        raise _Corrupt(str(e)) from None


def _load(root: Path, meta: dict[str, Any], device_type: str) -> BuiltData:
    import datasets

    from kubetune_trainer.datasets_build import BuiltData, DataStats, pad_multiple
    from kubetune_trainer.packing import DataCollator

    loaded: dict[str, Any] = {}
    for split, n in meta.get("rows", {}).items():
        try:
            ds = datasets.load_from_disk(str(root / split))
        except Exception as e:  # noqa: BLE001 - Arrow and datasets raise many kinds for a damaged file
            raise _Corrupt(
                f"{split}/ does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        if len(ds) != n:
            raise _Corrupt(f"{split}/ holds {len(ds)} rows, {n} were written")
        loaded[split] = ds
    if "train" not in loaded:
        raise _Corrupt("no train/ split recorded")
    stats = DataStats(**{k: v for k, v in meta["stats"].items() if k in DataStats.__dataclass_fields__})
    collator = None
    if meta.get("collator"):
        collator = DataCollator(
            pad_token_id=int(meta["pad_token_id"]), pad_to_multiple_of=pad_multiple(device_type)
        )
    return BuiltData(
        loaded["train"], loaded.get("eval"), collator, stats, meta["method"], bool(meta["packed"]), False,
        [int(i) for i in meta.get("end_of_turn_token_ids", [])],
    )  # fmt: skip


def _write(
    store: ObjectStore, key: str, built: BuiltData, pad_id: int | None, inputs: dict[str, Any], base: str
) -> None:
    """save_to_disk into local scratch, upload, then COMMITTED last. An s3:// entry's scratch copy
    stays as this node's fetched copy of it (no download on the next start here)."""
    import datasets

    from kubetune.locations import COMPLETE_MARKER
    from kubetune_trainer.store import LocalStore

    staging = cache_root() / CACHE_DATA_DIR / f".build-{key}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar per split would fill pod logs
    try:
        for split, ds in zip(_SPLITS, (built.train_dataset, built.eval_dataset), strict=True):
            if ds is not None:
                ds.save_to_disk(str(staging / split))
        files = {
            p.relative_to(staging).as_posix(): p.stat().st_size
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        store.upload_dir(staging, key)
        store.put_bytes(
            f"{key}/{COMMITTED_FILE}", json.dumps(_meta(built, pad_id, files, inputs), indent=1).encode()
        )
        if not isinstance(store, LocalStore):  # what fetch_tree would have left, marker and all
            (staging / COMPLETE_MARKER).write_text(json.dumps({"uri": f"{base}/{key}", "files": files}))
            dest = cache_root() / CACHE_DATA_DIR / key
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()


def release_build_memory() -> None:
    """Hand back to the OS what tokenizing left free: glibc keeps freed heap and Arrow's pool keeps
    freed buffers (together about half a GiB after 50k rows), which would stay in the worker's
    resident memory for the whole run."""
    import ctypes
    import gc

    gc.collect()
    try:
        import pyarrow

        pyarrow.default_memory_pool().release_unused()
    except (ImportError, AttributeError):  # pragma: no cover - pyarrow < 9
        pass
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def _s3(spec: Any) -> Any:
    return spec.storage.s3 if spec.storage is not None else None


def _pad_id(tokenizer: Any) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------- the entry point


def cache_uri(job: Any) -> str:
    """Where the job's tokenized-data entries live: ``<output>/cache/data``."""
    return output_uri(job.spec.output.uri, DATA_CACHE_DIR)


def _wait_seconds() -> float:
    try:
        return float(os.environ.get(ENV_WAIT, _DEFAULT_WAIT))
    except ValueError:
        return _DEFAULT_WAIT


def _read_entry(
    store: ObjectStore, key: str, base: str, device_type: str
) -> tuple[BuiltData | None, CacheOutcome]:
    uri = f"{base}/{key}"
    from kubetune_trainer.store import StoreError

    try:
        meta = _read_marker(store, key)
        if meta is None:
            return None, CacheOutcome("miss", uri)
        return _load(_local_entry(store, key, meta, base), meta, device_type), CacheOutcome("hit", uri)
    except _Corrupt as e:
        log.warning("data cache %s: %s; tokenizing again", uri, e)
        return None, CacheOutcome("rebuilt", uri, reason=str(e))
    except StoreError as e:
        log.warning("data cache %s: cannot be read (%s); tokenizing again", uri, e)
        return None, CacheOutcome("miss", uri, reason=str(e))


def lookup(
    recipe: Recipe, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu"
) -> tuple[BuiltData | None, CacheOutcome, dict[str, Any] | None]:
    """(the cached data or None, what happened, the key inputs): reads, never writes."""
    from kubetune_trainer.store import open_store

    inputs, why = key_inputs(recipe, job, tokenizer, seed=seed)
    if inputs is None:
        return None, CacheOutcome("off", reason=why), None
    base = cache_uri(job)
    data, outcome = _read_entry(open_store(base, _s3(job.spec)), data_key(inputs), base, device_type)
    return data, outcome, inputs


def _exists(store: ObjectStore, key: str) -> bool:
    from kubetune_trainer.store import StoreError

    try:
        return store.exists(key)
    except StoreError:
        return False


def _wait_for_rank0(store: ObjectStore, key: str, base: str, device_type: str) -> BuiltData | None:
    """A rank but 0 on a miss: rank 0 announces its build with BUILDING (within a short grace) and
    commits it; wait for that, up to $KUBETUNE_DATA_CACHE_WAIT_SECONDS. None: build it yourself."""
    wait = _wait_seconds()
    started = time.monotonic()
    seen_building = False
    while time.monotonic() - started < wait:
        if _exists(store, f"{key}/{COMMITTED_FILE}"):
            return _read_entry(store, key, base, device_type)[0]
        building = _exists(store, f"{key}/{BUILDING_FILE}")
        if seen_building and not building:  # rank 0 gave up writing it
            return _read_entry(store, key, base, device_type)[0]
        seen_building = seen_building or building
        if not seen_building and time.monotonic() - started > min(_BUILDING_GRACE, wait):
            return None  # rank 0 is not building this key (other data here?)
        time.sleep(_POLL)
    return None


def cached_build_data(
    recipe: Recipe, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu", rank: int | None = None
) -> tuple[BuiltData, CacheOutcome]:
    """``recipe.build_data(job, tokenizer, ...)`` through the cache (see the module docstring). `rank`:
    this process's global rank (default $RANK); only rank 0 writes."""
    from kubetune_trainer.store import StoreError, open_store

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    inputs, why = key_inputs(recipe, job, tokenizer, seed=seed)
    if inputs is None:
        return recipe.build_data(job, tokenizer, seed=seed, device_type=device_type), CacheOutcome(
            "off", reason=why
        )
    key = data_key(inputs)
    base = cache_uri(job)
    store = open_store(base, _s3(job.spec))
    data, outcome = _read_entry(store, key, base, device_type)
    if data is not None:
        return data, outcome
    if rank != 0:
        data = _wait_for_rank0(store, key, base, device_type) if outcome.status == "miss" else None
        if data is not None:
            return data, CacheOutcome("hit", outcome.uri)
        return recipe.build_data(job, tokenizer, seed=seed, device_type=device_type), outcome
    try:  # what a damaged entry or a killed write left, then tell the other ranks to wait
        store.delete_prefix(f"{key}/")
        store.put_bytes(
            f"{key}/{BUILDING_FILE}", json.dumps({"pid": os.getpid(), "time": time.time()}).encode()
        )
    except StoreError as e:
        log.warning("data cache %s: cannot be written (%s); the next start tokenizes again", outcome.uri, e)
        return recipe.build_data(job, tokenizer, seed=seed, device_type=device_type), outcome
    try:
        built = recipe.build_data(job, tokenizer, seed=seed, device_type=device_type)
        try:
            _write(store, key, built, _pad_id(tokenizer), inputs, base)
        except (StoreError, OSError) as e:
            log.warning("data cache %s: not written (%s); the next start tokenizes again", outcome.uri, e)
            return built, CacheOutcome(outcome.status, outcome.uri, reason=str(e))
    finally:
        with contextlib.suppress(StoreError):
            store.delete(f"{key}/{BUILDING_FILE}")
    # train on the written entry, memory-mapped: the same rows, without holding them in this process
    mapped, _ = _read_entry(store, key, base, device_type)
    if mapped is not None:
        built = mapped
        release_build_memory()
    return built, CacheOutcome(outcome.status, outcome.uri, wrote=True)


__all__ = [
    "CacheOutcome", "TRAINING_FIELDS", "cache_uri", "cached_build_data", "data_key", "file_digest", "key_inputs",
    "lookup", "release_build_memory", "source_digest", "tokenizer_digest",
]  # fmt: skip
