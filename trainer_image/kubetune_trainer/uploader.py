"""Background upload of finished local checkpoints: training never waits for the object store.

    up = CheckpointUploader(store, spec_hash=..., world_size=..., keep_last=2)
    up.submit("/work/out/checkpoint-100", step=100)      # returns at once (hard-links the files)
    ...
    up.wait_idle(timeout=20)                              # at the end, or on SIGTERM
    up.close()

At most one upload is in flight. A checkpoint submitted while one is uploading waits in a
single pending slot; a newer one replaces it there (the older pending one is dropped: it would
only be pruned anyway). `submit(..., urgent=True)` (the SIGTERM save) also makes the in-flight
upload give up at once (part-way through a file) so the urgent one goes first. An upload whose
store is down is retried with backoff (each store call through `store.with_retries`, the one retry
loop) until it succeeds, is superseded or the uploader closes; once a newer checkpoint waits, a failing upload is abandoned at its next failed try (the store's
first good minutes go to the newest checkpoint), while a healthy but slow one still finishes.
A non-transient error (access denied, no such bucket) is not retried: it is kept in
`fatal_error`, and the trainer stops on it (nothing more could ever be committed).

On several nodes every node's local rank 0 runs one (`node`, `nodes`, `token`): node K > 0
uploads its part (its ranks' files and a part list, `checkpoints.upload_part`) and commits
nothing; node 0 uploads its files, waits for the other nodes' parts and commits (see
checkpoints.py). Node 0 stops waiting for a step when a newer checkpoint is queued: a node whose
uploads lag may have dropped that step for the newer one, and every node uploads the newest.

The submitted directory is hard-linked into a staging directory first, so the trainer may
delete or overwrite its own checkpoint dirs (save_total_limit) while an upload runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer import checkpoints as ck
from kubetune_trainer.store import ObjectStore, StoreError, is_transient

log = logging.getLogger("kubetune.uploader")


@dataclass
class _Job:
    step: int
    staged: Path
    urgent: bool
    submitted_at: float
    cancelled: bool = False


def stage(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Hard-link (or copy, across file systems) every file of `src` into a fresh `dst`."""
    src, dst = Path(src), Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    dst.mkdir(parents=True, exist_ok=True)
    return dst


