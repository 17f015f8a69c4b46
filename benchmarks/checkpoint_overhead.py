"""What checkpointing to S3 costs a training run, measured against a local SeaweedFS server.

    python benchmarks/checkpoint_overhead.py [--steps 60] [--every 10] [--repeats 2] [--append benchmarks/RESULTS.md]

1. Step time with and without checkpointing every N steps: the same job (a small random-weight
   Qwen2, full fine-tuning so a checkpoint holds weights + AdamW state, and LoRA) trained once with
   checkpoint.every_steps > max_steps and once with every N, checkpoints going to S3 through the
   background uploader. Mean step time from the trainer's metrics.jsonl timestamps (the saves
   happen between two logged steps, so they are inside the span).
2. Upload and download throughput to the local S3 server: commit() of a checkpoint directory (one
   large file + small ones; multipart, parallel) and download() with sha256 verification.
3. Relaunch to first resumed step: the pod command (supervise -> torchrun -> trainer) started on a
   job whose newest committed checkpoint is in S3, timed until the first step after it is logged.

The machine is shared and small (2 cores): runs alternate with/without so drifting load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures_s3 import SeaweedS3  # noqa: E402

DATA = REPO / "examples" / "data" / "alpaca_en_200.json"


def job_yaml(path: Path, *, name: str, model: Path, server: SeaweedS3, bucket: str, pet: str, steps: int,
             every: int) -> Path:  # fmt: skip
    import yaml

    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model)},
            "dataset": {"uri": str(DATA), "format": "alpaca"},
            "pet_config": {"pet_type": pet, "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0},
            "training": {
                "learning_rate": 1e-3 if pet != "full" else 1e-4,
                "max_steps": steps,
                "per_device_train_batch_size": 4,
                "seq_length": 256,
                "precision": "fp32",
                "logging_steps": 1,
            },
            "checkpoint": {"every_steps": every, "keep_last": 2},
            "storage": {"s3": {"endpoint": server.endpoint}},
            "output": {"uri": f"s3://{bucket}/{name}"},
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def run_pod(
    config: Path, server: SeaweedS3, cache: Path, *, until: str | None = None
) -> tuple[int, float, float | None, str]:
    """Run the pod command; returns (rc, wall seconds, seconds until a line starting with `until`, log)."""
    env = dict(
        os.environ, **server.env, KUBETUNE_CACHE_DIR=str(cache), OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1"
    )
    cmd = [sys.executable, "-m", "kubetune_trainer.supervise", "--", sys.executable, "-m", "torch.distributed.run",
           "--standalone", "--nproc-per-node", "1", "-m", "kubetune_trainer", "--config", str(config)]  # fmt: skip
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    lines = []
    assert p.stdout is not None
    for line in p.stdout:
        lines.append(line)
        if until and seen is None and line.startswith(until):
            seen = time.monotonic() - t0
    rc = p.wait()
    return rc, time.monotonic() - t0, seen, "".join(lines)


def step_time(cache: Path, name: str, steps: int) -> float:
    """Mean seconds per step between the first and the last logged step."""
    rows = [
        json.loads(x) for x in (cache / "work" / name / "output" / "metrics.jsonl").read_text().splitlines()
    ]
    t = {r["step"]: r["time"] for r in rows if "loss" in r}
    return (t[steps] - t[1]) / (steps - 1)


def bench_steps(server: SeaweedS3, bucket: str, model: Path, tmp: Path, pet: str, steps: int, every: int,
                repeats: int) -> dict:  # fmt: skip
    base, ckpt, costs = [], [], []
    for i in range(repeats):
        for label, ev, out in (("no-ckpt", steps + 1000, base), ("ckpt", every, ckpt)):
            name = f"{pet}-{label}-{i}"
            cfg = job_yaml(tmp / f"{name}.yaml", name=name, model=model, server=server, bucket=bucket, pet=pet,
                           steps=steps, every=ev)  # fmt: skip
            rc, wall, _, log = run_pod(cfg, server, tmp / f"cache-{name}")
            assert rc == 0, log[-3000:]
            out.append(step_time(tmp / f"cache-{name}", name, steps))
            if label == "ckpt":
                costs.append(parse_costs(log))
    from kubetune_trainer import checkpoints as ck
    from kubetune_trainer.store import open_store

    store = open_store(f"s3://{bucket}/{pet}-ckpt-0/checkpoints", server.settings(),
                       credentials={"aws_access_key_id": server.env["AWS_ACCESS_KEY_ID"],
                                    "aws_secret_access_key": server.env["AWS_SECRET_ACCESS_KEY"]})  # fmt: skip
    size = ck.latest_committed(store).manifest.total_bytes
    b, c = statistics.median(base), statistics.median(ckpt)
    in_loop = statistics.median(x["in_loop"] for x in costs)
    return {"pet": pet, "base": base, "ckpt": ckpt, "overhead": (c - b) / b, "size": size,
            "in_loop": in_loop, "trainer_save": statistics.median(x["trainer_save"] for x in costs),
            "handoff": statistics.median(x["handoff"] for x in costs),
            "upload": statistics.median(x["upload"] for x in costs),
            "loop_overhead": in_loop / (every * b)}  # fmt: skip


def parse_costs(log: str) -> dict:
    """The trainer's own account: 'checkpoint costs: N saves, in the training loop Xs each (...)'."""
    import re

    m = re.search(
        r"in the training loop ([\d.]+)s each \(trainer save ([\d.]+)s \+ hand-off ([\d.]+)s\); "
        r"\d+ uploads in the background, ([\d.]+)s each",
        log,
    )
    assert m, "no checkpoint cost line in the trainer's log"
    keys = ("in_loop", "trainer_save", "handoff", "upload")
    return dict(zip(keys, map(float, m.groups()), strict=True))


