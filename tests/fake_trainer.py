"""A stand-in for the trainer in operator tests: same config, same files, no torch (starts in ~0.1 s).

    python tests/fake_trainer.py --config /etc/kubetune/job.yaml

Counts `training.max_steps` steps (FAKE_STEP_SECONDS each), commits a checkpoint every
`checkpoint.every_steps` (checkpoints/step-NNNNNNNN/COMMITTED), resumes from the newest committed one,
writes progress.json like the real trainer, and on SIGTERM commits and exits EXIT_PREEMPTED.
Rank 0 writes final/adapter/ and progress state "done" at the end. Only file:// outputs.

Tests steer it with <output>/behaviour.json: {"fail": {"attempt": 1, "rank": 0, "step": 3, "code": 1}}
(attempt/rank/step may be omitted = any; "message" is written to the termination message file, as the
trainer does for a user error), {"stall": {"step": 3}} (stops advancing there, a hung collective) and
{"linger": {"rank": 1}} (that rank keeps running after the last step). Every start is appended to
<output>/runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from kubetune.conventions import ENV_TERMINATION_MESSAGE_PATH, EXIT_PREEMPTED


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    job = yaml.safe_load(Path(args.config).read_text())
    spec = job["spec"]
    out = Path(urlparse(spec["output"]["uri"]).path)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(re.search(r"-r(\d+)$", os.environ["KUBETUNE_POD_NAME"]).group(1))  # type: ignore[union-attr]
    attempt = int(os.environ.get("KUBETUNE_ATTEMPT", "0"))
    total = spec["training"].get("max_steps") or 20
    every = spec["checkpoint"]["every_steps"]
    pause = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    behaviour = json.loads((out / "behaviour.json").read_text()) if (out / "behaviour.json").exists() else {}
    fail = behaviour.get("fail") or {}

    def hit(f: dict, step: int) -> bool:
        return all(f.get(k) in (None, v) for k, v in (("attempt", attempt), ("rank", rank), ("step", step)))

    ckpts = out / "checkpoints"
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "COMMITTED").exists())
    start = done[-1] if done else 0
    with open(out / "runs.jsonl", "a") as f:
        f.write(json.dumps({"attempt": attempt, "rank": rank, "start": start, "pid": os.getpid()}) + "\n")

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def progress(state: str, step: int) -> None:
        if rank != 0:
            return
        last = max((s for s in done if s <= step), default=None)
        doc = {"job": job["metadata"]["name"], "attempt": attempt, "state": state, "step": step,
               "total_steps": total, "percent": 100 * step // total, "epoch": step / total,
               "loss": round(3.0 / (1 + step), 4), "tokens_per_second": 1000.0, "eta_seconds": (total - step) * pause,
               "last_checkpoint": {"uri": f"{spec['output']['uri']}/checkpoints/step-{last:08d}", "step": last}
               if last else None}  # fmt: skip
        tmp = out / ".progress.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.rename(out / "progress.json")

    def commit(step: int) -> None:
        if rank == 0 and step not in done:
            d = ckpts / f"step-{step:08d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / "COMMITTED").write_text(json.dumps({"step": step}))
            done.append(step)

    step = start
    progress("running", step)
    while step < total:
        time.sleep(pause)
        if stop:
            commit(step)
            progress("preempted", step)
            return EXIT_PREEMPTED
        step += 1
        if fail and hit(fail, step):
            if fail.get("message") and os.environ.get(ENV_TERMINATION_MESSAGE_PATH):
                Path(os.environ[ENV_TERMINATION_MESSAGE_PATH]).write_text(fail["message"] + "\n")
            return int(fail.get("code", 1))
        while behaviour.get("stall") and hit(behaviour["stall"], step) and not stop:
            time.sleep(0.1)
        if step % every == 0:
            commit(step)
        progress("running", step)
    if rank == 0:
        (out / "final" / "adapter").mkdir(parents=True, exist_ok=True)
        (out / "final" / "adapter" / "adapter_config.json").write_text("{}")
        progress("done", step)
    while behaviour.get("linger") and hit(behaviour["linger"], step) and not stop:
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
