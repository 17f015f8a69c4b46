"""Checkpoints in an object store that commit atomically, and choosing the one to resume from.

Layout under the checkpoint URI (spec.checkpoint.uri, default <output.uri>/checkpoints):

    step-00000100/adapter_model.safetensors, optimizer.pt, scheduler.pt, rng_state_0.pth, ...,
                  trainer_state.json, ...                 (a Hugging Face Trainer checkpoint dir)
    step-00000100/COMMITTED                                (the manifest, written LAST)

On several nodes each node has only its own ranks' files (RNG states; FSDP's weight and optimizer
shards): node K > 0 uploads them itself and then writes `step-N/.parts/node-K.json` (their sizes
and sha256); node 0 waits for every other node's part list before it writes COMMITTED, whose
manifest then lists the files of all nodes. Nothing travels through node 0.

A step directory without COMMITTED is an upload that never finished: it is never used and is
deleted by `prune`/`clean_uncommitted`. The manifest lists every file with its size and sha256,
the global step, the world size and the spec's training hash; a download is verified against it.
A committed checkpoint is deleted COMMITTED-first, so a crash half-way leaves an uncommitted
leftover, never a committed checkpoint with files missing. One that resume rejects (a file missing,
of the wrong size or failing its sha256) is de-committed the same way (`decommit`), so the step
retrained after the fallback commits anew and the bad copy never counts toward keep_last.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.locations import CHECKPOINT_PARTS_DIR, COMMITTED_FILE, COMPLETE_MARKER
from kubetune_trainer.store import ObjectNotFound, ObjectStore, with_retries

log = logging.getLogger("kubetune.checkpoints")

MANIFEST_FORMAT = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")
PARTS_DIR = CHECKPOINT_PARTS_DIR  # step-N/.parts/node-K.json: what node K uploaded (multi-node)
PART_POLL_SECONDS = 0.5


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (and why)."""


class SpecMismatch(CheckpointError):
    """The newest checkpoint was written by a job whose model/data/method differ from this one."""


class CorruptCheckpoint(CheckpointError):
    """Files missing, of the wrong size or with the wrong checksum."""


def step_name(step: int) -> str:
    return f"step-{int(step):08d}"


def parse_step_name(name: str) -> int | None:
    m = _STEP_RE.match(name.rstrip("/"))
    return int(m.group(1)) if m else None


