"""How long a restart takes to train again, against the first start: `kubetune run` on a 50k-row dataset.

    python benchmarks/restart.py [--rows 50000] [--quick] [--append benchmarks/RESULTS.md]

The data: the shipped alpaca sample (examples/data/alpaca_en_200.json) repeated with variation (every
copy's instruction and reply carry its own number and a few words drawn from the others) to --rows
rows. The job: SFT, LoRA, on a tiny random Qwen2 (so the data pipeline, not the model, is what a start
spends its time on), seq_length 512, packing, a checkpoint every few steps, a local output.

1. first start: `kubetune run job.yaml` until the trainer's first step, then on until a checkpoint is
   committed, then Ctrl-C (the trainer saves and exits 75);
2. relaunch: the same command again, timed until its first resumed step (the tokenized-data cache
   written by 1 is loaded), then Ctrl-C;
3. relaunch without the data cache: <output>/cache/ deleted first, otherwise as 2.

Each time is from starting `kubetune run` to the trainer's startup line (logged at the end of the
first step of a start, data_cache.py / startup.py); the table gives the ratios to the first start and
the worker's resident memory before its first step. --quick (2,000 rows, fewer steps) is what the test
suite runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "alpaca_en_200.json"
_STARTUP = re.compile(r"startup: first step \(step (\d+)\).*?RSS before training (\d+) MiB")
_CACHE = re.compile(r"data cache: (\w+)")


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` alpaca rows: the sample repeated, each copy numbered and varied with words of other rows."""
    base = json.loads(DATA.read_text(encoding="utf-8"))
    words = " ".join(r["output"] for r in base).split()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        r = dict(base[i % len(base)])
        extra = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        r["instruction"] = f"{r['instruction']} (variant {i // len(base)}: {extra})"
        r["output"] = f"{r['output']} [{i}] {extra}"
        rows.append(r)
    return rows


def write_job(tmp: Path, *, rows: int, steps: int, every: int) -> Path:
    import yaml

    from kubetune_trainer.tiny import build_tiny_model

    model = build_tiny_model(tmp / "model", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    data = tmp / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for r in make_rows(rows):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "restart-bench"},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"uri": str(data), "format": "alpaca"},
            "method": "sft",
            "pet_config": {"pet_type": "lora"},
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": 2,
                "seq_length": 512,
                "packing": True,
                "precision": "fp32",
                "optimizer": "adamw_torch",
                "logging_steps": 1,
            },  # fmt: skip
            "checkpoint": {"every_steps": every},
            "output": {"uri": str(tmp / "out")},
        },
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _committed(out: Path) -> bool:
    return any((out / "checkpoints").glob("step-*/COMMITTED"))


def start(job: Path, cwd: Path, env: dict[str, str], *, wait_commit: bool, timeout: float) -> dict[str, Any]:
    """One `kubetune run`: seconds to its first step, the worker's RSS then, the data cache's word."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune", "run", str(job)], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    found: dict[str, Any] = {}
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            m = _STARTUP.search(line)
            if m and "seconds" not in found:
                found.update(seconds=time.monotonic() - t0, step=int(m.group(1)), rss_mib=int(m.group(2)))
            c = _CACHE.search(line)
            if c:
                found["cache"] = c.group(1)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = t0 + timeout
    out = job.parent / "out"
    while time.monotonic() < deadline and proc.poll() is None:
        if "seconds" in found and (not wait_commit or _committed(out)):
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # saves at the next step, exits 75 (resumable)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    reader.join(timeout=10)
    if "seconds" not in found:
        raise RuntimeError("no startup line from the trainer:\n" + "".join(lines[-30:]))
    found["exit"] = proc.returncode
    return found


def run(rows: int, steps: int, every: int, timeout: float, workdir: Path | None = None) -> dict[str, Any]:
    tmp = workdir or Path(tempfile.mkdtemp(prefix="kubetune-restart-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t = time.monotonic()
        job = write_job(tmp, rows=rows, steps=steps, every=every)
        setup = time.monotonic() - t
        env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        first = start(job, tmp, env, wait_commit=True, timeout=timeout)
        relaunch = start(job, tmp, env, wait_commit=False, timeout=timeout)
        shutil.rmtree(tmp / "out" / "cache")
        uncached = start(job, tmp, env, wait_commit=False, timeout=timeout)
        return {"rows": rows, "setup_s": setup, "first": first, "relaunch": relaunch, "uncached": uncached}
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def table(r: dict[str, Any]) -> list[str]:
    base = r["first"]["seconds"]
    out = [
        "| start | data cache | to first step | ratio to first start | worker RSS before first step |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("first", "first start"), ("relaunch", "relaunch (resume)"),
                        ("uncached", "relaunch without the data cache")):  # fmt: skip
        x = r[name]
        out.append(
            f"| {label} (step {x['step']}) | {x.get('cache', '?')} | {x['seconds']:.1f} s | "
            f"{x['seconds'] / base:.2f}x | {x['rss_mib']} MiB |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="2,000 rows, 8 steps: what the test suite runs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds one start may take")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="work here and keep it (default: a temporary dir)"
    )
    ap.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.steps, a.every = 2_000, 8, 2
    r = run(a.rows, a.steps, a.every, a.timeout, a.workdir)
    import torch

    lines = [
        "",
        "## Restart time (tokenized-data cache, startup; `benchmarks/restart.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, CPU only. `kubetune run` of an SFT LoRA job on {a.rows:,} alpaca rows "
        "(the shipped 200 repeated with variation), tiny Qwen2, seq_length 512, packing, checkpoint every "
        f"{a.every} steps, local output; time from starting `kubetune run` to the end of the trainer's first "
        "step of that start.",
        "",
        *table(r),
    ]
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")
    if a.append:
        with open(a.append, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
