"""The trainer process under faults a user meets, end to end: `python -m kubetune_trainer` on a real
SeaweedFS (with a read-only identity) and on a real file system that fills up (a small tmpfs).
Each fails in seconds with one line naming what to fix, before the model loads where it can.

SIGINT, SIGTERM with a store too slow to commit, kill -9 and outages of gangs under torchrun are in
test_resilience_e2e.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.locations import CACHE_FETCHED_DIR
from tests.fixtures_cli import cli_env
from tests.fixtures_train import on_small_disk, write_job_file

pytestmark = pytest.mark.slow


def trainer(config: Path, env: dict[str, str], *, workdir: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "kubetune_trainer", "--config", str(config)]
    return argv + (["--workdir", str(workdir)] if workdir else [])


def run(argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    """The run failed with kubetune's own last line and no traceback; that line."""
    assert p.returncode not in (0, 75), p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune: error: "), p.stderr[-3000:]
    return last


def test_read_only_credentials_fail_before_the_model_loads(s3, train_job, tiny_model_dirs, tmp_path):
    job = train_job(tmp_path / "out")
    config = write_job_file(
        job,
        tmp_path / "job.yaml",
        storage={"s3": {"endpoint": s3.endpoint}},
        checkpoint={"uri": s3.uri("ckpt")},
    )
    p = run(trainer(config, {}), cli_env(tmp_path, **s3.server.readonly_env), timeout=120)
    line = one_line_error(p)
    assert line.startswith(f"kubetune: error: spec.checkpoint.uri: cannot write to {s3.uri('ckpt')}: ")
    assert "access denied (AccessDenied)" in line
    assert "the AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment variables" in line
    assert "trainable params" not in p.stderr  # the model never loaded
    assert not s3.keys()

    job = train_job(s3.uri("jobs/ro"))  # the output itself read-only
    config = write_job_file(job, tmp_path / "job2.yaml", storage={"s3": {"endpoint": s3.endpoint}})
    p = run(trainer(config, {}), cli_env(tmp_path, **s3.server.readonly_env), timeout=120)
    line = one_line_error(p)
    assert line.startswith(f"kubetune: error: spec.output.uri: cannot write to {s3.uri('jobs/ro')}: ")
    assert "access denied (AccessDenied)" in line and not s3.keys()


def test_a_model_larger_than_the_free_scratch_space_is_refused_before_the_download(
    s3, train_job, tiny_model_dirs, tmp_path
):
    s3.store("models/tiny").upload_dir(tiny_model_dirs["qwen2"], "")
    job = train_job(tmp_path / "out", model_uri=s3.uri("models/tiny"))
    config = write_job_file(job, tmp_path / "job.yaml", storage={"s3": {"endpoint": s3.endpoint}})
    small = tmp_path / "small"  # KUBETUNE_CACHE_DIR, where models are downloaded to
    p = run(on_small_disk(small, "1m", trainer(config, {})), cli_env(tmp_path, KUBETUNE_CACHE_DIR=str(small)))
    line = one_line_error(p)
    assert line.startswith(f"kubetune: error: spec.model.uri: downloading {s3.uri('models/tiny')}: ")
    assert f"not enough disk space in {small / CACHE_FETCHED_DIR} (needs 1.6 MB, 1.0 MB free)" in line
    assert "spec.resources.scratch_size" in line


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_the_directory(
    train_job, tiny_model_dirs, tmp_path
):
    # a full fine-tune: about 4.4 MB per checkpoint (weights and Adam's two moments) on a 2 MB scratch
    job = train_job(tmp_path / "out", pet_config={"pet_type": "full"}, training={"max_steps": 4})
    config = write_job_file(job, tmp_path / "job.yaml", checkpoint={"every_steps": 2})
    work = tmp_path / "scratch"
    p = run(on_small_disk(work, "2m", trainer(config, {}, workdir=work)), cli_env(tmp_path))
    line = one_line_error(p)
    assert line.startswith(
        f"kubetune: error: saving a checkpoint: not enough disk space in {work / 'checkpoints'} (needs "
    )
    assert "MB free); give the pods more scratch space with spec.resources.scratch_size" in line
    assert "SafetensorError" not in p.stderr
