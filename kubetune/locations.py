"""Where things are: a URI's local path, the local cache, the output layout (pure; no torch, no boto3).

The trainer, the operator and `kubetune` itself answer "where does this live" here and only here:

- :func:`local_path`: the local path a ``file://``, plain-path or ``pvc://claim/path`` URI names
  (the operator mounts a claim at :func:`kubetune.uris.pvc_mount_path`; ``$KUBETUNE_PVC_ROOT``
  stands in for the mount root outside the cluster), None for ``s3://`` and ``hf://`` (those are
  fetched: ``kubetune_trainer.locations.fetch``).
- :func:`cache_path`: the one place under ``$KUBETUNE_CACHE_DIR`` (default ``~/.cache/kubetune``)
  a fetched ``s3://`` URI lands, model, adapter, tokenizer or dataset alike:
  ``<cache>/fetched/<last segment>-<sha256(uri)[:16]>/`` holding the objects under the URI's prefix
  (a single object: the directory holds that one file), with :data:`COMPLETE_MARKER` written last.
- The output layout under ``spec.output.uri`` (:data:`PROGRESS_FILE`, :data:`FINAL_DIR` ...) and
  the layout of a trainer's local work directory (:data:`WORK_CHECKPOINTS_DIR` ...).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kubetune.uris import Uri, parse_uri, pvc_mount_path

# ---------------------------------------------------------------- environment

ENV_CACHE_DIR = "KUBETUNE_CACHE_DIR"  # local scratch: fetched inputs, work directories, progress copies
ENV_PVC_ROOT = "KUBETUNE_PVC_ROOT"  # outside the cluster: the directory standing in for /mnt/pvc

# ---------------------------------------------------------------- layout under spec.output.uri

PROGRESS_FILE = "progress.json"  # what the trainer is doing (kubetune.progress.TrainerProgress)
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "tensorboard"  # spec.tracking.tensorboard: one log dir per job
TRACKING_FILE = "tracking.json"  # the MLflow / W&B run ids a restarted attempt continues
FINAL_DIR = "final"
ADAPTER_DIR = "final/adapter"
MERGED_DIR = "final/merged"
CHECKPOINTS_DIR = "checkpoints"  # spec.checkpoint.uri's default, and the trainer's local checkpoint dir
EVAL_DIR = "eval"
EVAL_RESULTS_FILE = "eval/results.json"  # scores of the base and trained models, thresholds, pass/fail
EVAL_PREDICTIONS_FILE = "eval/predictions.jsonl"  # prompt, reference, base and trained prediction
LEASE_FILE = "LEASE"  # who writes this output now (trainer lease.py)
FINISHED_FILE = "FINISHED"  # {"step", "total_steps", "spec_hash"} of a finished run (trainer rerun.py)
# Tokenized data, one entry per data key (trainer data_cache.py): cache/data/<key>/{train,eval}/ + COMMITTED
DATA_CACHE_DIR = "cache/data"

# Under the checkpoint URI: step-00000100/ ... step-00000100/COMMITTED (the manifest, written last).
COMMITTED_FILE = "COMMITTED"
CHECKPOINT_PARTS_DIR = ".parts"  # step-N/.parts/node-K.json: what node K uploaded (multi-node)

# ---------------------------------------------------------------- local layout

# Under a trainer's work directory ($KUBETUNE_CACHE_DIR/work/<job>):
WORK_CHECKPOINTS_DIR = CHECKPOINTS_DIR  # the Trainer's checkpoint-N dirs
WORK_RESUME_DIR = "resume"  # the committed checkpoint downloaded to resume from
WORK_STAGING_DIR = "upload-staging"  # hard links of checkpoints being uploaded
WORK_OUTPUT_DIR = "output"  # final/, metrics.jsonl, loss.png before an s3:// output's upload
WORK_DIRS = (WORK_CHECKPOINTS_DIR, WORK_RESUME_DIR, WORK_STAGING_DIR, WORK_OUTPUT_DIR)

# Under the cache root:
CACHE_FETCHED_DIR = "fetched"  # s3:// inputs (cache_path)
CACHE_HF_DIR = "hf"  # hf:// models (huggingface_hub's own cache layout)
CACHE_WORK_DIR = "work"  # work directories, one per job name
CACHE_PROGRESS_DIR = "progress"  # the local copy of each job's progress.json
CACHE_DATA_DIR = "data"  # tokenized-data cache entries of s3:// outputs, fetched (trainer data_cache.py)
COMPLETE_MARKER = ".kubetune-complete"  # written last into a fetched directory: {"uri", "files"}


def cache_root() -> Path:
    """Local scratch: ``$KUBETUNE_CACHE_DIR``, else ``~/.cache/kubetune``."""
    return Path(os.environ.get(ENV_CACHE_DIR) or Path.home() / ".cache" / "kubetune")


def local_path(uri: str | Uri) -> Path | None:
    """The local path a file://, plain-path or pvc:// URI names; None for s3:// and hf://.

    pvc://claim/path is ``$KUBETUNE_PVC_ROOT/claim/path`` when that is set (runs outside the
    cluster), else the claim's mount in the pods (:func:`kubetune.uris.pvc_mount_path`).
    Raises ValueError for a malformed URI (the message says why).
    """
    u = uri if isinstance(uri, Uri) else parse_uri(uri)
    if u.scheme == "file":
        return Path(u.path).expanduser()
    if u.scheme == "pvc":
        override = os.environ.get(ENV_PVC_ROOT)
        base = Path(override) / u.netloc if override else Path(pvc_mount_path(u.netloc))
        return base / u.path if u.path else base
    return None


def cache_path(uri: str) -> Path:
    """The directory an s3:// URI (an object or a prefix) is fetched into: one layout for every input."""
    text = str(parse_uri(uri)).rstrip("/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text.rsplit("/", 1)[-1])[:40].strip("-.") or "root"
    return cache_root() / CACHE_FETCHED_DIR / f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def work_dir(job_name: str) -> Path:
    """A job's local work directory (checkpoints, resume, staging, output) on this machine."""
    return cache_root() / CACHE_WORK_DIR / job_name


def local_progress_path(job_name: str, output_uri: str) -> Path:
    """Where the trainer keeps the local copy of a job's progress.json on this machine."""
    digest = hashlib.sha256(output_uri.rstrip("/").encode()).hexdigest()[:12]
    return cache_root() / CACHE_PROGRESS_DIR / f"{job_name}-{digest}.json"


def output_uri(output: str, key: str) -> str:
    """The URI of `key` (a name of the output layout) under the output URI, as the user wrote it."""
    return f"{output.rstrip('/')}/{key}"


def default_checkpoint_uri(output: str) -> str:
    """spec.checkpoint.uri when unset: <output>/checkpoints."""
    return output_uri(output, CHECKPOINTS_DIR)


__all__ = [
    "ADAPTER_DIR", "CACHE_DATA_DIR", "CACHE_FETCHED_DIR", "CACHE_HF_DIR", "CACHE_PROGRESS_DIR", "CACHE_WORK_DIR", "CHECKPOINTS_DIR",
    "CHECKPOINT_PARTS_DIR", "COMMITTED_FILE", "COMPLETE_MARKER", "DATA_CACHE_DIR", "ENV_CACHE_DIR", "ENV_PVC_ROOT", "EVAL_DIR",
    "EVAL_PREDICTIONS_FILE", "EVAL_RESULTS_FILE", "FINAL_DIR", "FINISHED_FILE", "LEASE_FILE", "LOSS_PLOT",
    "MERGED_DIR", "METRICS_FILE", "PROGRESS_FILE", "TENSORBOARD_DIR", "TRACKING_FILE", "WORK_CHECKPOINTS_DIR",
    "WORK_DIRS", "WORK_OUTPUT_DIR", "WORK_RESUME_DIR", "WORK_STAGING_DIR", "cache_path", "cache_root",
    "default_checkpoint_uri", "local_path", "local_progress_path", "output_uri", "work_dir",
]  # fmt: skip
