"""The GPU check's measurements (run by benchmarks/gpu_check.sh, which installs what it needs).

    python benchmarks/gpu_check.py                # CUDA: Qwen2.5-0.5B-shaped random model, bf16
    python benchmarks/gpu_check.py --dry-run      # CPU: a tiny model, a few steps (tests run this)

Rows, each a fresh process:

- LoRA tokens/s (r16, all linear layers) of a plain transformers ``Trainer`` script and of
  kubetune's ``run_training``, without and with Liger kernels (``liger_kernel``'s
  ``apply_liger_kernel_to_qwen2``, applied the same way on both sides before the model loads),
  kubetune unpacked and with ``training.packing``; peak memory is
  ``torch.cuda.max_memory_allocated`` (peak RSS on CPU);
- full fine-tuning, packed, with its MFU: FLOPs per token = 6 x parameters + 12 x layers x hidden
  x seq_length, over the GPU's dense bf16 peak;
- the exact-resume check: kubetune trains N steps; then N/2 steps with a checkpoint there, the
  process kills itself (SIGKILL) right after the save, a new process resumes from the checkpoint;
  the losses of steps N/2+1..N of both runs are compared (deterministic algorithms on).

tokens = non-padding input tokens, counted by the same forward pre-hook on both sides; tokens/s
over the training loop's wall time (``on_train_begin`` to ``on_train_end``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ALPACA = REPO / "examples" / "data" / "alpaca_en_200.json"
SHAPES = {
    # Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads / 2 KV heads, 151936-token vocabulary, tied head
    "cuda": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "cpu": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=192, vocab_size=2048, tie_word_embeddings=True),
}  # fmt: skip
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
RUNS = [
    # (name, side, pet, liger, packing)
    ("lora, plain Trainer", "plain", "lora", False, False),
    ("lora, kubetune", "kubetune", "lora", False, False),
    ("lora, kubetune, packed", "kubetune", "lora", False, True),
    ("lora + liger, plain Trainer", "plain", "lora", True, False),
    ("lora + liger, kubetune", "kubetune", "lora", True, False),
    ("lora + liger, kubetune, packed", "kubetune", "lora", True, True),
    ("full, kubetune, packed", "kubetune", "full", False, True),
]


def build_model(out: Path, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kubetune_trainer.tiny import build_tokenizer

    tok = build_tokenizer()
    shape = dict(SHAPES[device])
    shape["vocab_size"] = max(shape["vocab_size"], len(tok))
    config = Qwen2Config(**shape, max_position_embeddings=32768, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(
        out, safe_serialization=True
    )
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- workers (one process each)


def _meter(pad_id: int) -> Any:
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        tokens = 0

        def _count(self, module: Any, args: Any, kwargs: dict) -> None:
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if ids is None:
                return
            if mask is not None:
                self.tokens += int(mask.sum())
                return
            for row, lab in zip(ids.tolist(), kwargs["labels"].tolist(), strict=True):
                n = len(row)
                while n and row[n - 1] == pad_id and lab[n - 1] == -100:  # trailing padding of a packed row
                    n -= 1
                self.tokens += n

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            _sync()
            self.wall = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync()
            self.wall = time.perf_counter() - self.wall
            self.losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.steps = state.global_step

    return Meter()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _use_liger() -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    apply_liger_kernel_to_qwen2()  # patches transformers' Qwen2 modules before the model is built


def job_doc(a: argparse.Namespace, model_dir: Path, data: Path, out: Path, pet: str, packing: bool) -> dict:
    lora = {
        "pet_type": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gpu-check"},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(data), "format": "alpaca"},
            "pet_config": lora if pet == "lora" else {"pet_type": "full"},
            "training": {"learning_rate": 1e-3 if pet == "lora" else 1e-5, "max_steps": a.steps,
                         "per_device_train_batch_size": a.batch_size, "seq_length": a.seq_length,
                         "precision": "bf16" if a.device == "cuda" else "fp32", "lr_scheduler_type": "constant",
                         "logging_steps": 1, "seed": 42, "packing": packing},
            "checkpoint": {"every_steps": a.checkpoint_every or 1_000_000, "keep_last": 2},
            "output": {"uri": str(out), "merge_adapter": False},
        },
    }  # fmt: skip


def worker_kubetune(w: dict) -> dict:
    from kubetune.spec import FineTuneJob
    from kubetune_trainer.train import run_training

    if w["liger"]:
        _use_liger()
    from transformers import AutoTokenizer, TrainerCallback

    job = FineTuneJob.model_validate(w["job"])
    meter = _meter(AutoTokenizer.from_pretrained(job.spec.model.uri).pad_token_id)

    class KillAfterSave(TrainerCallback):  # the resume check's interrupted run: dies like a lost node
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == w.get("kill_at"):
                print(
                    "RESULT " + json.dumps({"losses": [h["loss"] for h in state.log_history if "loss" in h]})
                )
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    resume = Path(w["resume_from"]) if w.get("resume_from") else None
    result = run_training(
        job, workdir=Path(w["workdir"]), callbacks=[meter, KillAfterSave()], resume_from=resume
    )
    return {"tokens": meter.tokens, "wall_s": meter.wall, "steps": result.global_step, "losses": meter.losses,
            "params": result.total_params, "trainable": result.trainable_params, "peak_mib": _peak_mib()}  # fmt: skip


def worker_plain(w: dict) -> dict:
    """The LoRA script one writes by hand with transformers and peft."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    if w["liger"]:
        _use_liger()
    spec = w["job"]["spec"]
    t, model_dir = spec["training"], spec["model"]["uri"]
    bf16 = t["precision"] == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))  # fmt: skip

    def tokenize(row: dict) -> dict:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                               add_generation_prompt=True)  # fmt: skip
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}],
            tokenize=False,
        )
        ids = tokenizer(full, truncation=True, max_length=t["seq_length"])["input_ids"]
        n_prompt = min(len(tokenizer(prompt)["input_ids"]), len(ids))  # a prompt longer than seq_length
        return {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [-100] * n_prompt + ids[n_prompt:],
        }

    raw = datasets.load_dataset("json", data_files=spec["dataset"]["uri"], split="train")
    train = raw.map(tokenize, remove_columns=raw.column_names)
    args = TrainingArguments(
        output_dir=w["workdir"], per_device_train_batch_size=t["per_device_train_batch_size"],
        max_steps=t["max_steps"], learning_rate=t["learning_rate"], lr_scheduler_type="constant", logging_steps=1,
        seed=42, bf16=bf16, use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[],
        disable_tqdm=True,
    )  # fmt: skip
    meter = _meter(tokenizer.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[meter],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))  # fmt: skip
    trainer.train()
    return {"tokens": meter.tokens, "wall_s": meter.wall, "steps": trainer.state.global_step,
            "losses": meter.losses, "peak_mib": _peak_mib()}  # fmt: skip


