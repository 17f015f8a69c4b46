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
- rank 0 keeps `<output.uri>/progress.json` current (see progress.py).

`finish` (rank 0) waits for the last checkpoint's upload, uploads the local output directory when
the output URI is s3://, and marks progress.json done.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from kubetune.conventions import ENV_ATTEMPT, EXIT_PREEMPTED, METRICS_FILE
from kubetune_trainer import checkpoints as ck
from kubetune_trainer.errors import JobError
from kubetune_trainer.progress import ProgressWriter
from kubetune_trainer.store import (
    ObjectNotFound,
    ObjectStore,
    StoreError,
    local_path_for,
    open_store,
    with_retries,
)
from kubetune_trainer.uploader import CheckpointUploader

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob

log = logging.getLogger("kubetune.resilience")

ENV_PREEMPT_MARKER = "KUBETUNE_PREEMPT_MARKER"  # file the trainer writes after a committed SIGTERM save
EXIT_MARGIN_SECONDS = 2.0  # of the grace budget, kept for stopping the processes after the commit
FINAL_UPLOAD_TIMEOUT_SECONDS = 900.0
FAILURE_UPLOAD_GRACE_SECONDS = 20.0  # torchrun stops the other workers within TORCH_ELASTIC_SHUTDOWN_TIMEOUT
ENV_TEST_STEP_DELAY = "KUBETUNE_TEST_STEP_DELAY"  # seconds slept after every step (tests, benchmarks)


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
        self.sigterm_at: float | None = None
        self.preempt_step: int | None = None
        self.preempt_committed: bool | None = None
        self.final_step: int | None = None
        self.save_seconds: list[tuple[float, float]] = []  # (Trainer save, hand-off) per checkpoint
        self.last_save = time.monotonic()
        self._old_handler: Any = None
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
        # after SIGTERM the kubelet's SIGKILL is near: never wait past the grace budget
        budget = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

        def within(seconds: float) -> float:
            return seconds if budget is None else min(seconds, budget)

        try:
            preempted = isinstance(exc, SystemExit) and exc.code == EXIT_PREEMPTED
            if exc is not None and self.progress is not None:
                if preempted:
                    self.progress.set_state("preempted", "SIGTERM", wait=within(3))
                else:
                    reason = f"{type(exc).__name__}: {exc}".strip()
                    self.progress.set_state("failed", reason[:500], wait=within(5))
            if self.uploader is not None:
                # a crash elsewhere in the gang: a checkpoint already handed over still gets its chance
                self.uploader.close(timeout=0 if preempted else within(FAILURE_UPLOAD_GRACE_SECONDS))
            if self.progress is not None:
                self.progress.close(timeout=within(3))
        finally:
            if self._old_handler is not None:
                signal.signal(signal.SIGTERM, self._old_handler)

    def start(self) -> None:
        g = self.gang
        self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        g.setup()
        spec = self.spec
        s3 = spec.storage.s3
        self.ckpt_store = open_store(spec.checkpoint_uri(), s3)
        if g.is_main:
            self.out_store = open_store(spec.output.uri, s3)
            self.progress = ProgressWriter(
                self.out_store,
                job=self.job.metadata.name,
                attempt=int(os.environ.get(ENV_ATTEMPT, "0") or 0),
                world_size=g.world_size,
            )
            self.progress.set_state("starting")
        self._resolve_resume()
        if g.is_main:
            self._restore_metrics()
        if g.local_rank == 0:
            main = g.is_main
            self.uploader = CheckpointUploader(
                self.ckpt_store,
                spec_hash=self.spec_hash,
                world_size=g.world_size,
                keep_last=spec.checkpoint.keep_last,
                staging_dir=self.workdir / "upload-staging",
                extra={
                    "job": self.job.metadata.name,
                    "strategy": spec.parallel_config.strategy,
                    "nnodes": spec.parallel_config.nnodes,
                    "world_size": g.world_size,
                    "pet_type": spec.pet_config.pet_type,
                    "method": spec.method,
                },
                on_commit=self._on_commit if main else None,
                on_state=self._on_upload_state if main else None,
                node=g.node_rank,
                nodes=g.nnodes,
                token=self.token,
            )

    def callbacks(self) -> list[TrainerCallback]:
        return [ResilienceCallback(self)]

    # ------------------------------------------------------------ resume
    def _resolve_resume(self) -> None:
        """Agree on the newest committed checkpoint, download it once per node, verify it."""
        g = self.gang
        spec = self.spec
        assert self.ckpt_store is not None
        store = self.ckpt_store
        listing: dict[str, Any] = {}
        if g.is_main:
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
        if "error" in listing:
            if listing["kind"] in ("StoreError", "TransientStoreError", "ObjectNotFound"):
                raise StoreError(f"checkpoints at {spec.checkpoint_uri()}: {listing['error']}")
            raise JobError(f"spec.checkpoint: {listing['error']}")
        chosen: ck.Checkpoint | None = None
        local_root = self.workdir / "resume"
        for step, name, uri, manifest_json in listing["candidates"]:
            c = ck.Checkpoint(step, name, uri, ck.Manifest.from_json(manifest_json))
            corrupt, unreachable = 0.0, 0.0
            if g.local_rank == 0:
                try:
                    ck.download(store, c, local_root)
                except ck.CorruptCheckpoint as e:
                    log.warning("node %d: cannot use %s: %s", g.node_rank, c.uri, e)
                    corrupt = 1.0
                except StoreError as e:
                    log.error("node %d: cannot download %s: %s", g.node_rank, c.uri, e)
                    unreachable = 1.0
            # also the barrier: the node's other ranks wait here until local rank 0 has it
            corrupt, unreachable = g.max([corrupt, unreachable])
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
        if chosen is None:
            if g.is_main:
                log.info("no committed checkpoint in %s: starting from step 0", store.uri)
            return
        self.resumed = chosen
        self.resume_from = local_root / chosen.name
        if g.is_main:
            log.info("resuming from %s (step %d)", chosen.uri, chosen.step)
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
        if local_path_for(self.spec.output.uri) is not None or self.out_store is None:
            return
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
        if self.out_store is not None and local_path_for(self.spec.output.uri) is None:
            local = self.output_dir / METRICS_FILE
            if local.is_file():
                data = local.read_bytes()
                data = data[: data.rfind(b"\n") + 1]
                try:
                    self.out_store.put_bytes(METRICS_FILE, data)
                except StoreError as e:
                    log.warning("could not upload %s: %s", METRICS_FILE, e)

    # ------------------------------------------------------------ SIGTERM
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.sigterm_at is None:
            self.sigterm_at = time.monotonic()
            log.warning(
                "SIGTERM (phase %s): saving at the next step boundary, within %ds",
                self.phase,
                self.spec.checkpoint.sigterm_grace_seconds,
            )
        if self.phase == "setup":
            # nothing trained since the last committed checkpoint: leave now, resumable
            self._write_marker()
            raise SystemExit(EXIT_PREEMPTED)
        if self.phase == "after" and (self.uploader is None or self._final_committed()):
            # training is over and its last checkpoint is safe: a relaunch only redoes the export
            self._write_marker()
            raise SystemExit(EXIT_PREEMPTED)

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
                    "preempted: checkpoint step %d committed %.1fs after SIGTERM",
                    step,
                    time.monotonic() - (self.sigterm_at or 0),
                )
            else:
                log.error("preempted: checkpoint step %d NOT committed within the grace budget", step)
            if self.progress is not None:
                self.progress.set_state(
                    "preempted",
                    f"SIGTERM; checkpoint step {step} "
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
            if not self.preempt_committed:
                raise JobError(
                    f"preempted (SIGTERM) and the checkpoint of step {self.preempt_step} could not be committed "
                    f"within checkpoint.sigterm_grace_seconds={self.spec.checkpoint.sigterm_grace_seconds}; "
                    f"the job resumes from the previous committed checkpoint"
                )
            return
        if not getattr(result, "completed", True):
            return
        if not self.gang.is_main:
            # rank 0 commits the last checkpoint only with this node's part in it
            if self.uploader is not None and not self.uploader.wait_idle(self._final_timeout()):
                log.warning(
                    "node %d: its part of the last checkpoint was not uploaded in time", self.gang.node_rank
                )
            return
        assert self.uploader is not None and self.progress is not None and self.out_store is not None
        self.progress.set_state("saving", "uploading the last checkpoint and the output")
        timeout = self._final_timeout()
        if not self.uploader.wait_idle(timeout):
            log.warning("the last checkpoint was not committed within %.0fs", timeout)
        if self.uploader.last_error:
            log.warning("%s", self.uploader.last_error)
        self._log_checkpoint_costs()
        if self.sigterm_at is not None:  # SIGTERM after the last step: exit resumable if the end is safe
            if self._final_committed():
                self._write_marker()
                raise SystemExit(EXIT_PREEMPTED)
            raise JobError("preempted (SIGTERM) before the last checkpoint was committed")
        if local_path_for(self.spec.output.uri) is None and self.output_dir.is_dir():
            out_store = self.out_store
            t0 = time.monotonic()
            with_retries(
                lambda: out_store.upload_dir(self.output_dir, ""),
                what=f"upload of {self.output_dir} to {out_store.uri}",
                attempts=None,
                deadline=time.monotonic() + timeout,
            )
            log.info("uploaded %s to %s in %.1fs", self.output_dir, out_store.uri, time.monotonic() - t0)
        self.progress.update(step=getattr(result, "global_step", 0))
        self.progress.set_state("done", None, wait=10)

    def _final_timeout(self) -> float:
        if self.deadline is not None:
            return max(0.0, self.deadline - time.monotonic())
        return FINAL_UPLOAD_TIMEOUT_SECONDS

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
        # tests and benchmarks: make steps take at least this long, so a kill lands mid-training
        self.step_delay = float(os.environ.get(ENV_TEST_STEP_DELAY, "0") or 0)
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
        if self.step_delay:
            time.sleep(self.step_delay)
        now = time.monotonic()
        flags = [
            1.0 if r.sigterm_at is not None else 0.0,
            1.0 if self.every_seconds and now - r.last_save >= self.every_seconds else 0.0,
        ]
        sigterm, timed = r.gang.max(flags)
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
        if r.progress is not None:
            r.progress.update(step=state.global_step, total_steps=state.max_steps, epoch=state.epoch or 0.0)
        self._t_step_end = time.monotonic()
        return control

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> Any:
        r = self.res
        if r.progress is not None and logs:
            fields = {k: logs[k] for k in ("loss", "tokens_per_second", "eta_seconds") if k in logs}
            # method dpo: TRL logs rewards/chosen, /rejected, /margins, /accuracies with every loss
            rewards = {k.split("/", 1)[1]: logs[k] for k in logs if k.startswith("rewards/")}
            if rewards and "loss" in logs:
                fields["rewards"] = rewards
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