def bench_transfer(server: SeaweedS3, bucket: str, tmp: Path, mb: int) -> dict:
    from kubetune_trainer import checkpoints as ck
    from kubetune_trainer.store import open_store

    creds = {"aws_access_key_id": server.env["AWS_ACCESS_KEY_ID"],
             "aws_secret_access_key": server.env["AWS_SECRET_ACCESS_KEY"]}  # fmt: skip
    store = open_store(f"s3://{bucket}/transfer", server.settings(), credentials=creds)
    d = tmp / "bigckpt"
    d.mkdir()
    with open(d / "model.safetensors", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1024 * 1024))
    for i in range(8):
        (d / f"rng_state_{i}.pth").write_bytes(os.urandom(15000))
    (d / "trainer_state.json").write_text("{}")
    t0 = time.monotonic()
    manifest = ck.build_manifest(d, step=1, world_size=8, spec_hash="bench")
    t_hash = time.monotonic() - t0
    t0 = time.monotonic()
    c = ck.commit(store, d, step=1, world_size=8, spec_hash="bench", manifest=manifest)
    t_up = time.monotonic() - t0
    t0 = time.monotonic()
    ck.download(store, c, tmp / "dl")
    t_down = time.monotonic() - t0
    total = manifest.total_bytes / 1e6
    return {"mb": total, "hash_s": t_hash, "up_s": t_up, "down_s": t_down}