# ---------------------------------------------------------------- driver


def spawn(w: dict, tmp: Path, timeout: float) -> dict:
    spec = tmp / f"w-{time.monotonic_ns()}.json"
    spec.write_text(json.dumps(w))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if w.get("deterministic"):
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec)], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    killed = proc.returncode == -signal.SIGKILL
    if line is None or (proc.returncode != 0 and not (killed and w.get("kill_at"))):
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"gpu check: worker {w['name']} failed (exit {proc.returncode})")
    return json.loads(line[7:])


def peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, a few steps")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seq-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--timeout", type=float, default=150, help="seconds per worker process")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        w = json.loads(a.worker.read_text())
        import torch

        if w.get("deterministic"):
            torch.use_deterministic_algorithms(True)
        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        fn = worker_kubetune if w["side"] == "kubetune" else worker_plain
        print("RESULT " + json.dumps(fn(w)), flush=True)
        return 0

    import torch

    a.device = "cpu" if a.dry_run or not torch.cuda.is_available() else "cuda"
    if a.device == "cpu" and not a.dry_run:
        raise SystemExit("gpu check: no CUDA device here; --dry-run runs the CPU rehearsal")
    a.steps = a.steps or (4 if a.dry_run else 30)
    a.seq_length = a.seq_length or (64 if a.dry_run else 1024)
    a.batch_size = a.batch_size or (2 if a.dry_run else 16)
    a.checkpoint_every = None
    try:
        import liger_kernel  # noqa: F401

        has_liger = a.device == "cuda"
    except ImportError:
        has_liger = False
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as t:
        tmp = Path(t)
        model_dir = build_model(tmp / "model", a.device)
        data = tmp / "rows.json"
        data.write_text(json.dumps(json.loads(ALPACA.read_text(encoding="utf-8"))), encoding="utf-8")
        for name, side, pet, liger, packing in RUNS:
            if liger and not has_liger:
                rows.append({"name": name, "skipped": "needs liger-kernel and CUDA"})
                continue
            job = job_doc(a, model_dir, data, tmp / f"out-{len(rows)}", pet, packing)
            w = {
                "name": name,
                "side": side,
                "liger": liger,
                "job": job,
                "workdir": str(tmp / f"w-{len(rows)}"),
            }
            r = spawn(w, tmp, a.timeout)
            r["name"] = name
            rows.append(r)
            print(
                f"  {name}: {r['tokens'] / r['wall_s']:.0f} tok/s, {r['peak_mib']:.0f} MiB", file=sys.stderr
            )
        resume = resume_check(a, model_dir, data, tmp)
    print_table(rows, resume, a)
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "resume": resume}, indent=1))
    return 0 if resume["exact"] else 1


