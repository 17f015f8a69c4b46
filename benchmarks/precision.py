"""`training.precision: auto` against fp32 on this CPU: real tokens per CPU-second and the loss curve.

    python benchmarks/precision.py

The ~20M-parameter Qwen2 of benchmarks/trainer_throughput.py, LoRA r16 on every projection and,
separately, full fine-tuning, packed alpaca demo rows (the first ``--rows``), seq_length 512, batch
4, one torch thread, one epoch, each run a fresh process, fp32 and auto alternating, ``--repeats``
times (best per mode). auto resolves to bf16 where the CPU has AMX or AVX512-BF16 (the table says
what it resolved to). The loss columns compare the per-step training losses of the two precisions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def worker(job_path: Path, workdir: Path) -> dict:
    import time

    import torch
    from transformers import TrainerCallback

    from kubetune.validate import load_job
    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import run_training

    torch.set_num_threads(1)

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cpu = time.process_time()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cpu = time.process_time() - self.cpu

    job = load_job(job_path)
    timer = LoopTimer()
    result = run_training(job, workdir=workdir, callbacks=[timer])
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    resolved = resolve_precision(job.spec.training.precision, "cpu").name
    return {"tokens": result.tokens_seen, "cpu_s": timer.cpu, "losses": losses, "resolved": resolved}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.job, a.workdir)), flush=True)
        return 0

    import yaml
    from packing import ALPACA, job
    from trainer_throughput import build_model

    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-precision-") as t:
        tmp = Path(t)
        model_dir = build_model(tmp / "model", "cpu")
        data = tmp / "rows.json"
        data.write_text(json.dumps(json.loads(ALPACA.read_text())[: a.rows]), encoding="utf-8")
        for i in range(a.repeats):
            for method in ("lora", "full"):
                for precision in ("fp32", "auto"):
                    doc = job(
                        "sft",
                        data,
                        model_dir,
                        tmp / "out",
                        a,
                        packing=True,
                        precision=precision,
                        logging_steps=1,
                    )
                    doc = doc.model_dump(mode="json")
                    if method == "full":
                        doc["spec"]["pet_config"] = {"pet_type": "full"}
                        doc["spec"]["training"]["learning_rate"] = 1e-4
                    path = tmp / f"job-{method}-{precision}.yaml"
                    path.write_text(yaml.safe_dump(doc))
                    cmd = [sys.executable, __file__, "--worker", "--job", str(path),
                           "--workdir", str(tmp / f"w-{method}-{precision}-{i}")]  # fmt: skip
                    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode != 0 or line is None:
                        sys.stderr.write(proc.stderr[-4000:])
                        raise SystemExit(f"{method} {precision} run failed (exit {proc.returncode})")
                    r = json.loads(line[7:])
                    runs.setdefault((method, precision), []).append(r)
                    print(f"  run {i + 1} {method} {precision} ({r['resolved']}): "
                          f"{r['tokens'] / r['cpu_s']:.1f} real tok/CPU-s", file=sys.stderr, flush=True)  # fmt: skip

    print(f"\nprecision: one epoch of {a.rows} packed rows, seq_length {a.seq_length}, batch {a.batch_size}, "
          f"1 thread, best of {a.repeats} fresh processes")  # fmt: skip
    print("| method | precision | real tok/CPU-s | vs fp32 | max abs loss diff vs fp32 | last loss |")
    print("|---|---|---|---|---|---|")
    for method in ("lora", "full"):
        best = {
            p: max(rs, key=lambda r: r["tokens"] / r["cpu_s"]) for (m, p), rs in runs.items() if m == method
        }
        base = best["fp32"]["tokens"] / best["fp32"]["cpu_s"]
        for precision, r in best.items():
            v = r["tokens"] / r["cpu_s"]
            diff = max(abs(x - y) for x, y in zip(r["losses"], best["fp32"]["losses"], strict=True))
            print(f"| {method} | {precision} ({r['resolved']}) | {v:.1f} | {v / base:.2f} | {diff:.4f} | "
                  f"{r['losses'][-1]:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
