"""Running a job again into an output that already holds a run of it.

- :func:`finished_run`: the output holds this job's finished run (its ``FINISHED`` record, written
  after the export, names the newest committed checkpoint's step, this spec and this max_steps):
  `kubetune run` says so and stops, in seconds, without loading the model.
- :func:`confirm_restart` / :func:`supersede`: ``kubetune run --restart`` trains again from step
  0 into the same output. The launcher says which run is superseded (and asks, on a terminal);
  the trainer's rank 0, holding the output's lease, then de-commits every checkpoint (COMMITTED
  first) and removes the old metrics, so nothing resumes from or mixes with the old run.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune.locations import (
    FINAL_DIR,
    FINISHED_FILE,
    LOSS_PLOT,
    METRICS_FILE,
    PROGRESS_FILE,
    TENSORBOARD_DIR,
    TRACKING_FILE,
)
from kubetune_trainer import checkpoints as ck
from kubetune_trainer.progress import read_progress
from kubetune_trainer.store import ObjectNotFound, ObjectStore, StoreError, open_store

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob

log = logging.getLogger("kubetune.rerun")


@dataclass(frozen=True)
class PreviousRun:
    state: str
    step: int
    total: int
    output_uri: str
    finished: bool

    def describe(self) -> str:
        if self.finished:
            return (
                f"already finished (step {self.step}/{self.total}); nothing to do. The model is in "
                f"{self.output_uri.rstrip('/')}/{FINAL_DIR}; --restart trains again from step 0"
            )
        return f"{self.state} at step {self.step}/{self.total}"


def previous_run(job: FineTuneJob) -> PreviousRun | None:
    """What the output holds of an earlier run of this job (None: nothing, or not readable now)."""
    spec = job.spec
    try:
        out = open_store(spec.output.uri, spec.storage.s3)
        progress = read_progress(out)
        done = _read_json(out, FINISHED_FILE)
        latest = ck.latest_committed(open_store(spec.checkpoint_uri(), spec.storage.s3))
    except (StoreError, ValueError, ck.CheckpointError) as e:
        log.debug("no previous run readable in %s: %s", spec.output.uri, e)
        return None
    if progress is None and latest is None:
        return None
    max_steps = spec.training.max_steps
    finished = (
        done is not None
        and latest is not None
        and done.get("step") == latest.step
        and done.get("spec_hash") == latest.manifest.spec_hash == spec.training_hash()
        and (max_steps is None or max_steps == latest.step)
    )
    if finished:
        assert done is not None
        return PreviousRun(
            "done", int(done["step"]), int(done.get("total_steps") or done["step"]), out.uri, True
        )
    step = (progress.step if progress else 0) or (latest.step if latest else 0)
    total = (progress.total_steps if progress else 0) or step
    return PreviousRun(progress.state if progress else "unknown", step, total, out.uri, False)


def _read_json(store: ObjectStore, key: str) -> dict | None:
    try:
        doc = json.loads(store.get_bytes(key))
    except ObjectNotFound:
        return None
    return doc if isinstance(doc, dict) else None


def mark_finished(job: FineTuneJob, step: int, total: int) -> None:
    """Rank 0, after the export is in the output: the record `finished_run` looks for (kept apart
    from progress.json, which a refused later run overwrites)."""
    out = open_store(job.spec.output.uri, job.spec.storage.s3)
    doc = {
        "job": job.metadata.name,
        "step": step,
        "total_steps": total,
        "spec_hash": job.spec.training_hash(),
    }
    out.put_bytes(FINISHED_FILE, (json.dumps(doc) + "\n").encode())


def finished_run(job: FineTuneJob) -> PreviousRun | None:
    prev = previous_run(job)
    return prev if prev is not None and prev.finished else None


def confirm_restart(job: FineTuneJob, prev: PreviousRun | None = None) -> bool:
    """Say what --restart supersedes; on a terminal, ask first. False: the user said no."""
    prev = prev or previous_run(job)
    if prev is None:
        return True
    what = f"the run in {prev.output_uri} ({prev.describe() if not prev.finished else f'finished, step {prev.step}/{prev.total}'})"
    if sys.stdin is not None and sys.stdin.isatty():
        answer = input(
            f"kubetune run: --restart supersedes {what}: its checkpoints are removed. Go on? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            return False
    print(f"kubetune run: --restart: {what} is superseded; training again from step 0", file=sys.stderr)
    return True


def supersede(job: FineTuneJob) -> int:
    """Rank 0, holding the lease: de-commit and delete every checkpoint, drop the old metrics.
    Returns how many checkpoints were removed."""
    spec = job.spec
    ckstore = open_store(spec.checkpoint_uri(), spec.storage.s3)
    committed, other = ck.scan(ckstore)
    for c in reversed(committed):  # newest first: a crash half-way leaves older ones, never a gap
        ck.delete_checkpoint(ckstore, c.name)
    for name in other:
        ckstore.delete_prefix(f"{name}/")
    out = open_store(spec.output.uri, spec.storage.s3)
    for key in (FINISHED_FILE, METRICS_FILE, LOSS_PLOT, PROGRESS_FILE, TRACKING_FILE):  # new tracker runs too
        out.delete(key)
    out.delete_prefix(f"{TENSORBOARD_DIR}/")
    if committed:
        log.warning(
            "--restart: removed %d checkpoints of the earlier run (newest step %d) from %s",
            len(committed), committed[-1].step, ckstore.uri,
        )  # fmt: skip
    return len(committed)


__all__ = ["PreviousRun", "confirm_restart", "finished_run", "previous_run", "supersede"]