def sha256_file(path: str | os.PathLike, chunk: int = 4 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Manifest:
    step: int
    world_size: int
    spec_hash: str
    files: dict[str, dict[str, Any]]  # relative path -> {"size": int, "sha256": str}
    created_at: str = field(default_factory=_now)
    format: int = MANIFEST_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)  # strategy, nnodes, nproc_per_node, job ...

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown manifest format {d.get('format') if isinstance(d, dict) else d!r}")
        files = d["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        ):
            raise ValueError("manifest 'files' must map paths to {size, sha256}")
        return cls(
            step=int(d["step"]),
            world_size=int(d["world_size"]),
            spec_hash=str(d["spec_hash"]),
            files=files,
            created_at=str(d.get("created_at", "")),
            format=MANIFEST_FORMAT,
            extra=dict(d.get("extra") or {}),
        )

    @property
    def total_bytes(self) -> int:
        return sum(int(v["size"]) for v in self.files.values())


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint in the store."""

    step: int
    name: str  # "step-00000100", the key prefix under the checkpoint store
    uri: str
    manifest: Manifest


def build_manifest(
    local_dir: str | os.PathLike,
    *,
    step: int,
    world_size: int,
    spec_hash: str,
    extra: dict[str, Any] | None = None,
) -> Manifest:
    root = Path(local_dir)
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in (COMMITTED_FILE, COMPLETE_MARKER):
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise CheckpointError(f"checkpoint directory {root} is empty")
    return Manifest(
        step=step, world_size=world_size, spec_hash=spec_hash, files=files, extra=dict(extra or {})
    )


# ---------------------------------------------------------------- writing


def commit(
    store: ObjectStore,
    local_dir: str | os.PathLike,
    *,
    step: int,
    world_size: int,
    spec_hash: str,
    extra: dict[str, Any] | None = None,
    deadline: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    workers: int = 4,
    manifest: Manifest | None = None,
    other_nodes: Callable[[], dict[str, dict[str, Any]]] | None = None,
    give_up: Callable[[], bool] | None = None,
) -> Checkpoint:
    """Upload a finished local checkpoint dir to step-<N>/ and write COMMITTED last.

    `other_nodes` (multi-node): called after this node's files are up; blocks until the other
    nodes' parts are uploaded and returns their files for the manifest (see `collect_parts`).
    Transient store errors are retried (until `deadline`, a time.monotonic() value, or until
    `should_stop()`; without either, up to a few minutes). `should_stop()` also stops an upload
    part-way; `give_up()` is asked only after a failed try (a newer checkpoint is waiting: a store
    that is down is better spent on that one). Re-committing a step that is already committed by
    the same spec is a no-op.
    """
    name = step_name(step)
    if deadline is None and should_stop is None:
        deadline = time.monotonic() + 600

    def after_failure() -> bool:
        return (should_stop is not None and should_stop()) or (give_up is not None and give_up())

    def retrying(fn: Callable[[], Any], what: str) -> Any:
        return with_retries(
            fn, what=what, attempts=None, deadline=deadline, should_stop=after_failure, max_delay=10.0
        )

    existing = retrying(lambda: read_manifest(store, name), f"reading {name}/{COMMITTED_FILE}")
    if existing is not None and existing.spec_hash == spec_hash:
        log.info("checkpoint %s is already committed", store.uri_for(name))
        return Checkpoint(step, name, store.uri_for(name), existing)
    if existing is not None:  # a foreign spec's checkpoint (on_spec_change: start_over)
        retrying(lambda: store.delete(f"{name}/{COMMITTED_FILE}"), f"de-commit {name}")
    manifest = manifest or build_manifest(
        local_dir, step=step, world_size=world_size, spec_hash=spec_hash, extra=extra
    )
    root = Path(local_dir)

    def stopped() -> None:
        if should_stop is not None and should_stop():
            raise CheckpointError(f"upload of {store.uri_for(name)} abandoned")

    t0 = time.monotonic()
    calls = []
    for rel in manifest.files:
        calls.append(
            lambda rel=rel: (
                stopped(),
                retrying(
                    lambda: store.put_file(root / rel, f"{name}/{rel}", should_stop=should_stop),
                    f"upload {name}/{rel}",
                ),
            )
        )
    ObjectStore._parallel(calls, workers)
    stopped()
    if other_nodes is not None:
        manifest = _with_files(manifest, other_nodes())
    retrying(lambda: store.put_bytes(f"{name}/{COMMITTED_FILE}", manifest.to_json()), f"commit {name}")
    dt = time.monotonic() - t0
    log.info(
        "committed %s (%d files, %.1f MB in %.1fs)",
        store.uri_for(name),
        len(manifest.files),
        manifest.total_bytes / 1e6,
        dt,
    )
    return Checkpoint(step, name, store.uri_for(name), manifest)


def _with_files(manifest: Manifest, others: dict[str, dict[str, Any]]) -> Manifest:
    files = dict(manifest.files)
    for rel, meta in others.items():
        if rel in files and files[rel]["sha256"] != meta["sha256"]:
            raise CheckpointError(f"step {manifest.step}: two nodes wrote different versions of {rel}")
        files[rel] = meta
    return Manifest(
        step=manifest.step, world_size=manifest.world_size, spec_hash=manifest.spec_hash, files=files,
        created_at=manifest.created_at, extra=manifest.extra,
    )  # fmt: skip


def part_key(step: int, node: int) -> str:
    return f"{step_name(step)}/{PARTS_DIR}/node-{node}.json"


def upload_part(
    store: ObjectStore,
    local_dir: str | os.PathLike,
    *,
    step: int,
    node: int,
    token: str,
    should_stop: Callable[[], bool] | None = None,
    workers: int = 4,
    give_up: Callable[[], bool] | None = None,
) -> dict[str, dict[str, Any]]:
    """Node `node` > 0: upload this node's files of checkpoint `step`, then its part list (last).

    `token` names the attempt (node 0 only accepts parts of its own gang). Returns the files.
    `should_stop` and `give_up` as in `commit`.
    """
    name = step_name(step)
    root = Path(local_dir)
    files = {
        path.relative_to(root).as_posix(): {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }

    def after_failure() -> bool:
        return (should_stop is not None and should_stop()) or (give_up is not None and give_up())

    def retrying(fn: Callable[[], Any], what: str) -> Any:
        return with_retries(fn, what=what, attempts=None, should_stop=after_failure, max_delay=10.0)

    def put(rel: str) -> None:
        if should_stop is not None and should_stop():
            raise CheckpointError(f"upload of node {node}'s part of {store.uri_for(name)} abandoned")
        retrying(
            lambda: store.put_file(root / rel, f"{name}/{rel}", should_stop=should_stop),
            f"upload {name}/{rel}",
        )

    ObjectStore._parallel([lambda rel=rel: put(rel) for rel in files], workers)
    part = {"node": node, "token": token, "step": step, "files": files}
    retrying(lambda: store.put_bytes(part_key(step, node), json.dumps(part).encode()), f"part list of {name}")
    log.info("node %d: uploaded its part of %s (%d files)", node, store.uri_for(name), len(files))
    return files


def collect_parts(
    store: ObjectStore,
    step: int,
    *,
    nodes: int,
    token: str,
    should_stop: Callable[[], bool] | None = None,
    poll_seconds: float = PART_POLL_SECONDS,
) -> dict[str, dict[str, Any]]:
    """Node 0: wait until nodes 1..nodes-1 uploaded their parts of `step` (with this gang's
    `token`) and return their files. Raises CheckpointError when `should_stop()` turns true."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    waiting_since = time.monotonic()
    while True:
        for node in range(1, nodes):
            if node in found:
                continue
            try:
                part = json.loads(store.get_bytes(part_key(step, node)))
            except ObjectNotFound:
                continue
            except Exception as e:  # a flaky store: the next poll reads it again
                log.debug("reading node %d's part of step %d: %s", node, step, e)
                continue
            if part.get("token") == token and part.get("step") == step:
                found[node] = part["files"]
        if len(found) == nodes - 1:
            break
        if should_stop is not None and should_stop():
            missing = sorted(set(range(1, nodes)) - set(found))
            raise CheckpointError(f"step {step}: gave up waiting for the files of nodes {missing}")
        time.sleep(poll_seconds)
    if time.monotonic() - waiting_since > 1:
        log.info("step %d: waited %.1fs for the other nodes' files", step, time.monotonic() - waiting_since)
    return {rel: meta for files in found.values() for rel, meta in files.items()}


def delete_checkpoint(store: ObjectStore, name: str) -> None:
    """Uncommit first, then delete the files: never a committed checkpoint with files missing."""
    store.delete(f"{name}/{COMMITTED_FILE}")
    store.delete_prefix(f"{name}/")


def decommit(store: ObjectStore, ckpt: Checkpoint, reason: str) -> None:
    """A committed checkpoint resume rejected: remove COMMITTED first (then its files), saying why.

    Left committed, the step retrained after the fallback would count as already committed (its
    good files dropped), the bad copy would count toward keep_last and every later start would
    fall back again. A failure here is only logged: the next start rejects it again.
    """
    log.warning("de-committing %s: %s", ckpt.uri, reason)
    try:
        with_retries(lambda: delete_checkpoint(store, ckpt.name), what=f"de-commit {ckpt.name}", attempts=4)
    except Exception as e:
        log.warning("could not de-commit %s (it is rejected again at the next start): %s", ckpt.uri, e)


# ---------------------------------------------------------------- reading


def read_manifest(store: ObjectStore, name: str) -> Manifest | None:
    """The manifest of step dir `name`; None when it is not committed. Unreadable -> CorruptCheckpoint."""
    try:
        data = store.get_bytes(f"{name}/{COMMITTED_FILE}")
    except ObjectNotFound:
        return None
    try:
        return Manifest.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"{store.uri_for(name)}/{COMMITTED_FILE} is not a valid manifest: {e}") from e


