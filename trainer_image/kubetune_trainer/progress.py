"""progress.json: what the trainer is doing, for the operator and `kubetune status job.yaml`.

Written by global rank 0 to <output.uri>/progress.json every few seconds (from a background
thread: a slow or unreachable store never blocks training) and at once on every state change.
The document is a :class:`kubetune.progress.TrainerProgress` (all keys always present, null when
unknown, but `rewards`: preference methods only):

    {"job": "demo", "attempt": 2, "state": "running",     # starting|running|saving|done|failed|preempted
     "reason": null,                                       # why failed/preempted
     "step": 120, "total_steps": 300, "percent": 40, "epoch": 1.2, "loss": 2.31,
     "tokens_per_second": 5120.0, "eta_seconds": 310.0,
     "rewards": {"chosen": 0.4, "rejected": -0.9, "margins": 1.3, "accuracies": 0.95},
     "last_checkpoint": {"uri": "s3://b/jobs/demo/checkpoints/step-00000100", "step": 100},
     "checkpoint_error": null,                             # why the last upload failed for good
     "resumed_from": {"uri": ..., "step": 50} | null,
     "store_unreachable": {"since": "...Z", "failed_attempts": 17, "error": "..."} | null,
     "world_size": 4, "started_at": "...Z", "updated_at": "...Z"}

Every version is also written to a local copy first (`local_progress_path`, on this machine's
scratch): while the store is down the local copy is the one that is current, and it says since
when the store has been unreachable and how many writes failed; `kubetune status` on the same
machine shows it when the store does not answer or holds an older version.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.locations import PROGRESS_FILE, local_progress_path
from kubetune.progress import STATES, TrainerProgress, TrainerState
from kubetune_trainer.store import ObjectNotFound, ObjectStore, StoreError, open_store

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob

log = logging.getLogger("kubetune.progress")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def empty_progress(job: str = "", attempt: int = 0, world_size: int = 1) -> TrainerProgress:
    now = _now()
    return TrainerProgress(job=job, attempt=attempt, world_size=world_size, started_at=now, updated_at=now)


class ProgressWriter:
    """Keeps the progress document in memory; a thread writes it when it changed, every `interval` s."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        job: str = "",
        attempt: int = 0,
        world_size: int = 1,
        interval: float = 5.0,
        local_copy: str | os.PathLike | None = None,
    ) -> None:
        self.store = store
        self.interval = interval
        self.local_copy = Path(local_copy) if local_copy is not None else None
        self.doc: TrainerProgress = empty_progress(job, attempt, world_size)
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._urgent = threading.Event()
        self._stop = threading.Event()
        self._written = threading.Condition()
        self._version = 0
        self._written_version = 0
        self._failures = 0
        self._outage: dict[str, Any] | None = None  # {"since", "failed_attempts", "error"} while down
        self._thread = threading.Thread(target=self._run, name="kubetune-progress", daemon=True)
        self._thread.start()

    def update(self, *, flush: bool = False, **fields: Any) -> None:
        """Change fields of the document (names and types of :class:`TrainerProgress`)."""
        with self._lock:
            self.doc = self.doc.with_updates(**fields, updated_at=_now())
            self._version += 1
        self._dirty.set()
        if flush:
            self._urgent.set()

    def set_state(self, state: TrainerState, reason: str | None = None, *, wait: float | None = None) -> None:
        """Change state (written at once); `wait`: block up to that many seconds for the write."""
        self.update(state=state, reason=reason, flush=True)
        if wait:
            self.flush(wait)

    def flush(self, timeout: float = 10.0) -> bool:
        """Write now (from the writer thread) and wait up to `timeout` s for it."""
        with self._lock:
            target = self._version
        self._urgent.set()
        self._dirty.set()
        end = time.monotonic() + timeout
        with self._written:
            while self._written_version < target:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._written.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stop.set()
        self._dirty.set()
        self._thread.join(timeout=min(2.0, max(0.1, timeout)))
        with self._lock:  # the last word stays on this machine even when the store never took it
            doc = self.doc.with_updates(store_unreachable=self._outage)
        self._write_local(doc)

    @property
    def state(self) -> TrainerState:
        """The state last set."""
        with self._lock:
            return self.doc.state

    def outage(self) -> dict[str, Any] | None:
        """{"since", "failed_attempts", "error"} while writes to the store fail, else None."""
        with self._lock:
            return dict(self._outage) if self._outage else None

    def _write_local(self, doc: TrainerProgress) -> None:
        if self.local_copy is None:
            return
        try:
            self.local_copy.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.local_copy.with_name(f".{self.local_copy.name}.{os.getpid()}.tmp")
            tmp.write_text(doc.to_json())
            os.replace(tmp, self.local_copy)
        except OSError as e:  # a full scratch disk must not stop training either
            log.debug("could not write %s: %s", self.local_copy, e)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                break
            # coalesce updates: at most one write per interval unless a state change asks for it now
            wait = self.interval - (time.monotonic() - last)
            if wait > 0 and not self._urgent.is_set():
                self._urgent.wait(wait)
            self._urgent.clear()
            self._dirty.clear()
            with self._lock:
                doc, version = self.doc, self._version
                outage = self._outage
            self._write_local(doc.with_updates(store_unreachable=outage))
            try:
                self.store.put_bytes(PROGRESS_FILE, doc.to_json().encode())
                self._failures = 0
                if self._outage is not None:
                    log.warning(
                        "the store answers again (it was unreachable since %s)", self._outage["since"]
                    )
                    with self._lock:
                        self._outage = None
                    self._write_local(doc)
            except Exception as e:  # never fatal: the next write may work
                self._failures += 1
                with self._lock:
                    since = self._outage["since"] if self._outage else _now()
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                    self._outage = {"since": since, "failed_attempts": self._failures, "error": reason}
                self._write_local(doc.with_updates(store_unreachable=self._outage))
                if self._failures in (1, 10) or self._failures % 100 == 0:
                    log.warning(
                        "could not write %s (%d failures): %s",
                        self.store.uri_for(PROGRESS_FILE),
                        self._failures,
                        e,
                    )
                self._dirty.set()
                time.sleep(min(self.interval, 2.0))
                continue
            last = time.monotonic()
            with self._written:
                self._written_version = max(self._written_version, version)
                self._written.notify_all()