class CheckpointUploader:
    def __init__(
        self,
        store: ObjectStore,
        *,
        spec_hash: str,
        world_size: int,
        keep_last: int,
        staging_dir: str | os.PathLike,
        extra: dict[str, Any] | None = None,
        on_commit: Callable[[ck.Checkpoint], None] | None = None,
        on_state: Callable[[str, int], None] | None = None,
        workers: int = 4,
        node: int = 0,
        nodes: int = 1,
        token: str = "",
    ) -> None:
        self.store = store
        self.spec_hash = spec_hash
        self.world_size = world_size
        self.keep_last = keep_last
        self.staging_dir = Path(staging_dir)
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # leftovers of an earlier process
        self.extra = dict(extra or {})
        self.on_commit = on_commit
        self.on_state = on_state  # ("uploading" | "committed" | "failed" | "superseded", step)
        self.workers = workers
        self.node, self.nodes, self.token = node, nodes, token
        self.last_done_step = -1  # node 0: last committed step; node K: last uploaded part
        self.last_committed: ck.Checkpoint | None = None
        self.last_error: str | None = None
        self.fatal_error: str | None = None  # a non-transient store error: no upload can succeed
        self.committed_steps: list[int] = []
        self.upload_seconds: list[float] = []
        self._cond = threading.Condition()
        self._pending: _Job | None = None
        self._current: _Job | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="kubetune-uploader", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ API
    def submit(self, local_dir: str | os.PathLike, step: int, *, urgent: bool = False) -> None:
        """Queue a finished checkpoint dir for upload as step-<step>; returns immediately."""
        staged = stage(local_dir, self.staging_dir / ck.step_name(step))
        job = _Job(step, staged, urgent, time.monotonic())
        with self._cond:
            if self._closing:
                raise RuntimeError("uploader is closed")
            if self._pending is not None:
                log.info("checkpoint step %d supersedes pending step %d", step, self._pending.step)
                self._discard(self._pending, "superseded")
            if urgent and self._current is not None and self._current.step != step:
                log.info("urgent checkpoint step %d: abandoning upload of step %d", step, self._current.step)
                self._current.cancelled = True
            self._pending = job
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending or in flight; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending is not None or self._current is not None:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
        return True

    def wait_for_step(self, step: int, timeout: float | None = None) -> bool:
        """Wait until checkpoint `step` (or a newer one) is committed (node K: its part uploaded);
        False on timeout or if it was dropped."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self.last_done_step >= step:
                    return True
                queued = [j for j in (self._pending, self._current) if j is not None and not j.cancelled]
                if not any(j.step >= step for j in queued):
                    return False
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)

    def close(self, timeout: float | None = None, join_timeout: float = 5.0) -> bool:
        """Finish what is queued (up to `timeout`), then stop the thread (waiting up to `join_timeout`
        for an abandoned upload to wind down). True when everything committed."""
        done = self.wait_idle(timeout)
        with self._cond:
            self._closing = True
            if self._current is not None:
                self._current.cancelled = True
            if self._pending is not None:
                self._discard(self._pending, "abandoned")
                self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout=join_timeout)
        return done

    # ------------------------------------------------------------ worker
    def _discard(self, job: _Job, why: str) -> None:
        job.cancelled = True
        shutil.rmtree(job.staged, ignore_errors=True)
        if self.on_state:
            with contextlib.suppress(Exception):
                self.on_state(why, job.step)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                self._current = job
            try:
                self._upload(job)
            finally:
                with self._cond:
                    self._current = None
                    self._cond.notify_all()
                shutil.rmtree(job.staged, ignore_errors=True)

    def _superseded(self, job: _Job) -> bool:
        return job.cancelled or self._closing or self._newer_pending(job)

    def _newer_pending(self, job: _Job) -> bool:
        pending = self._pending
        return pending is not None and pending.step > job.step

    def _send(self, job: _Job) -> ck.Checkpoint | None:
        """One try at uploading `job`: node 0 commits it, node K uploads its part (returns None)."""

        def stop() -> bool:
            return job.cancelled or self._closing

        if self.node > 0:
            ck.upload_part(
                self.store, job.staged, step=job.step, node=self.node, token=self.token,
                should_stop=stop, workers=self.workers, give_up=lambda: self._newer_pending(job),
            )  # fmt: skip
            return None
        manifest = ck.build_manifest(
            job.staged, step=job.step, world_size=self.world_size, spec_hash=self.spec_hash, extra=self.extra
        )

        def other_nodes() -> dict[str, dict[str, Any]]:
            return ck.collect_parts(
                self.store,
                job.step,
                nodes=self.nodes,
                token=self.token,
                should_stop=lambda: self._superseded(job),
            )

        return ck.commit(
            self.store, job.staged, step=job.step, world_size=self.world_size, spec_hash=self.spec_hash,
            manifest=manifest, should_stop=stop, workers=self.workers,
            other_nodes=other_nodes if self.nodes > 1 else None, give_up=lambda: self._newer_pending(job),
        )  # fmt: skip

    def _upload(self, job: _Job) -> None:
        if self.on_state:
            with contextlib.suppress(Exception):
                self.on_state("uploading", job.step)
        t0 = time.monotonic()
        try:
            # every store call in there retries transient errors (store.with_retries) until this
            # upload is superseded or the uploader closes: the store may be down for a long while
            result = self._send(job)
        except Exception as e:
            if self._superseded(job):
                log.warning("upload of checkpoint step %d abandoned: %s", job.step, e)
                if self.on_state:
                    with contextlib.suppress(Exception):
                        self.on_state("abandoned", job.step)
                return
            self.last_error = f"upload of checkpoint step {job.step} failed: {e}"
            if isinstance(e, PermissionError) or (isinstance(e, StoreError) and not is_transient(e)):
                self.fatal_error = str(e)
            log.error("%s", self.last_error)
            if self.on_state:
                with contextlib.suppress(Exception):
                    self.on_state("failed", job.step)
            return
        dt = time.monotonic() - t0
        with self._cond:
            self.last_done_step = max(self.last_done_step, job.step)
            self.last_error = None
            self.upload_seconds.append(dt)
            if result is not None:
                self.last_committed = result
                self.committed_steps.append(job.step)
            self._cond.notify_all()
        if result is None:
            return
        if self.on_commit:
            try:
                self.on_commit(result)
            except Exception as e:  # never let a callback kill the uploader
                log.warning("on_commit callback failed: %s", e)
        try:
            ck.prune(self.store, self.keep_last, spec_hash=self.spec_hash)
        except Exception as e:
            log.warning("pruning old checkpoints failed (retried after the next commit): %s", e)


__all__ = ["CheckpointUploader", "stage"]
