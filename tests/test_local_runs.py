"""`kubetune run` as a new user meets it: a finished job run again, a job changed between runs,
a laptop that cannot run the job, the adapter's record of its base model, the last line printed.

One short LoRA run of the tiny model (relative model and output paths, as the demo has them)
is shared; the tests that train further work on copies of its output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune.conventions import EXIT_USER_ERROR
from tests.fixtures_cli import cli_env, kubetune
from tests.fixtures_data import REPO
from tests.fixtures_train import write_job_file

STEPS = 4


class Finished:
    def __init__(self, cwd: Path, job: Path, run: Any) -> None:
        self.cwd, self.job, self.run = cwd, job, run
        self.out = cwd / "out"

    def copy(self, tmp_path: Path) -> Path:
        """A copy of the finished output, for a test that writes to it."""
        dst = tmp_path / "out-copy"
        shutil.copytree(self.out, dst, ignore=shutil.ignore_patterns("LEASE", ".LEASE.lock"))
        return dst

    def final_files(self) -> dict[str, int]:
        return {str(p.relative_to(self.out)): p.stat().st_mtime_ns for p in (self.out / "final").rglob("*")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: Any, train_job: Any) -> Finished:
    cwd = tmp_path_factory.mktemp("local-run")
    shutil.copytree(tiny_model_dirs["qwen2"], cwd / "runs" / "tiny")
    job = train_job("out", model_uri="runs/tiny", training={"max_steps": STEPS}, merge_adapter=False)
    path = write_job_file(job, cwd / "job.yaml", checkpoint={"every_steps": 2})
    run = kubetune("run", "job.yaml", cwd=cwd, env=cli_env(cwd), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return Finished(cwd, path, run)


def _loss_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def _last_line(proc: Any) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_the_adapter_records_its_base_model_as_an_absolute_path(finished: Finished) -> None:
    config = json.loads((finished.out / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(finished.cwd / "runs" / "tiny")


def _first_run_dir(finished: Finished) -> Path:
    runs = sorted((finished.cwd / "cache" / "work" / "t").iterdir())
    return runs[0]


def test_each_run_has_its_own_work_directory_with_its_log(finished: Finished) -> None:
    first = _first_run_dir(finished)
    assert "kubetune: done" in (first / "run.log").read_text()
    assert not (first / "checkpoints").exists()  # a finished run's local copies are gone


def test_a_finished_job_says_so_and_trains_nothing(finished: Finished) -> None:
    before = finished.final_files()
    again = kubetune("run", "job.yaml", cwd=finished.cwd, env=cli_env(finished.cwd))
    assert again.returncode == 0, again.stderr
    assert _last_line(again).startswith(
        f"kubetune run: t: already finished (step {STEPS}/{STEPS}); nothing to do. The model is in out/final"
    )
    assert "--restart" in _last_line(again)
    assert "trainable params" not in again.stderr  # the model was never loaded
    assert finished.final_files() == before


def test_a_changed_learning_rate_is_refused_like_a_model_change(finished: Finished, train_job: Any) -> None:
    changed = train_job("out", model_uri="runs/tiny", training={"max_steps": STEPS, "learning_rate": 5e-3})
    job = write_job_file(changed, finished.cwd / "changed-lr.yaml", checkpoint={"every_steps": 2})
    before = finished.final_files()
    proc = kubetune("run", job.name, cwd=finished.cwd, env=cli_env(finished.cwd), timeout=300)
    assert proc.returncode == EXIT_USER_ERROR
    last = _last_line(proc)
    assert last.startswith("kubetune run: error: spec.checkpoint: the newest checkpoint ")
    assert "spec.training.learning_rate 0.01 -> 0.005" in last
    for fix in ("Restore the original spec", "point checkpoint.uri elsewhere", "on_spec_change: start_over"):
        assert fix in last
    # 10: kubetune's line is the last one; the run's log holds everything the trainer printed (one
    # process: no torchrun, whose report of the failed worker would be logged there too)
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    log = Path(last.rsplit("(full log: ", 1)[1].rstrip(")"))
    assert "kubetune: error: spec.checkpoint: the newest checkpoint " in log.read_text()
    assert log.parent.parent == _first_run_dir(finished).parent and log.parent != _first_run_dir(finished)
    assert finished.final_files() == before


def test_max_steps_below_the_newest_checkpoint_is_refused(finished: Finished) -> None:
    before = finished.final_files()
    proc = kubetune(
        "run", "job.yaml", "--max-steps", "2", cwd=finished.cwd, env=cli_env(finished.cwd), timeout=300
    )
    assert proc.returncode == EXIT_USER_ERROR
    last = _last_line(proc)
    assert f"is at step {STEPS}, past spec.training.max_steps 2: nothing would be left to train" in last
    assert "on_spec_change: start_over" in last
    assert finished.final_files() == before
    again = kubetune("run", "job.yaml", cwd=finished.cwd, env=cli_env(finished.cwd))
    assert "already finished" in _last_line(again)  # the refused run left the finished one as it was


def test_raising_max_steps_continues_from_the_checkpoint_with_a_warning(
    finished: Finished, tmp_path: Path
) -> None:
    out = finished.copy(tmp_path)
    proc = kubetune(
        "run", str(finished.job), "--output", str(out), "--max-steps", str(STEPS + 2),
        cwd=finished.cwd, env=cli_env(tmp_path), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"spec.training.max_steps is {STEPS + 2}, the checkpoint of step {STEPS} was written by a run of {STEPS} "
        f"steps: training continues from step {STEPS} to {STEPS + 2}"
    ) in proc.stderr
    assert [s for s in _loss_steps(out) if s > STEPS] == [STEPS + 1, STEPS + 2]


def test_restart_trains_again_from_step_0_after_saying_what_it_supersedes(
    finished: Finished, tmp_path: Path
) -> None:
    out = finished.copy(tmp_path)
    proc = kubetune(
        "run", str(finished.job), "--output", str(out), "--restart", cwd=finished.cwd, env=cli_env(tmp_path),
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--restart: the run in {out} (finished, step {STEPS}/{STEPS}) is superseded" in proc.stderr
    assert "resuming from" not in proc.stderr
    assert _loss_steps(out) == list(range(1, STEPS + 1))  # the old run's metrics do not mix in
    assert f"kubetune: done: {STEPS} steps" in proc.stderr


def test_a_laptop_gets_one_line_per_problem_before_anything_starts(tmp_path: Path) -> None:
    env = cli_env(tmp_path, CUDA_VISIBLE_DEVICES="", HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(k, None)
    proc = kubetune("run", str(REPO / "examples" / "sft-lora.yaml"), cwd=tmp_path, env=env)
    assert proc.returncode == EXIT_USER_ERROR
    lines = proc.stderr.strip().splitlines()
    few_cpus = len(os.sched_getaffinity(0)) < 8
    assert len(lines) == 2 + few_cpus, proc.stderr
    assert lines[0] == (
        "kubetune run: error: spec.resources.gpus is 8 but this machine has no GPU; "
        "to train on the CPU instead: kubetune run --cpu"
    )
    if few_cpus:
        assert lines[1].startswith(
            "kubetune run: error: spec.parallel_config.nproc_per_node is 8 but this machine has "
        )
        assert "override: --nproc-per-node " in lines[1]
    assert lines[-1].startswith(
        "kubetune run: error: spec.model.uri, spec.dataset.uri, spec.output.uri: s3:// and no S3 credentials here"
    )
    assert "--output ./runs/qwen25-7b-lora" in lines[-1]
    assert not (tmp_path / "cache" / "work").exists()  # torchrun never started

    fixed = kubetune(
        "run",
        str(REPO / "examples" / "sft-lora.yaml"),
        "--cpu",
        "--nproc-per-node",
        "1",
        cwd=tmp_path,
        env=env,
    )
    assert fixed.returncode == EXIT_USER_ERROR
    assert len(fixed.stderr.strip().splitlines()) == 1 and "no S3 credentials here" in fixed.stderr
