"""Padding: best-fit packing and length-grouped batches against the in-order packer and random order.

    python benchmarks/packing.py                 # fill table + training table (fresh process per run)
    python benchmarks/packing.py --no-train      # fill table only (seconds)

Fill (in this process, no training): real / padded positions of one epoch of the batches the
Trainer's own train dataloader yields, on the alpaca demo (examples/data/alpaca_en_200.json, 200
rows, the tiny Qwen2 tokenizer, seq_length 512, batch 4), for:

- sft ``random``: unpacked rows in random order (the default);
- sft ``group_by_length``: unpacked, ``training.group_by_length: true``;
- sft ``greedy``: ``training.packing: true`` with the earlier packer (samples in order, a new row
  when the next does not fit; ``packing.pack_greedy``);
- sft ``best-fit``: ``training.packing: true`` (best-fit decreasing, ``packing.pack_best_fit``);
- pretrain (examples/data/c4_118.jsonl): concatenated blocks (``packing.pack_blocks``, what a
  stream packs and what in-memory pre-training packed before) against best fit, with the number
  of document cuts beyond the ones a document longer than seq_length needs;
- dpo (the same rows as prompt / chosen / a shortened rejected reply): random order against
  ``group_by_length`` (TRL pads chosen and rejected of a batch to one width).

Training: real (non-padding) tokens per CPU-second of the training loop, one epoch of the first
``--rows`` rows, LoRA r16 on all linear layers of the ~20M-parameter Qwen2 of
benchmarks/trainer_throughput.py, fp32, one torch thread, each run in a fresh process, the modes
alternating, ``--repeats`` times (best per mode). CPU time keeps the comparison fair on a machine
shared with other work. Ratios are against the earlier packer (``greedy``) and the default
(``random``) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
ALPACA = REPO / "examples" / "data" / "alpaca_en_200.json"
C4 = REPO / "examples" / "data" / "c4_118.jsonl"
SFT_MODES = {
    "random": {},
    "group_by_length": {"group_by_length": True},
    "greedy": {"packing": True},
    "best-fit": {"packing": True},
}


def use_greedy_packer() -> None:
    """Build packed SFT rows with the earlier in-order packer (the baseline)."""
    import kubetune_trainer.datasets_build as db
    from kubetune_trainer.packing import pack_greedy

    db.segments = lambda encoded, seq_length, split: pack_greedy(encoded, seq_length)
    db.pack_best_fit = lambda ds, seq_length: ds


def job(method: str, data: Path, model_dir: Path, out: Path, a: argparse.Namespace, **training: Any) -> Any:
    from kubetune.spec import FineTuneJob

    pet = {
        "pet_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": ".*_proj",
    }
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": {
                "model": {"uri": str(model_dir)},
                "dataset": {"uri": str(data)},
                "method": method,
                "pet_config": pet,
                "training": {
                    "learning_rate": 1e-3,
                    "num_train_epochs": 1,
                    "per_device_train_batch_size": a.batch_size,
                    "seq_length": a.seq_length,
                    "precision": "fp32",
                    "lr_scheduler_type": "constant",
                    "logging_steps": 10,
                    "seed": 42,
                    **training,
                },  # fmt: skip
                "checkpoint": {"every_steps": 1_000_000},
                "output": {"uri": str(out), "merge_adapter": False},
            },
        }
    )


# ---------------------------------------------------------------- fill (this process)


def _epoch_fill(trainer: Any) -> tuple[int, int]:
    """(real, padded) positions of one epoch of the trainer's train batches."""
    real = padded = 0
    for b in trainer.get_train_dataloader():
        ids = b["input_ids"]
        padded += ids.numel()
        if "attention_mask" in b:
            real += int(b["attention_mask"].sum())
        else:  # packed: the padding is the trailing run of pad ids with label -100
            for row, lab in zip(ids.tolist(), b["labels"].tolist(), strict=True):
                n = len(row)
                while n and row[n - 1] == trainer.processing_class.pad_token_id and lab[n - 1] == -100:
                    n -= 1
                real += n
    return real, padded


