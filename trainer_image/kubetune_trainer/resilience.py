"""What makes a trainer process survive failure: resume, checkpoint sync, the SIGTERM save, progress.json.

    with Resilience(job, workdir=workdir) as res:            # every process of the gang
        result = run_training(job, workdir=workdir, callbacks=res.callbacks(), resume_from=res.resume_from)
        res.finish(result)

At start every rank agrees (a broadcast from rank 0) on the newest committed checkpoint in
`spec.checkpoint_uri()`; local rank 0 of every node downloads it once into `<workdir>/resume/`
and verifies every file's sha256 while the node's other ranks wait; if any node finds it corrupt
the gang falls back to the previous committed one. The path goes to the Trainer as
`resume_from_checkpoint` (weights, optimizer, scheduler, RNG of every rank, global step, data
position).

During training (`ResilienceCallback`):
- on every save (every `checkpoint.every_steps`, every `checkpoint.every_minutes`, and at the last
  step) local rank 0 of every node hands its node's checkpoint dir to the background uploader and
  training goes on: rank 0 uploads and commits, and on several nodes every other node uploads its
  own ranks' files (RNG states, FSDP shards) as a part that rank 0 waits for before it commits;
- SIGTERM (preemption): the handler only sets a flag; at the next step boundary the ranks agree
  (an all_reduce) to save and stop, every node uploads its files of that checkpoint at once
  (abandoning an older upload in flight) and rank 0 waits for COMMITTED until `checkpoint.sigterm_grace_seconds` after the
  signal. When it committed, every node's local rank 0 writes the marker file named by
  $KUBETUNE_PREEMPT_MARKER (set by `kubetune_trainer.supervise`) and the process exits with
  EXIT_PREEMPTED (75); when it did not, with 1. SIGTERM before training started (nothing new to
  save) exits 75 at once.
- SIGINT (Ctrl-C) is handled like SIGTERM; the process then says in one line what was committed
  and exits 130. A second SIGINT stops at once.
- after SIGTERM/SIGINT every wait is bounded by the grace budget, and a watchdog ends the trainer
  process (exit 75 when the checkpoint committed, else 1) just before the budget ends if it is
  still there (the interpreter waits at exit for upload threads that cannot finish), saying what
  was and was not committed; a SIGTERM checkpoint that did not commit is the store's failure
  (TransientStoreError, retried), not the job's.
- a non-transient store error in an upload (access denied, no such bucket) stops training at the
  next step boundary: nothing more could be committed.
- before each save, the node-local scratch must have room for it (diskspace.py).
- rank 0 keeps `<output.uri>/progress.json` current (see progress.py).

Before anything loads, rank 0 puts and deletes a small object under the checkpoint and output
locations: credentials that may not write fail there, in one line naming the field, the URI and
where the credentials came from, instead of at the first checkpoint or the final upload.

`finish` (rank 0) waits for the last checkpoint's upload, uploads the local output directory when
the output URI is s3://, and marks progress.json done; both share one budget,
`checkpoint.upload_timeout_seconds`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from kubetune import methods
from kubetune.conventions import ENV_ATTEMPT, ENV_PREEMPT_MARKER, EXIT_PREEMPTED
from kubetune.locations import (
    METRICS_FILE,
    WORK_RESUME_DIR,
    WORK_STAGING_DIR,
    local_path,
    local_progress_path,
)
from kubetune_trainer import checkpoints as ck
from kubetune_trainer import tracking
from kubetune_trainer.diskspace import free_bytes, no_space_message
from kubetune_trainer.errors import JobError
from kubetune_trainer.progress import ProgressWriter
from kubetune_trainer.store import (
    ObjectNotFound,
    ObjectStore,
    StoreError,
    TransientStoreError,
    open_store,
    probe_write,
    with_retries,
)
from kubetune_trainer.uploader import CheckpointUploader

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob

log = logging.getLogger("kubetune.resilience")

EXIT_MARGIN_SECONDS = 3.0  # of the grace budget, kept for stopping the processes after the commit
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
WATCHDOG_MARGIN_SECONDS = 1.5  # before the grace ends: torchrun and supervise still have to exit
FAILURE_UPLOAD_GRACE_SECONDS = 20.0  # torchrun stops the other workers within TORCH_ELASTIC_SHUTDOWN_TIMEOUT


class Gang:
    """This process's place in the torchrun gang, and the few collectives resilience needs.

    Collectives go through a gloo group (CPU tensors, pickled objects) whatever the training
    backend is. With one process every collective is the identity.
    """

    def __init__(self) -> None:
        env = os.environ
        self.rank = int(env.get("RANK", 0))
        self.world_size = int(env.get("WORLD_SIZE", 1))
        self.local_rank = int(env.get("LOCAL_RANK", 0))
        self.local_world_size = int(env.get("LOCAL_WORLD_SIZE", self.world_size))
        self.node_rank = int(env.get("GROUP_RANK", self.rank // max(1, self.local_world_size)))
        self.group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nnodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    def setup(self) -> None:
        if not self.distributed:
            return
        import datetime

        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            # the Trainer (accelerate) reuses this group; it is initialised here because the
            # gang must agree on the checkpoint before the Trainer exists
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        self.group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over all ranks (e.g. 'did anyone get SIGTERM')."""
        if not self.distributed:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.group)