def scan(store: ObjectStore) -> tuple[list[Checkpoint], list[str]]:
    """(committed checkpoints sorted by step, names of step dirs that are not validly committed)."""
    keys = store.list()
    dirs: dict[str, bool] = {}
    for key in keys:
        top, _, rest = key.partition("/")
        if parse_step_name(top) is None or not rest:
            continue
        dirs[top] = dirs.get(top, False) or rest == COMMITTED_FILE
    committed, other = [], []
    for name in sorted(dirs):
        if not dirs[name]:
            other.append(name)
            continue
        try:
            manifest = read_manifest(store, name)
        except CorruptCheckpoint as e:
            log.warning("ignoring %s", e)
            other.append(name)
            continue
        if manifest is None:  # deleted meanwhile
            other.append(name)
            continue
        step = parse_step_name(name)
        assert step is not None
        if manifest.step != step:
            log.warning("ignoring %s: its manifest says step %d", store.uri_for(name), manifest.step)
            other.append(name)
            continue
        committed.append(Checkpoint(step, name, store.uri_for(name), manifest))
    committed.sort(key=lambda c: c.step)
    return committed, other


def list_committed(store: ObjectStore) -> list[Checkpoint]:
    return scan(store)[0]


def latest_committed(store: ObjectStore) -> Checkpoint | None:
    committed = list_committed(store)
    return committed[-1] if committed else None


