"""What a start of `kubetune run` costs before training: a one-process run starts the trainer without
torchrun (with the environment torchrun would give it), the launcher's checks import neither
transformers nor (without a GPU driver) torch, and the trainer says how long its start took and how
much memory it held. The restart benchmark's quick mode runs end to end (nothing here is timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from kubetune.conventions import ENV_AGENT_PID
from kubetune_trainer.launch import single_process_env

REPO = Path(__file__).resolve().parents[1]
# the agent's own settings, which its workers inherit but never read
_AGENT_ONLY = {"TORCHELASTIC_SIGNALS_TO_HANDLE", "TORCHELASTIC_ERROR_FILE"}
# where the launcher's one worker differs on purpose: it hosts its own store on a port of its own
_DIFFERENT = {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"}


def test_a_one_process_worker_gets_what_torchrun_would_give_it(tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text("import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", str(script),
         str(tmp_path / "env.json")],
        env=base, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    torchrun = {k: v for k, v in json.loads((tmp_path / "env.json").read_text()).items() if k not in base}
    ours = {k: v for k, v in single_process_env(base, 4321).items() if k not in base}
    assert ours.pop(ENV_AGENT_PID) == "4321"  # the worker dies with `kubetune run` (lifetime.py)
    assert set(ours) == set(torchrun) - _AGENT_ONLY - {"PWD", "LC_CTYPE"}
    assert {k: v for k, v in ours.items() if k not in _DIFFERENT} == {
        k: v for k, v in torchrun.items() if k in ours and k not in _DIFFERENT
    }
    assert ours["TORCHELASTIC_USE_AGENT_STORE"] == "False" and int(ours["MASTER_PORT"]) > 0


def _python(code: str, cwd: Path) -> str:
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout


def test_the_launchers_checks_import_no_transformers(tmp_path: Path) -> None:
    from kubetune_trainer.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    doc = yaml.safe_load((REPO / "examples" / "local-lora.yaml").read_text())
    doc["spec"]["model"]["uri"] = str(model)
    doc["spec"]["dataset"]["uri"] = str(REPO / "examples" / "data" / "alpaca_en_200.json")
    doc["spec"]["output"]["uri"] = str(tmp_path / "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    code = (
        "import sys\n"
        "from kubetune_trainer import launch\n"
        "def started(job, args, env, run_dir):\n"
        "    print('transformers' in sys.modules, ' '.join(args[:2]))\n"
        "    return 0\n"
        "launch._run_single = started\n"
        "launch.run_local('job.yaml', nproc_per_node=1, cpu=True)\n"
    )
    imported, started = _python(code, tmp_path).strip().split(" ", 1)
    assert started == "-m kubetune_trainer"  # the trainer itself, no torchrun
    # a second or more of every `kubetune run`: a check before the start that needs transformers
    # should import it only for the setting it checks
    assert imported == "False", "kubetune run's checks imported transformers"


def test_no_gpu_driver_no_torch_import(tmp_path: Path) -> None:
    from kubetune_trainer.launch import _GPU_DEVICE_NODES

    code = "import sys\nfrom kubetune_trainer import launch\nprint(launch._default_nproc(), 'torch' in sys.modules)"
    out = _python(code, tmp_path).strip()
    if not any(os.path.exists(p) for p in _GPU_DEVICE_NODES):
        assert out == "(1, 'cpu') False"
    else:  # a GPU machine: torch counts them
        import torch

        assert out.startswith(
            f"({torch.cuda.device_count()}, 'cuda')" if torch.cuda.is_available() else "(1,"
        )


def test_the_startup_line() -> None:
    from kubetune_trainer.startup import describe, memory_mib, process_started_at

    started = process_started_at()
    assert started is not None and 0 < __import__("time").time() - started < 3600
    rss, peak = memory_mib()
    assert rss is not None and peak is not None and 0 < rss <= peak
    line = describe(11, 100.0, 90.2, 88.0, (612.4, 640.0))
    assert line == (
        "startup: first step (step 11) 9.8 s after this process started, 12.0 s after kubetune run did; "
        "RSS before training 612 MiB (peak 640 MiB)"
    )


def test_restart_benchmark_quick(tmp_path: Path) -> None:
    """First start, relaunch from the tokenized-data cache, relaunch without it: each a one-process
    `kubetune run` stopped with Ctrl-C (saved, resumable), each logging its startup line."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/restart.py", "--quick", "--workdir", str(tmp_path), "--json",
         str(tmp_path / "r.json")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "r.json").read_text())
    first, relaunch, uncached = r["first"], r["relaunch"], r["uncached"]
    assert first["exit"] == relaunch["exit"] == uncached["exit"] == 75  # Ctrl-C: saved, resumable
    assert (first["cache"], relaunch["cache"], uncached["cache"]) == ("miss", "hit", "miss")
    assert first["step"] == 1 and relaunch["step"] > first["step"] and uncached["step"] > relaunch["step"]
    assert all(x["rss_mib"] > 0 and x["seconds"] > 0 for x in (first, relaunch, uncached))
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| first start") or "relaunch" in line
    ]
    assert len(rows) == 3 and "| hit |" in rows[1]
    logs = sorted((tmp_path / "cache" / "work" / "restart-bench").glob("*/run.log"))
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        assert "[torchrun]" not in text  # one process: started by kubetune run itself
        assert "s after kubetune run did; RSS before training " in text
