"""``python -m kubetune_trainer --config job.yaml [--workdir DIR]``: what every trainer process runs.

torchrun starts it once per process (in pods, and locally through ``kubetune run``); RANK,
WORLD_SIZE and LOCAL_RANK come from torchrun's environment (a plain ``python -m`` call is a single
process). ``--config`` defaults to where the operator mounts the job (/etc/kubetune/job.yaml);
``--workdir`` (node-local scratch: checkpoints, downloads of this job) defaults to
``$KUBETUNE_CACHE_DIR/work/<job name>`` (``~/.cache/kubetune`` without the variable).

Exit status: 0 when training finished and the final model is written; 65 (``EXIT_USER_ERROR``)
for a problem the job's author fixes (an invalid job file, bad data, denied credentials, another
run writing the output): one line on stderr naming it, no traceback, and the same line in the
container's termination message (the file $KUBETUNE_TERMINATION_MESSAGE_PATH names, else
/dev/termination-log where the kubelet provides it) and in $KUBETUNE_USER_ERROR_MARKER (set by
``kubetune_trainer.supervise`` and ``kubetune run``: torchrun loses the workers' exit codes);
75 (``EXIT_PREEMPTED``) when training stopped before its last step (stopped by a callback, e.g.
on SIGTERM) so the gang can be restarted and resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kubetune.conventions import (
    CONFIG_PATH,
    ENV_AGENT_PID,
    ENV_RESTART,
    ENV_TERMINATION_MESSAGE_PATH,
    ENV_USER_ERROR_MARKER,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    TERMINATION_MESSAGE_PATH,
)
from kubetune.validate import SpecError, load_job

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob
    from kubetune_trainer.lease import Lease
    from kubetune_trainer.train import TrainResult


def default_workdir(job: FineTuneJob) -> Path:
    from kubetune.locations import work_dir

    return work_dir(job.metadata.name)


def run_job(job: FineTuneJob, workdir: Path) -> TrainResult:
    """Everything one trainer process does for a job.

    The place where checkpoint sync to the object store, the SIGTERM save, progress.json and the
    upload of an s3:// output plug in: build their `TrainerCallback`s and the local checkpoint to
    resume from, pass them to `run_training`, upload `result.output_dir` when it is not the output
    URI itself.
    """
    from kubetune_trainer.resilience import Resilience
    from kubetune_trainer.train import run_training

    lease = _take_lease(job) if int(os.environ.get("RANK", 0)) == 0 else None
    try:
        if lease is not None and os.environ.get(ENV_RESTART) == "1":
            from kubetune_trainer.rerun import supersede

            supersede(job)
        with Resilience(job, workdir=workdir) as res:
            callbacks = res.callbacks()
            from kubetune_trainer.startup import startup_callback

            callbacks.append(startup_callback())  # one line: what this start cost before training
            if lease is not None:
                from kubetune_trainer.lease import lease_callback

                callbacks.append(lease_callback(lease))
            result = run_training(job, workdir=workdir, callbacks=callbacks, resume_from=res.resume_from)
            res.finish(result)
            if job.spec.evaluation is not None:  # once the model is uploaded; rank 0 scores it
                from kubetune_trainer.evaluation import evaluate_after_training

                evaluate_after_training(job, result)
        if lease is not None and result.completed:
            from kubetune_trainer.rerun import mark_finished

            mark_finished(job, result.global_step, result.max_steps)
    finally:
        if lease is not None:
            lease.release()
    return result


def _take_lease(job: FineTuneJob) -> Lease:
    """Rank 0: the output's lease, before anything is written (LeaseHeld when another run has it)."""
    from kubetune.conventions import ENV_ATTEMPT
    from kubetune_trainer.lease import Lease
    from kubetune_trainer.store import open_store, probe_write

    store = open_store(job.spec.output.uri, job.spec.storage.s3)
    probe_write(store, "spec.output.uri")  # credentials that may not write: the field named, not LEASE
    attempt = int(os.environ.get(ENV_ATTEMPT, "0") or 0)
    return Lease.acquire(store, job=job.metadata.name, attempt=attempt)