def remote_problems(store: ObjectStore, ckpt: Checkpoint) -> list[str]:
    """What is wrong with a committed checkpoint as stored (missing files, wrong sizes), cheaply."""
    sizes = store.sizes(f"{ckpt.name}/")
    problems = []
    for rel, meta in ckpt.manifest.files.items():
        size = sizes.get(f"{ckpt.name}/{rel}")
        if size is None:
            problems.append(f"{rel} is missing")
        elif size != meta["size"]:
            problems.append(f"{rel} has {size} bytes, the manifest says {meta['size']}")
    return problems


def verify_local(local_dir: str | os.PathLike, manifest: Manifest) -> list[str]:
    """Problems of a downloaded checkpoint against its manifest (sizes and sha256); [] when good."""
    root = Path(local_dir)
    problems = []
    for rel, meta in manifest.files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != meta["size"]:
            problems.append(f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel} fails its sha256 check")
    return problems


# ---------------------------------------------------------------- choosing and downloading


def candidates(
    store: ObjectStore,
    *,
    spec_hash: str,
    on_spec_change: str = "refuse",
    world_size: int | None = None,
    strategy: str = "ddp",
    spec_fields: dict[str, Any] | None = None,
    max_steps: int | None = None,
) -> list[Checkpoint]:
    """Committed checkpoints this job may resume from, newest first, after the cheap checks.

    Skips (with a warning) ones whose files are missing or of the wrong size. The newest one from a
    different spec raises SpecMismatch unless on_spec_change == "start_over" (then foreign ones
    are ignored); so does the newest one past `max_steps` (nothing would be left to train). A
    sharded (fsdp) checkpoint resumes on another gang size, but not on one process
    (CheckpointError). `spec_fields` (`FineTuneJobSpec.training_fields()`) lets the refusal name
    the fields that changed.
    """
    committed, _ = scan(store)
    out = []
    for ckpt in reversed(committed):
        if max_steps and ckpt.step > max_steps and ckpt.manifest.spec_hash == spec_hash:
            if on_spec_change == "start_over":
                log.warning(
                    "ignoring %s: past max_steps %d; on_spec_change is start_over", ckpt.uri, max_steps
                )
                continue
            if out:
                continue
            raise SpecMismatch(
                f"the newest checkpoint {ckpt.uri} is at step {ckpt.step}, past spec.training.max_steps "
                f"{max_steps}: nothing would be left to train and the export would be overwritten. Refusing to "
                f"resume from it. Restore max_steps >= {ckpt.step} (or --max-steps), point checkpoint.uri "
                f"elsewhere, or set checkpoint.on_spec_change: start_over to ignore old checkpoints."
            )
        if ckpt.manifest.spec_hash != spec_hash:
            if on_spec_change == "start_over":
                log.warning(
                    "ignoring %s: written by a different spec (hash %s, this job %s); on_spec_change is start_over",
                    ckpt.uri,
                    ckpt.manifest.spec_hash,
                    spec_hash,
                )
                continue
            if out:
                # an older foreign checkpoint behind a valid newer own one: irrelevant
                continue
            changed = _changed_fields(ckpt.manifest.extra.get("spec_fields"), spec_fields)
            what = f"spec ({changed})" if changed else "model/data/method spec"
            raise SpecMismatch(
                f"the newest checkpoint {ckpt.uri} (step {ckpt.step}) was written by a job with a different "
                f"{what} (training hash {ckpt.manifest.spec_hash}; this job's is {spec_hash}). "
                f"Refusing to resume from it. Restore the original spec, point checkpoint.uri elsewhere, or set "
                f"checkpoint.on_spec_change: start_over to ignore old checkpoints."
            )
        problems = remote_problems(store, ckpt)
        if problems:
            log.warning(
                "skipping committed checkpoint %s: %s; falling back to the previous one",
                ckpt.uri,
                "; ".join(problems[:5]),
            )
            decommit(store, ckpt, "; ".join(problems[:5]))
            continue
        saved_ws = ckpt.manifest.world_size
        if world_size is not None and saved_ws != world_size:
            # strategy fsdp shards a gang of more than one process: torch.distributed.checkpoint
            # reshards such a checkpoint onto another gang size, never onto an unsharded single process
            sharded_then = ckpt.manifest.extra.get("strategy", strategy) == "fsdp" and saved_ws > 1
            sharded_now = strategy == "fsdp" and world_size > 1
            if sharded_then != sharded_now:
                raise CheckpointError(
                    f"checkpoint {ckpt.uri} was written by {saved_ws} process(es) with strategy "
                    f"{ckpt.manifest.extra.get('strategy', strategy)} and this run has {world_size} with strategy "
                    f"{strategy}: a sharded (fsdp, several processes) checkpoint resumes only in a sharded gang; "
                    f"run nnodes x nproc_per_node > 1 with strategy fsdp, or start over"
                )
            log.warning(
                "checkpoint %s was written by %d processes and this run has %d: weights, optimizer and "
                "scheduler resume at step %d%s, but the global batch and data order change from here on",
                ckpt.uri,
                saved_ws,
                world_size,
                ckpt.step,
                " (the FSDP shards are resharded)" if sharded_now else "",
            )
        out.append(ckpt)
    return out


