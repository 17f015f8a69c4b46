"""What FSDP sharding buys a full fine-tune: per-rank memory and checkpoint bytes, DDP vs FSDP.

    python benchmarks/fsdp_memory.py [--hidden 768] [--layers 10] [--steps 10] [--every 5] [--append benchmarks/RESULTS.md]

The same full fine-tuning job (a random-weight Qwen2 built by kubetune_trainer.tiny, fp32, AdamW)
runs twice as 2 processes on this machine through the real launch path (`python -m kubetune run
job.yaml` -> torchrun -> `python -m kubetune_trainer`), first with `parallel_config.strategy: ddp`,
then with `fsdp`, checkpointing every `--every` steps to a local output directory. Per run:

- peak RSS of each trainer worker (the processes of the tree running kubetune_trainer with a RANK
  in their environment), sampled with psutil every `--interval` s: over the whole process
  (model loading and the final export included) and over the training steps alone;
- mean step time from the run's metrics.jsonl timestamps (first to last logged step);
- bytes each rank wrote for weights + optimizer state in the last checkpoint: DDP's rank 0 writes
  model.safetensors + optimizer.pt, FSDP's ranks each write their `__<rank>_0.distcp` shards.

Next to them the theoretical per-rank bytes of fp32 params + grads + AdamW's two moments: 16 bytes
per parameter replicated (DDP), 16 / 2 per rank sharded over 2 (FSDP); the rest of the RSS is the
framework's fixed overhead (Python, torch, transformers, data, communication buffers).

The pair of runs is repeated with `MALLOC_MMAP_THRESHOLD_` set (`--mmap-threshold`, 0 to skip):
glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
FSDP's per-layer all-gather and reduce-scatter buffers (tens of MB, freed and made again every
step) come from the heap, whose freed holes stay resident. A fixed threshold turns that off, so
the second pair shows the memory sharding saves once the allocator gives freed buffers back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "alpaca_en_200.json"
NPROC = 2
ADAMW_BYTES_PER_PARAM = 16  # fp32 weight + grad + exp_avg + exp_avg_sq


def job_yaml(path: Path, *, name: str, model: Path, out: Path, strategy: str, steps: int, every: int,
             batch: int, seq_length: int) -> Path:  # fmt: skip
    import yaml

    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"uri": str(DATA), "format": "alpaca"},
            "pet_config": {"pet_type": "full"},
            "parallel_config": {"strategy": strategy, "nproc_per_node": NPROC},
            "training": {
                "learning_rate": 1e-4,
                "max_steps": steps,
                "per_device_train_batch_size": batch,
                "seq_length": seq_length,
                "precision": "fp32",
                "logging_steps": 1,
                "seed": 42,
            },
            "checkpoint": {"every_steps": every, "keep_last": 1},
            "output": {"uri": str(out)},
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _worker_rank(p: psutil.Process) -> int | None:
    """The RANK of a trainer worker; None for the CLI, torchrun and anything else in the tree."""
    try:
        if not any("kubetune_trainer" in part for part in p.cmdline()):
            return None
        rank = p.environ().get("RANK")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return int(rank) if rank is not None else None


def run_sampled(cmd: list[str], env: dict[str, str], log: Path, interval: float) -> tuple[int, float, dict]:
    """Run `cmd`, sampling its workers' RSS; returns (rc, wall s, {rank: [(unix time, rss bytes)]})."""
    samples: dict[int, list[tuple[float, int]]] = {}
    ranks: dict[int, int | None] = {}  # pid -> rank, looked up once per process
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            for child in children:
                if child.pid not in ranks:
                    ranks[child.pid] = _worker_rank(child)
                rank = ranks[child.pid]
                if rank is None:
                    continue
                try:
                    rss = child.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                samples.setdefault(rank, []).append((time.time(), rss))
            time.sleep(interval)
    return proc.returncode, time.monotonic() - t0, samples


