"""The trainer's commands as users and pods run them: `python -m kubetune_trainer --config` and
`kubetune run` (torchrun, 2 processes over gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.conventions import EXIT_USER_ERROR

REPO = Path(__file__).resolve().parents[1]


def _write_job(job: Any, path: Path) -> Path:
    path.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, KUBETUNE_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def test_python_m_kubetune_trainer_trains_and_writes_the_output(train_job: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = train_job(out, pet_config={"pet_type": "lora"}, training={"max_steps": 4})
    config = _write_job(job, tmp_path / "job.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, env=_env(tmp_path), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "trainable params" in proc.stderr and "kubetune: done: 4 steps" in proc.stderr
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "merged" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all("eta_seconds" in m for m in metrics if "loss" in m)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_job_problem_is_one_line_without_traceback(train_job: Any, tmp_path: Path) -> None:
    job = train_job(tmp_path / "out", model_uri=str(tmp_path / "no-such-model"))
    config = _write_job(job, tmp_path / "job.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, env=_env(tmp_path), timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_USER_ERROR
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kubetune: error")]
    assert errors == [f"kubetune: error: spec.model.uri: {tmp_path / 'no-such-model'}: no such directory"]


def test_an_invalid_job_file_exits_65_through_torchrun_with_the_reason_as_termination_message(
    tmp_path: Path,
) -> None:
    """The pod's command: supervise -> torchrun -> trainer. torchrun reports any failed worker as 1;
    the pod still exits 65 (a user error: the operator fails the job at once) and the kubelet
    finds the reason in the termination message."""
    config = tmp_path / "job.yaml"
    config.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
        "spec: {model: {uri: /m}, dataset: {uri: /d.json}, output: {uri: /o}, pet_config: {lora_rank: 0}}\n"
    )
    message = tmp_path / "termination-log"
    env = dict(_env(tmp_path), KUBETUNE_TERMINATION_MESSAGE_PATH=str(message))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.supervise", "--", sys.executable, "-m", "torch.distributed.run",
         "--standalone", "--nproc-per-node=1", "-m", "kubetune_trainer", "--config", str(config)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    assert "spec.pet_config.lora_rank: must be >= 1, got 0" in proc.stderr
    assert "spec.pet_config.lora_rank: must be >= 1, got 0" in message.read_text()
    assert message.read_text().count("\n") == 0


def test_kubetune_run_stops_before_torchrun_when_the_method_cannot_run(
    train_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_trainer.launch import run_local
    from kubetune_trainer.train import quiet_known_noise
    from tests.fixtures_train import METHOD_CASES

    quiet_known_noise()  # this test's own import of bitsandbytes must not warn into what it captures
    import bitsandbytes as bnb

    def no_backend(self: Any, x: Any) -> Any:
        raise RuntimeError("bitsandbytes was compiled without CPU support")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_backend)
    monkeypatch.setattr(subprocess, "Popen", None)  # torchrun must not start
    job = train_job(tmp_path / "out", pet_config=METHOD_CASES["qlora-4bit-nf4"])
    assert run_local(_write_job(job, tmp_path / "job.yaml")) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith(
        "kubetune run: error: spec.pet_config.pet_type qlora (4-bit nf4, double quant) cannot run"
    )
    assert "compiled without CPU support" in err


@pytest.mark.slow
def test_kubetune_run_the_demo_with_two_gloo_processes(tiny_model_dirs: Any, tmp_path: Path) -> None:
    """The shipped demo job, as README runs it, but on 2 DDP processes and for a few steps."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    (tmp_path / "runs").mkdir()
    shutil.copytree(tiny_model_dirs["qwen2"], tmp_path / "runs" / "tiny-qwen2")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune", "run", "examples/local-lora.yaml", "--nproc-per-node", "2",
         "--max-steps", "4"],
        cwd=tmp_path, capture_output=True, text=True, env=_env(tmp_path), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on 2 processes (cpu, gloo)" in proc.stderr
    assert "fp32 on cpu x 2" in proc.stderr
    out = tmp_path / "runs" / "local-lora"
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "merged" / "model.safetensors").is_file()
    assert (out / "loss.png").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