def _changed_fields(then: Any, now: dict[str, Any] | None) -> str:
    """Which fields differ between two `training_fields()`: "spec.training.learning_rate 0.001 -> 0.002"."""
    if not isinstance(then, dict) or now is None:
        return ""

    def flat(d: dict[str, Any], prefix: str = "spec.") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            name = "spec.parallel_config.strategy" if k == "parallel_strategy" else f"{prefix}{k}"
            out.update(flat(v, name + ".") if isinstance(v, dict) else {name: v})
        return out

    a, b = flat(then), flat(now)
    diffs = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diffs[:5])


def download(
    store: ObjectStore, ckpt: Checkpoint, local_root: str | os.PathLike, *, workers: int = 4
) -> Path:
    """Download a committed checkpoint into local_root/step-N and verify every file's sha256.

    Through the trainer's one fetch (kubetune_trainer.locations.fetch_tree): complete or not at all,
    a copy already verified for the same manifest reused. Raises CorruptCheckpoint (leaving nothing
    behind) when a file is missing or fails verification.
    """
    from kubetune_trainer.locations import IncompleteFetch, fetch_tree

    dst = Path(local_root) / ckpt.name
    digest = hashlib.sha256(ckpt.manifest.to_json()).hexdigest()
    t0 = time.monotonic()
    try:
        fetch_tree(
            store.sub(ckpt.name),
            {rel: int(meta["size"]) for rel, meta in ckpt.manifest.files.items()},
            dst,
            record={"uri": ckpt.uri, "manifest_sha256": digest},
            what=f"downloading checkpoint {ckpt.uri} to resume",
            reuse=lambda marker: marker.get("manifest_sha256") == digest,
            verify=lambda root: verify_local(root, ckpt.manifest),
            workers=workers,
        )
    except IncompleteFetch as e:
        raise CorruptCheckpoint(f"{ckpt.uri} failed verification: {e}") from None
    except ObjectNotFound as e:
        raise CorruptCheckpoint(f"{ckpt.uri}: {e}") from e
    log.info(
        "%s verified in %s (%.1f MB, %.1fs)",
        ckpt.uri,
        dst,
        ckpt.manifest.total_bytes / 1e6,
        time.monotonic() - t0,
    )
    return dst