def resume_check(a: argparse.Namespace, model_dir: Path, data: Path, tmp: Path) -> dict:
    """N steps straight; N/2 steps, SIGKILL after the save, resume: the last N/2 losses must agree."""
    half = a.steps // 2
    a.checkpoint_every = half
    common = {"side": "kubetune", "liger": False, "deterministic": True}
    straight = spawn({**common, "name": "resume: straight", "job": job_doc(a, model_dir, data, tmp / "r1", "lora", True),
                      "workdir": str(tmp / "r1w")}, tmp, a.timeout)  # fmt: skip
    work = tmp / "r2w"
    spawn({**common, "name": "resume: killed", "kill_at": half, "job": job_doc(a, model_dir, data, tmp / "r2", "lora", True),
           "workdir": str(work)}, tmp, a.timeout)  # fmt: skip
    ckpt = work / "checkpoints" / f"checkpoint-{half}"
    resumed = spawn({**common, "name": "resume: resumed", "resume_from": str(ckpt),
                     "job": job_doc(a, model_dir, data, tmp / "r2", "lora", True), "workdir": str(work)}, tmp, a.timeout)  # fmt: skip
    a.checkpoint_every = None
    tail_a, tail_b = straight["losses"][half:], resumed["losses"][-(a.steps - half) :]
    diff = max((abs(x - y) for x, y in zip(tail_a, tail_b, strict=True)), default=float("nan"))
    return {"steps": a.steps, "resumed_at": half, "straight": tail_a, "resumed": tail_b, "max_abs_diff": diff,
            "exact": len(tail_a) == len(tail_b) == a.steps - half and diff == 0.0}  # fmt: skip


def print_table(rows: list[dict], resume: dict, a: argparse.Namespace) -> None:
    import torch

    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "CPU (dry run)"
    peak = peak_tflops()
    base = {r["name"].split(",")[0]: r for r in rows if "plain" in r["name"] and "tokens" in r}
    print(
        f"\ngpu check: {gpu}, torch {torch.__version__}, seq {a.seq_length}, batch {a.batch_size}, {a.steps} steps"
    )
    print("| run | tokens/s | vs plain Trainer | peak memory | MFU | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['name']} | skipped: {r['skipped']} | | | | |")
            continue
        tps = r["tokens"] / r["wall_s"]
        ref = base.get(r["name"].split(",")[0])
        vs = f"{tps / (ref['tokens'] / ref['wall_s']):.3f}" if ref else "-"
        mfu = "-"
        if r["name"].startswith("full") and peak:
            flops = (
                6 * r["params"]
                + 12 * SHAPES["cuda"]["num_hidden_layers"] * SHAPES["cuda"]["hidden_size"] * a.seq_length
            )
            mfu = f"{tps * flops / (peak * 1e12):.1%}"
        print(f"| {r['name']} | {tps:.0f} | {vs} | {r['peak_mib']:.0f} MiB | {mfu} | {r['losses'][-1]:.4f} |")
    verdict = "exact" if resume["exact"] else f"DIFFERS (max |diff| {resume['max_abs_diff']:.3g})"
    print(f"| resume: {resume['steps']} steps vs killed at {resume['resumed_at']} + resumed | losses of steps "
          f"{resume['resumed_at'] + 1}-{resume['steps']}: {verdict} | | | | |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