def step_times(metrics: Path) -> dict[int, float]:
    """Unix time each training step was logged at (metrics.jsonl rows with a loss)."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return {r["step"]: r["time"] for r in rows if "loss" in r}


def checkpoint_bytes(ckpt: Path, strategy: str) -> dict[int, int]:
    """Bytes of weights + optimizer state each rank wrote in checkpoint dir `ckpt`."""
    if strategy == "ddp":  # the Trainer saves the full state from rank 0 only
        full = sum((ckpt / f).stat().st_size for f in ("model.safetensors", "optimizer.pt"))
        return {0: full, **{r: 0 for r in range(1, NPROC)}}
    from kubetune_trainer.fsdp import MODEL_DIR, OPTIMIZER_DIR

    return {
        r: sum((ckpt / d / f"__{r}_0.distcp").stat().st_size for d in (MODEL_DIR, OPTIMIZER_DIR))
        for r in range(NPROC)
    }


def last_checkpoint(workdir: Path) -> Path:
    """The newest checkpoint-N the Trainer left in the job's node-local scratch."""
    dirs = list((workdir / "checkpoints").glob("checkpoint-*"))
    if not dirs:
        raise SystemExit(f"no checkpoint-N directory under {workdir / 'checkpoints'}")
    return max(dirs, key=lambda d: int(d.name.rsplit("-", 1)[1]))


def bench(strategy: str, model: Path, tmp: Path, a: argparse.Namespace, mmap_threshold: int = 0) -> dict:
    """One run of the job under `strategy`; `mmap_threshold` > 0 fixes glibc's (see the module docstring)."""
    name = f"fsdp-memory-{strategy}" + (f"-mmap{mmap_threshold}" if mmap_threshold else "")
    out, cache = tmp / f"out-{name}", tmp / f"cache-{name}"
    cfg = job_yaml(tmp / f"{name}.yaml", name=name, model=model, out=out, strategy=strategy, steps=a.steps,
                   every=a.every, batch=a.batch_size, seq_length=a.seq_length)  # fmt: skip
    # one torch thread per rank: the two ranks share 2 cores, and idle threads would spin
    env = dict(os.environ, OMP_NUM_THREADS="1", KUBETUNE_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    log = tmp / f"{name}.log"
    rc, wall, samples = run_sampled([sys.executable, "-m", "kubetune", "run", str(cfg)], env, log, a.interval)
    if rc != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"{name} run failed (exit {rc}); log {log}")
    if sorted(samples) != list(range(NPROC)):
        raise SystemExit(f"{name}: sampled ranks {sorted(samples)}, expected 0..{NPROC - 1}")
    t = step_times(out / "metrics.jsonl")
    if sorted(t) != list(range(1, a.steps + 1)):
        raise SystemExit(f"{name}: logged steps {sorted(t)}, expected 1..{a.steps}")
    first, last = t[1], t[a.steps]
    ckpt = last_checkpoint(cache / "work" / name)
    result = {
        "name": name,
        "wall_s": wall,
        "step_s": (last - first) / (a.steps - 1),
        "peak": {r: max(rss for _, rss in s) for r, s in samples.items()},
        # between the first and the last logged step: training (and checkpoint saves) only, no
        # model loading before or final export after
        "peak_steps": {r: max(rss for ts, rss in s if first <= ts <= last) for r, s in samples.items()},
        "ckpt_step": int(ckpt.name.rsplit("-", 1)[1]),
        "ckpt": checkpoint_bytes(ckpt, strategy),
        "samples": {r: len(s) for r, s in samples.items()},
    }
    # a run leaves GBs behind (checkpoints, their committed copies, the export): only the figures count
    shutil.rmtree(out)
    shutil.rmtree(cache)
    return result