# ---------------------------------------------------------------- pruning


def prune(store: ObjectStore, keep_last: int, *, spec_hash: str | None = None) -> list[str]:
    """Delete old committed checkpoints beyond `keep_last` (never the newest) and uncommitted leftovers.

    Uncommitted step dirs older than the newest committed one are leftovers of failed uploads; newer
    ones may be an upload in flight and are kept (`clean_uncommitted` removes them at start). With
    `spec_hash`, committed checkpoints of another spec (left behind by on_spec_change: start_over)
    are deleted too. Returns the names deleted.
    """
    keep_last = max(1, keep_last)
    committed, other = scan(store)
    foreign = [c for c in committed if spec_hash is not None and c.manifest.spec_hash != spec_hash]
    own = [c for c in committed if c not in foreign]
    doomed = [c.name for c in own[:-keep_last]] + [c.name for c in foreign]
    newest = own[-1].step if own else -1
    doomed += [n for n in other if (parse_step_name(n) or 0) < newest]
    for name in doomed:
        try:
            delete_checkpoint(store, name)
            log.info("pruned %s", store.uri_for(name))
        except Exception as e:  # a failed prune is retried at the next one
            log.warning("could not prune %s: %s", store.uri_for(name), e)
    return doomed


def clean_uncommitted(store: ObjectStore) -> list[str]:
    """Delete every step dir without a valid COMMITTED (at start, when no upload is in flight)."""
    _, other = scan(store)
    for name in other:
        store.delete_prefix(f"{name}/")
        log.info("removed uncommitted leftover %s", store.uri_for(name))
    return other


__all__ = [
    "Checkpoint", "CheckpointError", "CorruptCheckpoint", "Manifest", "SpecMismatch", "build_manifest",
    "candidates", "clean_uncommitted", "collect_parts", "commit", "decommit", "delete_checkpoint", "download", "latest_committed",
    "list_committed", "parse_step_name", "prune", "read_manifest", "remote_problems", "scan",
    "sha256_file", "step_name", "upload_part", "verify_local",
]  # fmt: skip