def _setup_logging(rank: int) -> None:
    """kubetune's own INFO lines on rank 0; other libraries' warnings (errors only on other ranks)."""
    from kubetune_trainer.train import quiet_known_noise

    prefix = "" if int(os.environ.get("WORLD_SIZE", 1)) == 1 else f"[rank {rank}] "
    logging.basicConfig(
        level=logging.WARNING if rank == 0 else logging.ERROR,
        format=f"{prefix}%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("kubetune").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    quiet_known_noise()
    if rank != 0:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _user_errors() -> tuple[type[BaseException], ...]:
    from kubetune_trainer.data_sources import DataError
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.store import StoreError

    return (JobError, DataError, StoreError)


def _is_transient(e: BaseException) -> bool:
    from kubetune_trainer.store import TransientStoreError

    return isinstance(e, TransientStoreError)


def _summary(result: TrainResult) -> str:
    parts = [f"done: {result.global_step} steps in {result.runtime_seconds:.0f}s"]
    if result.first_loss is not None and result.last_loss is not None:
        parts.append(f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    if result.eval_loss is not None:
        parts.append(f"eval_loss {result.eval_loss:.4f}")
    parts += [f"{name}: {path}" for name, path in result.exported.items()]
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m kubetune_trainer", description="Run a FineTuneJob (one process)."
    )
    p.add_argument("--config", default=CONFIG_PATH, help=f"the FineTuneJob YAML (default {CONFIG_PATH})")
    p.add_argument(
        "--workdir", default=None, help="node-local scratch (default $KUBETUNE_CACHE_DIR/work/<name>)"
    )
    args = p.parse_args(argv)
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # started by torchrun: never outlive it
        from kubetune_trainer.lifetime import die_with_parent

        agent = os.environ.get(ENV_AGENT_PID)
        die_with_parent(expected_parent=int(agent) if agent else None)
    rank = int(os.environ.get("RANK", 0))
    tag = "" if rank == 0 else f" (rank {rank})"
    try:
        job = load_job(args.config)
    except SpecError as e:
        for problem in e.problems:
            print(f"kubetune: {problem}", file=sys.stderr)
        report_user_error("; ".join(str(p) for p in e.problems))
        return EXIT_USER_ERROR
    _setup_logging(rank)
    workdir = Path(args.workdir) if args.workdir else default_workdir(job)
    finished = False
    try:
        result = run_job(job, workdir)
        finished = True
    except _user_errors() as e:
        print(f"kubetune: error{tag}: {e}", file=sys.stderr, flush=True)
        if _is_transient(e):  # the store was down: a later attempt may well succeed
            return 1
        report_user_error(f"{e}{tag}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        _destroy_process_group(wait_for_gang=finished)
    if not result.completed:
        print(
            f"kubetune: stopped at step {result.global_step} of {result.max_steps} before the end; "
            f"exit {EXIT_PREEMPTED} (resumable)",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if rank == 0:
        print(f"kubetune: {_summary(result)}", file=sys.stderr, flush=True)
    return 0


_TERMINATION_MESSAGE_MAX = 4096  # what the kubelet keeps of a termination message


def termination_message_path() -> Path | None:
    """$KUBETUNE_TERMINATION_MESSAGE_PATH, else /dev/termination-log where the kubelet created it."""
    named = os.environ.get(ENV_TERMINATION_MESSAGE_PATH)
    if named:
        return Path(named)
    default = Path(TERMINATION_MESSAGE_PATH)
    # never create it on a developer's machine: only a file the kubelet mounted counts
    return default if default.is_file() and os.access(default, os.W_OK) else None


def report_user_error(reason: str) -> None:
    """Leave the one-line reason where the operator and the launcher look for it. The first rank to
    fail wins (not the ones torchrun stopped afterwards)."""
    line = reason.replace("\n", " ").strip().encode()[:_TERMINATION_MESSAGE_MAX].decode(errors="ignore")
    marker = os.environ.get(ENV_USER_ERROR_MARKER)
    for path, mode in ((termination_message_path(), "a"), (marker and Path(marker), "x")):
        if not path:
            continue
        try:
            with open(path, mode, encoding="utf-8") as f:
                if f.tell() == 0:  # the kubelet's file exists, empty
                    f.write(line)
        except FileExistsError:
            pass
        except OSError as e:
            print(f"kubetune: could not write {path}: {e}", file=sys.stderr)


def _destroy_process_group(*, wait_for_gang: bool) -> None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return
    if dist.is_available() and dist.is_initialized():
        if wait_for_gang:
            # a rank that tore its gloo connections down while rank 0 was still exporting (which
            # gathers from every rank) sometimes died in gloo's threads (SIGABRT) after a good run
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
