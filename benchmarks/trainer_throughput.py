"""Training throughput of kubetune's trainer against a plain transformers `Trainer` script.

    python benchmarks/trainer_throughput.py                    # CPU: ~20M-param Qwen2-shaped model
    python benchmarks/trainer_throughput.py --device cuda      # GPU: Qwen2.5-0.5B-shaped, bf16, + MFU

Both sides train the same random-weight model (saved once as safetensors), on the same rows (the
first `--rows` of examples/data/alpaca_en_200.json) rendered with the same ChatML template, with the
same sequence length, batch size, learning rate, seed, method (LoRA by default, `--method full`) and
logging cadence, for exactly one epoch. Each side runs in its own fresh process (so peak memory is
its own) with `--threads` torch threads, alternately, `--repeats` times; the table shows the best
run of each:

- kubetune: `kubetune_trainer.train.run_training` with the job as YAML would say it (data through
  kubetune's pipeline, reporting callback, metrics.jsonl, token counting across ranks);
- plain: what one writes by hand: `datasets.load_dataset("json")`, `apply_chat_template` +
  truncation in `.map`, `DataCollatorForSeq2Seq`, `TrainingArguments`, `Trainer(...).train()`.

tokens/s = non-padding input tokens of the epoch / wall time of the training loop, measured the
same way on both sides by a callback from `on_train_begin` to `on_train_end` (model loading, data
preparation and export are not timed). tokens/CPU-s uses the process's CPU time over the same span
instead: on a machine shared with other work it still compares the two trainers fairly (run it
with `--threads 1` there, so no thread spins waiting for a descheduled sibling). Peak memory is the process's
maximum RSS on CPU, `torch.cuda.max_memory_allocated` on GPU. MFU (GPU) = achieved FLOP/s / the
device's peak dense bf16 FLOP/s, with FLOPs per token = 6 * trainable parameters + 4 * frozen ones
(a frozen base under LoRA needs its forward and input gradients, not weight gradients)
+ 12 * layers * hidden * seq_length (attention scores and values, forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data" / "alpaca_en_200.json"

SHAPES = {
    # ~20M parameters: a small Qwen2 (GQA, SwiGLU) that a 2-core CPU trains in seconds
    "cpu": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1408, vocab_size=2048, tie_word_embeddings=False),
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, 151936-token vocabulary, tied head
    "cuda": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


# ---------------------------------------------------------------- setup (parent process)


def build_model(out: Path, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kubetune_trainer.tiny import build_tokenizer

    tok = build_tokenizer()
    shape = dict(SHAPES[device])
    config = Qwen2Config(
        **shape, max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def job_doc(a: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    pet = {
        "pet_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(a.data), "format": "alpaca"},
            "pet_config": pet if a.method == "lora" else {"pet_type": "full"},
            "training": {
                "learning_rate": 1e-3 if a.method == "lora" else 1e-4,
                "num_train_epochs": 1,
                "per_device_train_batch_size": a.batch_size,
                "seq_length": a.seq_length,
                "precision": "bf16" if a.device == "cuda" else "fp32",
                "lr_scheduler_type": "constant",
                "logging_steps": 10,
                "seed": 42,
            },  # fmt: skip
            "checkpoint": {"every_steps": 1_000_000},
            "output": {"uri": str(out), "merge_adapter": False},
        },
    }


# ---------------------------------------------------------------- workers (one process each)


def _peak_memory_mb(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _loop_timer():  # noqa: ANN202 - a TrainerCallback, built after transformers is imported
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        """Wall and CPU seconds from the first to the last training step (the same on both sides)."""

        def on_train_begin(self, args, state, control, **kw):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kw):
            self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    return LoopTimer()


def worker_kubetune(job_path: Path, workdir: Path, device: str) -> dict:
    from kubetune.validate import load_job
    from kubetune_trainer.train import run_training

    timer = _loop_timer()
    result = run_training(load_job(job_path), workdir=workdir, callbacks=[timer])
    return {
        "tokens": result.tokens_seen,
        "wall_s": timer.wall,
        "cpu_s": timer.cpu,
        "steps": result.global_step,
        "trainable": result.trainable_params,
        "params": result.total_params,
        "peak_mb": _peak_memory_mb(device),
    }


def worker_plain(job_path: Path, workdir: Path, device: str) -> dict:
    """The training script one writes by hand with transformers (+ peft for LoRA)."""
    import datasets
    import torch
    import yaml
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    spec = yaml.safe_load(job_path.read_text())["spec"]
    t, model_dir = spec["training"], spec["model"]["uri"]
    bf16 = t["precision"] == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    if spec["pet_config"]["pet_type"] == "lora":
        from peft import LoraConfig, get_peft_model

        pc = spec["pet_config"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=pc["lora_rank"], lora_alpha=pc["lora_alpha"], lora_dropout=pc["lora_dropout"],
                target_modules=pc["target_modules"], task_type="CAUSAL_LM",
            ),
        )  # fmt: skip

    def tokenize(row: dict) -> dict:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(text, truncation=True, max_length=t["seq_length"])["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}

    raw = datasets.load_dataset("json", data_files=spec["dataset"]["uri"], split="train")
    train = raw.map(tokenize, remove_columns=raw.column_names)
    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=t["per_device_train_batch_size"],
        num_train_epochs=t["num_train_epochs"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        logging_steps=t["logging_steps"],
        seed=t["seed"],
        bf16=bf16,
        use_cpu=device == "cpu",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    timer = _loop_timer()  # the measuring harness, the same on both sides
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[timer],
    )
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "tokens": sum(len(x) for x in train["input_ids"]),
        "wall_s": timer.wall,
        "cpu_s": timer.cpu,
        "steps": trainer.state.global_step,
        "trainable": trainable,
        "params": sum(p.numel() for p in model.parameters()),
        "peak_mb": _peak_memory_mb(device),
    }


# ---------------------------------------------------------------- report


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def flops_per_token(r: dict, shape: dict, seq_length: int) -> float:
    frozen = r["params"] - r["trainable"]
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq_length
    return 6 * r["trainable"] + 4 * frozen + attention


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 16 on GPU")
    p.add_argument("--rows", type=int, default=64, help="rows of --data trained on (one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side (best is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: all cores)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak bf16 TFLOP/s for MFU")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", choices=["kubetune", "plain"], help=argparse.SUPPRESS)
    p.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batch_size = a.batch_size or (16 if a.device == "cuda" else 4)

    if a.worker:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        fn = worker_kubetune if a.worker == "kubetune" else worker_plain
        print("RESULT " + json.dumps(fn(a.job, a.workdir, a.device)), flush=True)
        return 0

    import yaml

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = build_model(tmp_path / "model", a.device)
        rows = json.loads(a.data.read_text(encoding="utf-8"))[: a.rows]
        a.data = tmp_path / a.data.name
        a.data.write_text(json.dumps(rows), encoding="utf-8")
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(job_doc(a, model_dir, tmp_path / "out")))
        runs: dict[str, list[dict]] = {"plain": [], "kubetune": []}
        for i in range(a.repeats):
            for side in ("plain", "kubetune"):
                cmd = [sys.executable, __file__, "--worker", side, "--job", str(job), "--device", a.device,
                       "--workdir", str(tmp_path / f"work-{side}-{i}"), "--threads", str(a.threads or 0)]  # fmt: skip
                t0 = time.time()
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
                )
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    sys.stderr.write(proc.stderr[-4000:])
                    raise SystemExit(f"{side} run failed (exit {proc.returncode})")
                r = json.loads(line[7:])
                r["tokens_per_second"] = r["tokens"] / r["wall_s"]
                r["tokens_per_cpu_second"] = r["tokens"] / r["cpu_s"]
                runs[side].append(r)
                print(f"  run {i + 1} {side:8s}: {r['tokens_per_second']:9.1f} tok/s, "
                      f"{r['tokens_per_cpu_second']:9.1f} tok/CPU-s, {r['tokens']} tokens in {r['steps']} steps, "
                      f"{r['wall_s']:.1f}s loop, {r['peak_mb']:.0f} MiB peak ({time.time() - t0:.0f}s)",
                      file=sys.stderr, flush=True)  # fmt: skip

    best = {side: max(rs, key=lambda r: r["tokens_per_second"]) for side, rs in runs.items()}
    best_cpu = {side: max(r["tokens_per_cpu_second"] for r in rs) for side, rs in runs.items()}
    shape = SHAPES[a.device]
    peak = peak_tflops(a.device, a.peak_tflops)
    ratio = best["kubetune"]["tokens_per_second"] / best["plain"]["tokens_per_second"]
    ratio_cpu = best_cpu["kubetune"] / best_cpu["plain"]
    params = best["kubetune"]["params"]
    print(f"\ntrainer throughput: {a.device}, {a.method}, {params / 1e6:.1f}M params, seq_length {a.seq_length}, "
          f"batch {a.batch_size}, 1 epoch of {a.rows} rows of {DATA.name}, threads {a.threads or 'all'}, "
          f"best of {a.repeats}")  # fmt: skip
    header = (
        f"| {'trainer':9s} | {'tokens/s':>10s} | {'tokens/CPU-s':>12s} | {'peak memory':>12s} | {'MFU':>6s} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for side in ("plain", "kubetune"):
        r = best[side]
        mfu = "-"
        if peak:
            mfu = f"{r['tokens_per_second'] * flops_per_token(r, shape, a.seq_length) / (peak * 1e12):.1%}"
        print(f"| {side:9s} | {r['tokens_per_second']:10.1f} | {best_cpu[side]:12.1f} | "
              f"{r['peak_mb']:8.0f} MiB | {mfu:>6s} |")  # fmt: skip
    print(f"\nkubetune / plain: tokens/s {ratio:.3f}, tokens/CPU-s {ratio_cpu:.3f} (target >= 0.95)")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": runs,
                                      "ratio": ratio, "ratio_cpu": ratio_cpu}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
