"""``kubetune run job.yaml``: run a FineTuneJob on this machine under torchrun, no cluster needed.

:func:`run_local` validates the job, applies the command line's overrides (``--output``,
``--max-steps``) to a temporary copy of it, checks that this machine can run the method (the same
one-line errors the pods give, before any process starts), then starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m kubetune_trainer --config COPY

in the current directory (relative URIs in the job are relative to it). N is ``--nproc-per-node``,
else ``spec.parallel_config.nproc_per_node``, else the number of GPUs, else 1. The processes talk
over gloo on CPU and NCCL on GPUs (accelerate picks the backend from the device). torchrun's
in-pod restarts are off locally.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from kubetune.validate import load_job, load_jobs_text


def _default_nproc() -> tuple[int, str]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (gpus, "cuda") if gpus else (1, "cpu")


def _preflight(job: object) -> str | None:
    """The one-line reason this machine cannot run the job, or None."""
    from kubetune_trainer import methods, model_loading
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.train import quiet_known_noise

    quiet_known_noise()
    spec = job.spec  # type: ignore[attr-defined]
    try:
        precision = model_loading.resolve_precision(spec.training.precision)
        methods.plan_method(spec, precision)
        if spec.model.uri.split("://", 1)[0] not in ("s3", "hf"):
            model_loading.resolve_model_dir(spec.model.uri)
    except JobError as e:
        return str(e)
    return None


def run_local(
    path: str | os.PathLike,
    nproc_per_node: int | None = None,
    output: str | None = None,
    max_steps: int | None = None,
) -> int:
    """Run the job in `path` locally; returns the exit status (0: trained and exported)."""
    job = load_job(path)
    doc = job.model_dump(mode="json", exclude_none=True)
    if output is not None:
        doc["spec"]["output"]["uri"] = output
    if max_steps is not None:
        doc["spec"]["training"]["max_steps"] = max_steps
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    job = load_jobs_text(text, str(path))[0]  # the overrides are validated like the file

    problem = _preflight(job)
    if problem:
        print(f"kubetune: error: {problem}", file=sys.stderr)
        return 1
    detected, device = _default_nproc()
    nproc = nproc_per_node or job.spec.parallel_config.nproc_per_node or detected
    backend = "nccl" if device == "cuda" else "gloo"
    print(
        f"kubetune run: {job.metadata.name}: {job.spec.method} {job.spec.pet_config.pet_type} "
        f"on {nproc} process{'es' if nproc > 1 else ''} ({device}, {backend}); output {job.spec.output.uri}",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-run-") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(text, encoding="utf-8")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "kubetune_trainer", "--config", str(config),
        ]  # fmt: skip
        env = dict(os.environ)
        if device == "cpu" and "OMP_NUM_THREADS" not in env:  # else accelerate warns and picks its own
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        proc = subprocess.Popen(cmd, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # torchrun got the same SIGINT and stops its workers
            return proc.wait()