def bench_relaunch(server: SeaweedS3, bucket: str, model: Path, tmp: Path, pet: str, steps: int) -> dict:
    """A finished `steps`-step job relaunched with more steps: time to its first new step."""
    name = f"{pet}-relaunch"
    cfg = job_yaml(tmp / f"{name}.yaml", name=name, model=model, server=server, bucket=bucket, pet=pet,
                   steps=steps, every=steps)  # fmt: skip
    rc, _, _, log = run_pod(cfg, server, tmp / "cache-relaunch-1")
    assert rc == 0, log[-3000:]
    fresh_rc, fresh_wall, fresh_first, _ = run_pod(
        job_yaml(
            tmp / f"{name}-fresh.yaml",
            name=f"{name}-fresh",
            model=model,
            server=server,
            bucket=bucket,
            pet=pet,
            steps=2,
            every=100,
        ),  # fmt: skip
        server,
        tmp / "cache-fresh",
        until="step 1/",
    )
    cfg = job_yaml(tmp / f"{name}.yaml", name=name, model=model, server=server, bucket=bucket, pet=pet,
                   steps=steps + 2, every=steps)  # fmt: skip
    rc, wall, first, log = run_pod(cfg, server, tmp / "cache-relaunch-2", until=f"step {steps + 1}/")
    assert rc == 0 and first is not None, log[-3000:]
    download = None
    for line in log.splitlines():
        if "downloaded and verified" in line and "MB in " in line:
            download = float(line.rsplit("MB in ", 1)[1].split("s")[0])
    return {
        "pet": pet,
        "first_resumed_step_s": first,
        "fresh_first_step_s": fresh_first,
        "download_s": download,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transfer-mb", type=int, default=256)
    ap.add_argument("--append", type=Path, default=None, help="append the results to this markdown file")
    a = ap.parse_args()

    from kubetune_trainer.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    server = SeaweedS3(tmp / "s3")
    server.start()
    try:
        bucket = server.new_bucket()
        model = build_tiny_model(tmp / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2)
        rows = [
            bench_steps(server, bucket, model, tmp, pet, a.steps, a.every, a.repeats)
            for pet in ("full", "lora")
        ]
        transfer = bench_transfer(server, bucket, tmp, a.transfer_mb)
        relaunch = [bench_relaunch(server, bucket, model, tmp, pet, 20) for pet in ("full",)]
    finally:
        if server.proxy is not None:
            server.proxy.close()
        server.stop()

    import platform

    import torch

    out = [
        "",
        "## Checkpoint overhead (trainer resilience, `benchmarks/checkpoint_overhead.py`)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {platform.python_version()}, torch {torch.__version__}, "
        "CPU only, SeaweedFS `weed mini` on loopback. One trainer process (pod command: supervise -> torchrun), "
        f"tiny Qwen2 (hidden 256, 4 layers), batch 4 x 256 tokens, {a.steps} steps, "
        f"medians of {a.repeats} alternating runs.",
        "",
        f"| method | checkpoint size | step time, no checkpoints | step time, checkpoint every {a.every} steps "
        "to S3 | measured overhead | per save in the loop (Trainer save + hand-off) | loop share | "
        "background upload per checkpoint |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['pet']} | {r['size'] / 1e6:.1f} MB | {statistics.median(r['base']) * 1000:.0f} ms "
            f"({', '.join(f'{x * 1000:.0f}' for x in r['base'])}) | {statistics.median(r['ckpt']) * 1000:.0f} ms "
            f"({', '.join(f'{x * 1000:.0f}' for x in r['ckpt'])}) | {r['overhead'] * 100:+.1f}% "
            f"| {r['in_loop'] * 1000:.0f} ms ({r['trainer_save'] * 1000:.0f} + {r['handoff'] * 1000:.0f}) "
            f"| {r['loop_overhead'] * 100:.1f}% | {r['upload']:.2f} s |"
        )
    out += [
        "",
        "Loop share = time the training loop spends per save / (steps between saves x step time without "
        "checkpoints): what checkpointing costs when the background upload has cores of its own. The measured "
        "overhead also includes the upload thread competing for this machine's 2 cores.",
    ]
    t = transfer
    out += [
        "",
        f"Transfer of a {t['mb']:.0f} MB checkpoint dir (one large file, multipart 16 MB parts x 8 threads, + 9 small "
        f"files): sha256 of the files {t['hash_s']:.2f} s ({t['mb'] / t['hash_s']:.0f} MB/s); upload + commit "
        f"{t['up_s']:.2f} s ({t['mb'] / t['up_s']:.0f} MB/s); download + sha256 verify {t['down_s']:.2f} s "
        f"({t['mb'] / t['down_s']:.0f} MB/s).",
        "",
    ]
    for r in relaunch:
        out.append(
            f"Relaunch to first resumed step ({r['pet']}, pod command, checkpoint in S3): "
            f"{r['first_resumed_step_s']:.1f} s, of which download + verify {r['download_s']:.2f} s; "
            f"a fresh start of the same job to its first step: {r['fresh_first_step_s']:.1f} s "
            "(the rest is Python/torch imports, data and model loading)."
        )
    text = "\n".join(out) + "\n"
    print(text)
    if a.append:
        with open(a.append, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