def count_params(model: Path) -> int:
    """Parameters in the saved model (read from the safetensors headers, no weights loaded)."""
    from safetensors import safe_open

    n = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def table(pairs: list[tuple[str, dict, dict]], params: int) -> list[str]:
    """A markdown table: one row per metric, (ddp, fsdp, fsdp / ddp) columns per (label, ddp, fsdp) pair."""
    mib = 2**20

    def cells(d: float, f: float, unit: str, scale: float, fmt: str) -> str:
        ratio = f"{f / d:.2f}" if d else "-"
        return f" {d / scale:{fmt}} {unit} | {f / scale:{fmt}} {unit} | {ratio} |"

    def row(
        metric: str, get: Callable[[dict], float], unit: str = "MiB", scale: float = mib, fmt: str = ".0f"
    ) -> str:
        return f"| {metric} |" + "".join(cells(get(d), get(f), unit, scale, fmt) for _, d, f in pairs)

    head = "| per rank |" + "".join(f" ddp{lb} | fsdp{lb} | fsdp / ddp{lb} |" for lb, _, _ in pairs)
    out = [head, "|---|" + "---|---|---|" * len(pairs)]
    state = params * ADAMW_BYTES_PER_PARAM
    out.append(
        f"| params + grads + AdamW state (theory: 16 B/param, fsdp / {NPROC} ranks) |"
        + cells(state, state / NPROC, "MiB", mib, ".0f") * len(pairs)
    )
    for r in range(NPROC):
        out.append(row(f"peak RSS rank {r}, training steps", lambda x, r=r: x["peak_steps"][r]))
    for r in range(NPROC):
        out.append(row(f"peak RSS rank {r}, whole process", lambda x, r=r: x["peak"][r]))
    for r in range(NPROC):
        out.append(
            row(f"checkpoint weights + optimizer written, rank {r}", lambda x, r=r: x["ckpt"][r], fmt=".1f")
        )
    out.append(row("mean step time", lambda x: x["step_s"], unit="ms", scale=1e-3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    ap.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                    help="MALLOC_MMAP_THRESHOLD_ of the second ddp/fsdp pair (0: run only the first)")  # fmt: skip
    ap.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    a = ap.parse_args()

    import torch

    from kubetune_trainer.tiny import build_tiny_model

    pairs = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-fsdp-") as tmp_dir:
        tmp = Path(tmp_dir)
        model = build_tiny_model(tmp / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                                 num_kv_heads=a.kv_heads)  # fmt: skip
        params = count_params(model)
        t0 = time.monotonic()
        for threshold in (0, a.mmap_threshold) if a.mmap_threshold else (0,):
            ddp = bench("ddp", model, tmp, a, threshold)
            fsdp = bench("fsdp", model, tmp, a, threshold)
            for r in (ddp, fsdp):
                print(f"  {r['name']}: {r['wall_s']:.0f} s wall, {r['step_s'] * 1000:.0f} ms/step, RSS samples "
                      f"per rank {r['samples']}, last checkpoint at step {r['ckpt_step']}", file=sys.stderr,
                      flush=True)  # fmt: skip
            pairs.append((f", mmap {threshold // 1024} KiB" if threshold else "", ddp, fsdp))
        wall = time.monotonic() - t0

    out = [
        "",
        "## FSDP vs DDP memory (`benchmarks/fsdp_memory.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {platform.python_version()}, "
        f"torch {torch.__version__}, CPU only (gloo). Full fine-tuning (fp32, AdamW) of a random-weight "
        f"Qwen2 of {params / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers, {a.heads}/{a.kv_heads} "
        f"heads), {NPROC} processes on one node via `kubetune run` (1 torch thread each), batch {a.batch_size} x "
        f"{a.seq_length} tokens per rank, {a.steps} steps, checkpoint every {a.every} steps to a local "
        f"directory; one run each, ddp then fsdp, first with glibc's default malloc settings"
        + (f", then with `MALLOC_MMAP_THRESHOLD_={a.mmap_threshold}` ('mmap {a.mmap_threshold // 1024} KiB')"
           if a.mmap_threshold else "")
        + f" ({wall:.0f} s for all runs). RSS sampled every {a.interval} s; 'training steps' = from the first "
        "to the last logged step (checkpoint saves included, model loading and final export not).",
        "",
        *table(pairs, params),
    ]  # fmt: skip
    text = "\n".join(out) + "\n"
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