def read_progress(store: ObjectStore) -> TrainerProgress | None:
    """The output's progress.json; None when there is none. ValueError when it is not one."""
    try:
        return TrainerProgress.from_json(store.get_bytes(PROGRESS_FILE))
    except ObjectNotFound:
        return None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_progress(p: TrainerProgress, uri: str = "") -> str:
    lines = []
    head = f"{p.job or '?'}: {p.state}"
    if p.reason:
        head += f" ({p.reason})"
    if p.attempt:
        head += f", attempt {p.attempt}"
    if p.world_size:
        head += f", {p.world_size} processes"
    lines.append(head)
    parts = [f"step {p.step}/{p.total_steps or '?'}" + (f" ({p.percent}%)" if p.total_steps else "")]
    parts.append(f"epoch {p.epoch:.2f}")
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    rewards = p.rewards or {}
    if rewards.get("margins") is not None:
        parts.append(f"reward margin {rewards['margins']:.3f}")
    if rewards.get("accuracies") is not None:
        parts.append(f"preference accuracy {rewards['accuracies']:.0%}")
    for name, value in (p.metrics or {}).items():  # the method's own values (reward: accuracy, margin ...)
        parts.append(f"{name} {value:.4g}")
    if p.tokens_per_second is not None:
        parts.append(f"{p.tokens_per_second:.0f} tokens/s")
    if p.eta_seconds is not None and p.state == "running":
        parts.append(f"ETA {_duration(p.eta_seconds)}")
    lines.append("  " + ", ".join(parts))
    ck = p.last_checkpoint
    lines.append(f"  last checkpoint: {ck.uri} (step {ck.step})" if ck else "  last checkpoint: none yet")
    if p.checkpoint_error:
        lines.append(f"  checkpoint upload failing: {p.checkpoint_error}")
    down = p.store_unreachable
    if down:
        lines.append(
            f"  store unreachable since {down.since} ({down.failed_attempts} failed attempts): {down.error}"
        )
    if p.resumed_from:
        lines.append(f"  resumed from: {p.resumed_from.uri} (step {p.resumed_from.step})")
    if p.updated_at:
        try:
            t = _dt.datetime.fromisoformat(p.updated_at.replace("Z", "+00:00"))
            ago = (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()
            lines.append(f"  updated {p.updated_at} ({_duration(max(0.0, ago))} ago)")
        except ValueError:
            lines.append(f"  updated {p.updated_at}")
    if uri:
        lines.append(f"  from {uri}")
    return "\n".join(lines)


def print_status(job: FineTuneJob) -> int:
    """`kubetune status job.yaml`: print the job's progress.json; 1 when there is none (yet)."""
    import sys

    spec = job.spec
    local = local_progress_path(job.name, spec.output.uri)
    try:
        local_doc = TrainerProgress.from_json(local.read_text()) if local.is_file() else None
    except (OSError, ValueError):
        local_doc = None
    try:
        store = open_store(spec.output.uri, spec.storage.s3)
        p = read_progress(store)
    except (StoreError, ValueError) as e:
        if local_doc is None:
            print(f"{job.name}: cannot read progress: {e}", file=sys.stderr)
            return 1
        print(format_progress(local_doc, f"{local} (the local copy: the store did not answer: {e})"))
        return 0
    if local_doc is not None and (p is None or str(local_doc.updated_at) > str(p.updated_at)):
        # the trainer on this machine could not write the store: its local copy is newer
        print(
            format_progress(local_doc, f"{local} (the local copy; {store.uri_for(PROGRESS_FILE)} is older)")
        )
        return 0
    if p is None:
        print(
            f"{job.name}: no {PROGRESS_FILE} at {store.uri_for(PROGRESS_FILE)} yet (not started?)",
            file=sys.stderr,
        )
        return 1
    print(format_progress(p, store.uri_for(PROGRESS_FILE)))
    return 0


__all__ = [
    "ProgressWriter", "STATES", "TrainerProgress", "empty_progress", "format_progress", "local_progress_path",
    "print_status", "read_progress",
]  # fmt: skip