class Resilience:
    """Resume, checkpoint sync, SIGTERM save and progress.json for one trainer process (see module doc)."""

    def __init__(
        self, job: FineTuneJob, *, workdir: str | os.PathLike, output_dir: Path | None = None
    ) -> None:
        from kubetune_trainer.train import local_output_dir

        self.job = job
        self.spec = job.spec
        self.workdir = Path(workdir)
        self.output_dir = (
            Path(output_dir) if output_dir is not None else local_output_dir(self.spec, self.workdir)
        )
        self.gang = Gang()
        self.spec_hash = self.spec.training_hash()
        self.phase = "setup"  # setup -> training -> after
        self.resume_from: Path | None = None
        self.resumed: ck.Checkpoint | None = None
        self.ckpt_store: ObjectStore | None = None
        self.out_store: ObjectStore | None = None
        self.uploader: CheckpointUploader | None = None
        self.progress: ProgressWriter | None = None
        self.sigterm_at: float | None = None  # when SIGTERM or SIGINT asked to save and stop
        self.stop_signal: str | None = None  # "SIGTERM" | "SIGINT"
        self.preempt_step: int | None = None
        self.preempt_committed: bool | None = None
        self.final_step: int | None = None
        self.save_seconds: list[tuple[float, float]] = []  # (Trainer save, hand-off) per checkpoint
        self.last_save = time.monotonic()
        self._old_handler: Any = None
        self._old_int_handler: Any = None
        self._inside = False  # between start() and the end of __exit__ (the watchdog's business)
        self.save_estimate: int | None = None  # bytes of the newest local checkpoint (disk check)
        self.end_by: float | None = None  # end of the upload_timeout_seconds budget, once finish() set it
        self.token = ""  # names this attempt's gang in multi-node part lists (rank 0 picks it)
        self.marker = os.environ.get(ENV_PREEMPT_MARKER)

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Resilience:
        try:
            self.start()
        except BaseException as e:
            # e.g. a refused spec change: progress.json says why, the SIGTERM handler is put back
            self.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        # after SIGTERM the kubelet's SIGKILL is near: never wait past the grace budget; after the
        # end-of-run budget ran out, do not start waiting all over again
        ends = [d for d in (self.deadline, self.end_by) if d is not None]
        budget = None if not ends else max(0.0, min(ends) - time.monotonic())

        def within(seconds: float) -> float:
            return seconds if budget is None else min(seconds, budget)

        try:
            preempted = isinstance(exc, SystemExit) and exc.code in (EXIT_PREEMPTED, EXIT_INTERRUPTED)
            at_once = preempted or isinstance(exc, KeyboardInterrupt)  # a second Ctrl-C: no waiting
            if exc is not None and self.progress is not None:
                if preempted and self.progress.state == "preempted":
                    pass  # _finish_preemption said what was committed
                elif preempted:
                    self.progress.set_state("preempted", self.stop_signal or "SIGTERM", wait=within(3))
                elif isinstance(exc, KeyboardInterrupt):
                    self.progress.set_state("failed", "interrupted (second Ctrl-C)", wait=within(1))
                else:
                    reason = f"{type(exc).__name__}: {exc}".strip()
                    self.progress.set_state("failed", reason[:500], wait=within(5))
            if self.uploader is not None:
                # a crash elsewhere in the gang: a checkpoint already handed over still gets its chance
                self.uploader.close(
                    timeout=0 if at_once else within(FAILURE_UPLOAD_GRACE_SECONDS),
                    join_timeout=within(0.5 if at_once else 5),
                )
            if self.progress is not None:
                self.progress.close(timeout=within(1 if at_once else 3))
        finally:
            self._inside = False
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)
            if self._old_int_handler is not None:
                signal.signal(signal.SIGINT, self._old_int_handler)

    def start(self) -> None:
        g = self.gang
        self._inside = True
        self._old_handler = signal.signal(signal.SIGTERM, self._on_signal)
        if threading.current_thread() is threading.main_thread():
            self._old_int_handler = signal.signal(signal.SIGINT, self._on_signal)
        g.setup()
        spec = self.spec
        s3 = spec.storage.s3
        self.ckpt_store = open_store(spec.checkpoint_uri(), s3)
        denied = None
        if g.is_main:
            self.out_store = open_store(spec.output.uri, s3)
            denied = self._probe_writes()
        if g.is_main and not (denied and denied.startswith("spec.output.uri")):
            # its own client without botocore's retries: the writer retries every few seconds itself,
            # and each failed write counts in "store unreachable since T (N failed attempts)"
            progress_store = open_store(spec.output.uri, s3, max_attempts=1)
            self.progress = ProgressWriter(
                progress_store,
                job=self.job.metadata.name,
                attempt=int(os.environ.get(ENV_ATTEMPT, "0") or 0),
                world_size=g.world_size,
                local_copy=local_progress_path(self.job.metadata.name, spec.output.uri),
            )
            self.progress.set_state("starting")
        self._resolve_resume(denied)
        if g.is_main:
            self._restore_metrics()
        if g.local_rank == 0:
            main = g.is_main
            self.uploader = CheckpointUploader(
                self.ckpt_store,
                spec_hash=self.spec_hash,
                world_size=g.world_size,
                keep_last=spec.checkpoint.keep_last,
                staging_dir=self.workdir / WORK_STAGING_DIR,
                extra={
                    "job": self.job.metadata.name,
                    "strategy": spec.parallel_config.strategy,
                    "nnodes": spec.parallel_config.nnodes,
                    "world_size": g.world_size,
                    "pet_type": spec.pet_config.pet_type,
                    "method": spec.method,
                    "spec_fields": spec.training_fields(),  # names what changed when a resume is refused
                    "max_steps": spec.training.max_steps,
                },
                on_commit=self._on_commit if main else None,
                on_state=self._on_upload_state if main else None,
                node=g.node_rank,
                nodes=g.nnodes,
                token=self.token,
            )

    def callbacks(self) -> list[TrainerCallback]:
        return [ResilienceCallback(self)]

    def _probe_writes(self) -> str | None:
        """Rank 0: put and delete a small object under the output and the checkpoint location.

        Returns the one-line reason when one of them may not be written (None when both may).
        """
        assert self.ckpt_store is not None and self.out_store is not None
        # the output first: when it is denied there is nowhere to report anything, not even progress
        for field, store in (("spec.output.uri", self.out_store), ("spec.checkpoint.uri", self.ckpt_store)):
            try:
                probe_write(store, field)
            except TransientStoreError:
                raise  # unreachable, not denied: the attempt fails and a later one tries again
            except StoreError as e:
                return str(e)
        return None

    # ------------------------------------------------------------ resume
    def _resolve_resume(self, denied: str | None = None) -> None:
        """Agree on the newest committed checkpoint, download it once per node, verify it.

        `denied`: rank 0's write-probe failure, raised on every rank."""
        g = self.gang
        spec = self.spec
        assert self.ckpt_store is not None
        store = self.ckpt_store
        listing: dict[str, Any] = {}
        if g.is_main and denied:
            listing = {"error": denied, "kind": "denied"}
        elif g.is_main:
            try:
                # nothing is uploading now: step dirs without COMMITTED are leftovers of a dead attempt
                with_retries(lambda: ck.clean_uncommitted(store), what="listing checkpoints", attempts=6)
                cands = with_retries(
                    lambda: ck.candidates(
                        store,
                        spec_hash=self.spec_hash,
                        on_spec_change=spec.checkpoint.on_spec_change,
                        world_size=g.world_size,
                        strategy=spec.parallel_config.strategy,
                        spec_fields=spec.training_fields(),
                        max_steps=spec.training.max_steps,
                    ),
                    what="listing checkpoints",
                    attempts=6,
                )
                listing = {"candidates": [(c.step, c.name, c.uri, c.manifest.to_json()) for c in cands]}
                listing["token"] = uuid.uuid4().hex[:16]
            except (ck.CheckpointError, StoreError) as e:
                listing = {"error": str(e), "kind": type(e).__name__}
        listing = g.broadcast(listing)
        self.token = listing.get("token", "")
        if listing.get("kind") == "denied":
            raise JobError(listing["error"])
        if "error" in listing:
            if listing["kind"] in ("StoreError", "TransientStoreError", "ObjectNotFound"):
                raise StoreError(f"checkpoints at {spec.checkpoint_uri()}: {listing['error']}")
            raise JobError(f"spec.checkpoint: {listing['error']}")
        chosen: ck.Checkpoint | None = None
        local_root = self.workdir / WORK_RESUME_DIR
        for step, name, uri, manifest_json in listing["candidates"]:
            c = ck.Checkpoint(step, name, uri, ck.Manifest.from_json(manifest_json))
            corrupt, unreachable, no_space = 0.0, 0.0, 0.0
            full: JobError | None = None
            why = "its files failed verification on another node"
            if g.local_rank == 0:
                try:
                    ck.download(store, c, local_root)
                except ck.CorruptCheckpoint as e:
                    log.warning("node %d: cannot use %s: %s", g.node_rank, c.uri, e)
                    corrupt, why = 1.0, str(e)
                except StoreError as e:
                    log.error("node %d: cannot download %s: %s", g.node_rank, c.uri, e)
                    unreachable = 1.0
                except JobError as e:  # no room for it on this node's scratch
                    full, no_space = e, 1.0
            # also the barrier: the node's other ranks wait here until local rank 0 has it
            corrupt, unreachable, no_space = g.max([corrupt, unreachable, no_space])
            if no_space:
                raise full or JobError(f"another node has no disk space for checkpoint {c.uri}")
            if unreachable:
                # not the checkpoint's fault: falling back to an older one (or to step 0) would
                # throw work away, so this attempt fails and the next one tries again
                raise StoreError(
                    f"could not download checkpoint {c.uri}; the job resumes from it once the store answers"
                )
            if not corrupt:
                chosen = c
                break
            if g.is_main:
                log.warning("skipping %s; trying the previous committed checkpoint", c.uri)
                # else the step retrained from the fallback would count as already committed
                ck.decommit(store, c, why)
        if chosen is None:
            if g.is_main:
                log.info("no committed checkpoint in %s: starting from step 0", store.uri)
            return
        self.resumed = chosen
        self.resume_from = local_root / chosen.name
        if g.is_main:
            log.info("resuming from %s (step %d)", chosen.uri, chosen.step)
            was, now = chosen.manifest.extra.get("max_steps"), spec.training.max_steps
            if now and was and was != now:  # past max_steps is refused in ck.candidates
                log.warning(
                    "spec.training.max_steps is %d, the checkpoint of step %d was written by a run of %d steps: "
                    "training continues from step %d to %d (the learning-rate schedule spans %d steps now)",
                    now, chosen.step, was, chosen.step, now, now,
                )  # fmt: skip
            assert self.progress is not None
            ref = {"uri": chosen.uri, "step": chosen.step}
            self.progress.update(resumed_from=ref, last_checkpoint=ref, step=chosen.step)
        if g.local_rank == 0:  # older downloads on this node are of no further use
            for old in local_root.glob("step-*"):
                if old.name != chosen.name:
                    import shutil

                    shutil.rmtree(old, ignore_errors=True)

    def _restore_metrics(self) -> None:
        """A new pod continues the job's metrics.jsonl (s3:// outputs live in the store, not here)."""
        if local_path(self.spec.output.uri) is not None or self.out_store is None:
            return
        if self.spec.tracking.tensorboard:  # and the job's one TensorBoard log dir
            tracking.restore_tensorboard(self.out_store, self.output_dir)
        local = self.output_dir / METRICS_FILE
        if local.exists():
            return
        try:
            self.out_store.get_file(METRICS_FILE, local)
        except ObjectNotFound:
            pass
        except StoreError as e:
            log.warning("could not fetch %s: %s", self.out_store.uri_for(METRICS_FILE), e)

    def _on_upload_state(self, what: str, step: int) -> None:
        if what == "failed" and self.progress is not None and self.uploader is not None:
            # training goes on; the operator and `kubetune status` show why checkpoints stopped coming
            self.progress.update(checkpoint_error=self.uploader.last_error, flush=True)

    def _on_commit(self, c: ck.Checkpoint) -> None:
        if self.progress is not None:
            self.progress.update(
                last_checkpoint={"uri": c.uri, "step": c.step}, checkpoint_error=None, flush=True
            )
        # keep the store's metrics.jsonl as far as the newest checkpoint (s3:// outputs)
        if self.out_store is not None and local_path(self.spec.output.uri) is None:
            local = self.output_dir / METRICS_FILE
            if local.is_file():
                data = local.read_bytes()
                data = data[: data.rfind(b"\n") + 1]
                try:
                    self.out_store.put_bytes(METRICS_FILE, data)
                except StoreError as e:
                    log.warning("could not upload %s: %s", METRICS_FILE, e)
            tracking.upload_logs(self.out_store, self.output_dir, self.spec)  # TensorBoard, W&B offline

    # ------------------------------------------------------------ SIGTERM, SIGINT
    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.stop_signal == "SIGINT":
            log.warning("second SIGINT: stopping now, without waiting for the checkpoint")
            raise KeyboardInterrupt
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
            self.stop_signal = name
            log.warning(
                "%s (phase %s): saving at the next step boundary, within %ds%s",
                name,
                self.phase,
                self.spec.checkpoint.sigterm_grace_seconds,
                "; Ctrl-C again to stop at once" if signum == signal.SIGINT else "",
            )
            if self.phase != "setup" and _is_trainer_process():
                self._start_watchdog()
        elif signum == signal.SIGINT:
            self.stop_signal = name  # a Ctrl-C after SIGTERM: the next one stops at once
        if self.phase == "setup":
            # nothing trained since the last committed checkpoint: leave now, resumable
            self._write_marker()
            self._say("stopped before training started; nothing new to save")
            raise SystemExit(self._exit_code())
        if self.phase == "after" and (self.uploader is None or self._final_committed()):
            # training is over and its last checkpoint is safe: a relaunch only redoes the export
            self._write_marker()
            self._say(
                f"stopped after the last step; checkpoint {self.final_step} committed; run again to export"
            )
            raise SystemExit(self._exit_code())

    def _exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.stop_signal == "SIGINT" else EXIT_PREEMPTED

    def _say(self, what: str) -> None:
        """The one line an interrupted run ends with (rank 0; Ctrl-C is for people)."""
        if self.stop_signal == "SIGINT" and self.gang.is_main:
            print(f"kubetune: interrupted: {what}", file=sys.stderr, flush=True)

    def _committed_summary(self) -> str:
        step = self.preempt_step if self.preempt_step is not None else self.final_step
        last = self.uploader.last_committed if self.uploader is not None else None
        before = last.step if last is not None else self.resumed.step if self.resumed is not None else None
        done = self.preempt_committed or (last is not None and step is not None and last.step >= step)
        if step is None:
            return f"last committed checkpoint: {before if before is not None else 'none'}"
        if done:
            return f"checkpoint step {step} committed"
        return (
            f"checkpoint step {step} NOT committed; last committed checkpoint: "
            f"{before if before is not None else 'none (a relaunch starts at step 0)'}"
        )

    def _start_watchdog(self) -> None:
        """End the process just before the grace budget ends when it is still exiting then (the
        interpreter joins boto3's transfer threads at exit, and an upload through a dead or slow
        store does not finish): the kubelet's SIGKILL would come without a word."""
        fire_at = (
            (self.sigterm_at or time.monotonic())
            + self.spec.checkpoint.sigterm_grace_seconds
            - WATCHDOG_MARGIN_SECONDS
        )

        def watch() -> None:
            while time.monotonic() < fire_at:
                time.sleep(max(0.0, min(0.2, fire_at - time.monotonic())))
            # our own waits are bounded by the budget, so this is the interpreter waiting at exit
            # for threads (boto3's transfers) that cannot finish, or a hung collective
            committed = bool(self.preempt_committed) or self._final_committed()
            print(
                f"kubetune: {self.stop_signal}: exiting before checkpoint.sigterm_grace_seconds="
                f"{self.spec.checkpoint.sigterm_grace_seconds} ends; {self._committed_summary()}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(self._exit_code() if committed else 1)

        threading.Thread(target=watch, name="kubetune-watchdog", daemon=True).start()

    def _final_committed(self) -> bool:
        u = self.uploader
        return (
            u is not None
            and self.final_step is not None
            and u.last_done_step >= self.final_step  # node K: its part of the final checkpoint
        )

    @property
    def deadline(self) -> float | None:
        if self.sigterm_at is None:
            return None
        return self.sigterm_at + self.spec.checkpoint.sigterm_grace_seconds - EXIT_MARGIN_SECONDS

    def _write_marker(self) -> None:
        if self.marker and self.gang.local_rank == 0:
            try:
                Path(self.marker).write_text(f"preempted {time.time():.0f}\n")
            except OSError as e:
                log.warning("could not write preemption marker %s: %s", self.marker, e)

    def _finish_preemption(self, step: int) -> None:
        """All ranks, in on_save of the SIGTERM save: wait for COMMITTED, agree, mark."""
        g = self.gang
        committed = False
        if g.is_main:
            assert self.uploader is not None and self.deadline is not None
            committed = self.uploader.wait_for_step(step, timeout=max(0.0, self.deadline - time.monotonic()))
            if committed:
                log.warning(
                    "preempted: checkpoint step %d committed %.1fs after %s",
                    step,
                    time.monotonic() - (self.sigterm_at or 0),
                    self.stop_signal,
                )
            else:
                log.error("preempted: checkpoint step %d NOT committed within the grace budget", step)
            if self.progress is not None:
                self.progress.set_state(
                    "preempted",
                    f"{self.stop_signal}; checkpoint step {step} "
                    + ("committed" if committed else "not committed in time"),
                    wait=max(0.5, min(3.0, (self.deadline or 0) - time.monotonic())),
                )
        committed = bool(g.broadcast(committed))
        self.preempt_step = step
        self.preempt_committed = committed
        if committed:
            self._write_marker()

    # ------------------------------------------------------------ the end
    def finish(self, result: Any) -> None:
        """After run_training returned (every rank)."""
        self.phase = "after"
        if self.preempt_committed is not None:
            step = self.preempt_step
            if self.stop_signal == "SIGINT":
                if self.preempt_committed:
                    self._say(f"at step {step}; checkpoint {step} committed; run again to resume")
                else:
                    self._say(
                        f"at step {step}; {self._committed_summary()} (not within "
                        f"checkpoint.sigterm_grace_seconds={self.spec.checkpoint.sigterm_grace_seconds}); "
                        "run again to resume from it"
                    )
                raise SystemExit(EXIT_INTERRUPTED)
            if not self.preempt_committed:
                # the store's fault, not the job's: a later attempt resumes from the last commit
                raise TransientStoreError(
                    f"preempted ({self.stop_signal}) and the checkpoint of step {step} could not be committed "
                    f"within checkpoint.sigterm_grace_seconds={self.spec.checkpoint.sigterm_grace_seconds}; "
                    f"{self._committed_summary()}: the job resumes from there"
                )
            return
        if not getattr(result, "completed", True):
            return
        # one budget for the last checkpoint and the output together (a long outage is seen once)
        end = time.monotonic() + self.spec.checkpoint.upload_timeout_seconds
        if self.deadline is not None:
            end = min(end, self.deadline)
        self.end_by = end
        if not self.gang.is_main:
            # rank 0 commits the last checkpoint only with this node's part in it
            if self.uploader is not None and not self.uploader.wait_idle(max(0.0, end - time.monotonic())):
                log.warning(
                    "node %d: its part of the last checkpoint was not uploaded in time", self.gang.node_rank
                )
            return
        assert self.uploader is not None and self.progress is not None and self.out_store is not None
        self.progress.set_state("saving", "uploading the last checkpoint and the output")
        idle = self.uploader.wait_idle(max(0.0, end - time.monotonic()))
        if self.uploader.last_error:
            log.warning("%s", self.uploader.last_error)
        self._log_checkpoint_costs()
        if self.uploader.fatal_error:
            raise JobError(f"spec.checkpoint.uri: {self.uploader.fatal_error}")
        if self.sigterm_at is not None:  # SIGTERM after the last step: exit resumable if the end is safe
            if self._final_committed():
                self._write_marker()
                self._say(f"after the last step; checkpoint {self.final_step} committed; run again to export")
                raise SystemExit(self._exit_code())
            raise JobError(f"preempted ({self.stop_signal}) before the last checkpoint was committed")
        budget = f"checkpoint.upload_timeout_seconds={self.spec.checkpoint.upload_timeout_seconds}"
        if not idle:
            raise TransientStoreError(
                f"the last checkpoint (step {self.final_step}) was not committed within {budget}"
                f"{self._outage_note()}; {self._committed_summary()}; the output was not uploaded"
            )
        if local_path(self.spec.output.uri) is None and self.output_dir.is_dir():
            out_store = self.out_store
            t0 = time.monotonic()
            try:
                with_retries(
                    lambda: out_store.upload_dir(self.output_dir, ""),
                    what=f"upload of {self.output_dir} to {out_store.uri}",
                    attempts=None,
                    deadline=end,
                )
            except TransientStoreError as e:
                raise TransientStoreError(
                    f"the output was not uploaded to {out_store.uri} within {budget}{self._outage_note()} "
                    f"({e}); {self._committed_summary()}"
                ) from None
            log.info("uploaded %s to %s in %.1fs", self.output_dir, out_store.uri, time.monotonic() - t0)
        self.progress.update(step=getattr(result, "global_step", 0))
        self.progress.set_state("done", None, wait=10)

    def _outage_note(self) -> str:
        outage = self.progress.outage() if self.progress is not None else None
        if not outage:
            return ""
        return f" (store unreachable since {outage['since']}, {outage['failed_attempts']} failed attempts)"

    def _log_checkpoint_costs(self) -> None:
        if not self.save_seconds or self.uploader is None:
            return
        n = len(self.save_seconds)
        ups = self.uploader.upload_seconds
        log.info(
            "checkpoint costs: %d saves, in the training loop %.3fs each (trainer save %.3fs + hand-off %.3fs); "
            "%d uploads in the background, %.2fs each",
            n,
            sum(a + b for a, b in self.save_seconds) / n,
            sum(a for a, _ in self.save_seconds) / n,
            sum(b for _, b in self.save_seconds) / n,
            len(ups),
            sum(ups) / max(1, len(ups)),
        )


class ResilienceCallback(TrainerCallback):
    """Wires `Resilience` into transformers' Trainer (all ranks)."""

    def __init__(self, res: Resilience) -> None:
        self.res = res
        self.every_seconds = (res.spec.checkpoint.every_minutes or 0) * 60
        self._t_step_end = time.monotonic()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        r = self.res
        r.phase = "training"
        r.last_save = time.monotonic()
        if r.progress is not None:
            r.progress.update(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch or 0.0)
            r.progress.set_state("running")
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        r = self.res
        now = time.monotonic()
        room = self._room_for_a_save(args, kwargs)
        flags = [
            1.0 if r.sigterm_at is not None else 0.0,
            1.0 if self.every_seconds and now - r.last_save >= self.every_seconds else 0.0,
            1.0 if r.uploader is not None and r.uploader.fatal_error else 0.0,
            1.0 if room is not None else 0.0,
        ]
        sigterm, timed, fatal, no_room = r.gang.max(flags)
        if fatal:
            # access denied, no such bucket: no checkpoint can ever commit, so training is wasted
            error = r.uploader.fatal_error if r.uploader is not None else None
            raise JobError(
                f"spec.checkpoint.uri: {error or 'another node cannot upload its checkpoint files'}; "
                f"stopped at step {state.global_step}"
            )
        if sigterm:
            if r.sigterm_at is None:  # another rank got it: the same budget applies here
                r.sigterm_at = now
            control.should_save = True
            control.should_training_stop = True
            r.preempt_step = state.global_step
            if r.progress is not None:
                r.progress.set_state("saving", "SIGTERM: saving a checkpoint before exiting")
        elif timed:
            control.should_save = True
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True  # the end is a checkpoint too: a pod lost during export resumes here
        if no_room and control.should_save:
            raise JobError(room or "another node has no disk space for the next checkpoint")
        if r.progress is not None:
            r.progress.update(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch or 0.0)
        self._t_step_end = time.monotonic()
        return control

    def _room_for_a_save(self, args: Any, kwargs: dict[str, Any]) -> str | None:
        """Local rank 0: why the next checkpoint would not fit on this node's scratch, or None."""
        r = self.res
        if r.gang.local_rank != 0:
            return None
        needed = r.save_estimate
        if needed is None:
            needed = _estimate_checkpoint_bytes(kwargs.get("model"), kwargs.get("optimizer"), r)
            r.save_estimate = needed
        if not needed:
            return None
        needed = int(needed * 1.1) + (1 << 20)  # headroom: trainer_state, RNG files, a little growth
        free = free_bytes(args.output_dir)
        if needed <= free:
            return None
        return no_space_message("saving a checkpoint", args.output_dir, needed, free)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> Any:
        r = self.res
        if r.progress is not None and logs:
            fields = {k: logs[k] for k in ("loss", "tokens_per_second", "eta_seconds") if k in logs}
            # method dpo: TRL logs rewards/chosen, /rejected, /margins, /accuracies with every loss
            rewards = {k.split("/", 1)[1]: logs[k] for k in logs if k.startswith("rewards/")}
            if rewards and "loss" in logs:
                fields["rewards"] = rewards
            # the method's other values (kto: kl; orpo: log_odds_ratio ...), as its table row lists them
            metrics = {k: logs[k] for k in methods.method(self.res.spec.method).progress_metrics if k in logs}
            if metrics:  # the newest of each: an evaluation's eval_* values stay beside the training ones
                fields["metrics"] = {**(r.progress.doc.metrics or {}), **metrics}
            if fields:
                r.progress.update(**fields)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        r = self.res
        g = r.gang
        step = state.global_step
        ckdir = Path(args.output_dir) / f"checkpoint-{step}"
        t_saved = r.last_save = time.monotonic()
        # every rank of the node has written its files (RNG state, FSDP shards) before they are staged
        g.barrier()
        if g.local_rank == 0 and not g.is_main:
            _remove_older_checkpoint_dirs(Path(args.output_dir), step)
        if g.local_rank == 0:  # the next save needs about as much room as this one took
            r.save_estimate = _dir_bytes(ckdir)
        preempting = r.sigterm_at is not None and control.should_training_stop
        if r.uploader is not None:
            r.uploader.submit(ckdir, step, urgent=preempting)
        # what this save cost the training loop: the Trainer's own save, then our hand-off
        r.save_seconds.append((t_saved - self._t_step_end, time.monotonic() - t_saved))
        if preempting:
            r._finish_preemption(step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.res.final_step = state.global_step
        self.res.phase = "after"
        return control


def _is_trainer_process() -> bool:
    """Whether this process is `python -m kubetune_trainer` (the watchdog may end it; a test or a
    notebook using Resilience is left alone)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "kubetune_trainer.__main__"


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _estimate_checkpoint_bytes(model: Any, optimizer: Any, res: Resilience) -> int:
    """Bytes the first checkpoint of this process will take: the resumed one's size, else the saved
    weights (the adapter only for peft models) plus the optimizer state (Adam: two fp32 tensors per
    trainable weight). 0 when unknown (FSDP shards: measured after the first save)."""
    if res.resume_from is not None and res.resume_from.is_dir():
        return _dir_bytes(res.resume_from)
    if model is None or res.spec.parallel_config.strategy == "fsdp":
        return 0
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    saved = trainable if hasattr(model, "peft_config") else params
    weights = sum(p.numel() * p.element_size() for p in saved)
    state = 0
    if optimizer is not None:
        import torch

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        for st in getattr(inner, "state", {}).values():
            state += sum(t.numel() * t.element_size() for t in st.values() if isinstance(t, torch.Tensor))
    return weights + max(state, 2 * 4 * sum(p.numel() for p in trainable))


def _remove_older_checkpoint_dirs(root: Path, step: int) -> None:
    import shutil

    for d in root.glob("checkpoint-*"):
        try:
            n = int(d.name.split("-", 1)[1])
        except ValueError:
            continue
        if n < step:
            shutil.rmtree(d, ignore_errors=True)


__all__ = ["ENV_PREEMPT_MARKER", "Gang", "Resilience", "ResilienceCallback"]