def fill_table(model_dir: Path, tmp: Path, a: argparse.Namespace) -> list[tuple[str, str, float, str]]:
    from transformers import AutoModelForCausalLM, Trainer

    from kubetune_trainer import model_loading, pet
    from kubetune_trainer.datasets_build import build_datasets
    from kubetune_trainer.packing import pack_blocks
    from kubetune_trainer.recipes.dpo import build_dpo_trainer
    from kubetune_trainer.train import training_arguments
    from kubetune_trainer.trainer_class import kubetune_trainer

    precision = model_loading.resolve_precision("fp32", "cpu")
    rows: list[tuple[str, str, float, str]] = []

    def trainer_for(j: Any) -> tuple[Any, Any]:
        tok = model_loading.load_tokenizer(j.spec, model_dir)
        t0 = time.process_time()
        built = build_datasets(j, tok, seed=42)
        build_s = time.process_time() - t0
        args = training_arguments(j.spec, tmp / "ck", precision=precision, has_eval=False)
        if j.spec.method == "dpo":
            plan = pet.plan_pet(j.spec, precision)
            model = model_loading.load_model(
                model_dir, j.spec, precision, quantization_config=None, device="cpu"
            )
            model = pet.apply_pet(model, j.spec, plan)
            tr = build_dpo_trainer(j.spec, model=model, tokenizer=tok, data=built, args=args, plan=plan)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
            tr = kubetune_trainer(Trainer)(
                model=model, args=args, train_dataset=built.train_dataset, data_collator=built.data_collator,
                processing_class=tok,
            )  # fmt: skip
        return tr, (built, build_s)

    import kubetune_trainer.datasets_build as db

    saved = (db.segments, db.pack_best_fit)
    for mode, training in SFT_MODES.items():
        if mode == "greedy":
            use_greedy_packer()
        tr, (built, build_s) = trainer_for(job("sft", ALPACA, model_dir, tmp / "o", a, **training))
        db.segments, db.pack_best_fit = saved
        real, padded = _epoch_fill(tr)
        rows.append(
            (
                "sft",
                mode,
                real / padded,
                f"{len(built.train_dataset)} rows, data built in {build_s:.2f} CPU-s",
            )
        )

    # pre-training: document cuts and fill of the packed rows
    for mode in ("blocks", "best-fit"):
        j = job("pretrain", C4, model_dir, tmp / "o", a, packing=True)
        tok = model_loading.load_tokenizer(j.spec, model_dir)
        if mode == "blocks":
            from kubetune_trainer.chat_render import ChatRenderer
            from kubetune_trainer.data_sources import iter_rows
            from kubetune_trainer.formats import Example

            docs = ChatRenderer(tok).encode_batch(
                [Example("text", text=r.data["text"]) for r in iter_rows(str(C4))], truncate=False
            )
            packed = list(pack_blocks(docs, a.seq_length))
        else:
            packed = list(build_datasets(j, tok, seed=42).train_dataset)
            docs = None
        segments = sum(r["position_ids"].count(0) for r in packed)
        tokens = sum(len(r["input_ids"]) for r in packed)
        if docs is not None:
            needed = sum(-(-len(d.input_ids) // a.seq_length) for d in docs)
        rows.append(("pretrain", mode, tokens / (len(packed) * a.seq_length),
                     f"{len(packed)} rows, {segments - needed} extra document cuts"))  # fmt: skip

    # dpo: the same rows as preference pairs
    pairs = [
        {
            "prompt": r["instruction"],
            "chosen": r["output"],
            "rejected": "No. " + r["output"][: len(r["output"]) // 3],
        }
        for r in json.loads(ALPACA.read_text())
    ]
    prefs = tmp / "pairs.json"
    prefs.write_text(json.dumps(pairs), encoding="utf-8")
    for mode, training in (("random", {}), ("group_by_length", {"group_by_length": True})):
        tr, (built, _) = trainer_for(job("dpo", prefs, model_dir, tmp / "o", a, **training))
        real, padded = _epoch_fill(tr)
        rows.append(
            ("dpo", mode, real / padded, f"{len(built.train_dataset)} pairs (chosen + rejected rows)")
        )
    return rows


# ---------------------------------------------------------------- training (one process per run)


def worker(job_path: Path, workdir: Path, mode: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from kubetune.validate import load_job
    from kubetune_trainer.train import run_training

    torch.set_num_threads(1)
    if mode == "greedy":
        use_greedy_packer()

    class LoopTimer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cpu = time.process_time()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cpu = time.process_time() - self.cpu

    timer = LoopTimer()
    result = run_training(load_job(job_path), workdir=workdir, callbacks=[timer])
    return {"tokens": result.tokens_seen, "cpu_s": timer.cpu, "steps": result.global_step}


def train_table(model_dir: Path, tmp: Path, a: argparse.Namespace) -> dict[str, list[dict]]:
    import yaml

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[: a.rows]
    data = tmp / "rows.json"
    data.write_text(json.dumps(rows), encoding="utf-8")
    runs: dict[str, list[dict]] = {m: [] for m in SFT_MODES}
    for i in range(a.repeats):
        for mode, training in SFT_MODES.items():
            path = tmp / f"job-{mode}.yaml"
            doc = job("sft", data, model_dir, tmp / f"out-{mode}-{i}", a, **training).model_dump(mode="json")
            path.write_text(yaml.safe_dump(doc))
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                "--job",
                str(path),
                "--workdir",
                str(tmp / f"w-{mode}-{i}"),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"{mode} run failed (exit {proc.returncode})")
            r = json.loads(line[7:])
            runs[mode].append(r)
            print(f"  run {i + 1} {mode:16s}: {r['tokens'] / r['cpu_s']:7.1f} real tok/CPU-s, {r['tokens']} tokens, "
                  f"{r['steps']} steps, {r['cpu_s']:.1f} CPU-s", file=sys.stderr, flush=True)  # fmt: skip
    return runs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rows", type=int, default=64, help="rows of the alpaca demo trained on (one epoch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--worker", choices=list(SFT_MODES), help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.job, a.workdir, a.worker)), flush=True)
        return 0

    from trainer_throughput import build_model

    with tempfile.TemporaryDirectory(prefix="kubetune-packing-") as t:
        tmp = Path(t)
        model_dir = build_model(tmp / "model", "cpu")
        fills = fill_table(model_dir, tmp, a)
        runs = None if a.no_train else train_table(model_dir, tmp, a)

    print(
        f"\nfill: one epoch of the Trainer's train batches, seq_length {a.seq_length}, batch {a.batch_size}"
    )
    print("| data | order / packer | real / padded positions | vs baseline | |")
    print("|---|---|---|---|---|")
    base = {"sft": "random", "pretrain": "blocks", "dpo": "random"}
    ratios = {(m, mode): f for m, mode, f, _ in fills}
    for m, mode, f, note in fills:
        vs = f / ratios[(m, base[m])]
        extra = f", {f / ratios[('sft', 'greedy')]:.2f}x greedy" if m == "sft" and mode == "best-fit" else ""
        print(f"| {m} | {mode} | {f:.3f} | {vs:.2f}x {base[m]}{extra} | {note} |")
    if runs:
        best = {m: max(r["tokens"] / r["cpu_s"] for r in rs) for m, rs in runs.items()}
        print(
            f"\ntraining: one epoch of {a.rows} rows, LoRA r16, fp32, 1 thread, best of {a.repeats} fresh processes"
        )
        print("| sft mode | real tok/CPU-s | vs random | vs greedy | steps |")
        print("|---|---|---|---|---|")
        for m, v in best.items():
            steps = runs[m][0]["steps"]
            print(f"| {m} | {v:.1f} | {v / best['random']:.2f} | {v / best['greedy']:.2f} | {steps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
