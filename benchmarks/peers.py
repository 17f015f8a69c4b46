"""kubetune's trainer against a plain TRL `SFTTrainer` script: the same LoRA run, packed and unpacked.

    python benchmarks/peers.py            # ~26M-parameter Qwen2, seq 512, batch 4, fresh process per run
    python benchmarks/peers.py --quick    # a tiny model, a few steps: checks the script itself (tests)

Both sides train the same random-weight Qwen2-shaped model (hidden 512, 8 layers, GQA 8/2 heads,
SwiGLU 1536, the 2048-token vocabulary of kubetune_trainer.tiny; ~26M parameters, saved once as
safetensors) on the same rows (one epoch of the first ``--rows`` of the alpaca demo,
examples/data/alpaca_en_200.json), rendered with the same ChatML chat template and the prompt
masked, with LoRA r16 / alpha 32 / no dropout on every linear layer but the head, the same
learning rate, constant schedule, seed, sequence length and batch, one torch thread each, and the
same precision (``--precision``, default bf16: TRL's default ``bf16=True`` autocasts an fp32 model,
kubetune's ``precision: bf16`` loads the frozen base in bf16 and autocasts, adapters fp32 on both):

- kubetune: ``run_training`` on a FineTuneJob (alpaca format; ``training.packing: true`` packs
  best fit, position ids restart per sample);
- TRL: the script one writes with TRL 1.x: prompt/completion conversations from
  ``datasets.load_dataset("json")``, ``SFTConfig(packing=True)`` (its ``bfd`` strategy, padding
  free) or unpacked, ``SFTTrainer(peft_config=LoraConfig(...))``; its ``gradient_checkpointing``
  (on by default in TRL, off in kubetune) is set to ``--gradient-checkpointing`` (off) like kubetune's.

Measured the same way on both sides, by one callback: real (non-padding) tokens per CPU-second of
the training loop (``on_train_begin`` to ``on_train_end``; a forward pre-hook on the model counts
the real and the padded positions of every batch), fill = real / padded positions, peak RSS of the
process, start-up = wall time from launching the process to the end of the first step, and the
last logged training loss. Each run is a fresh process; the four runs alternate ``--repeats``
times and the best tokens/CPU-s of each is kept. Ratios are against TRL in the same mode,
measured in the same invocation.
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ALPACA = REPO / "examples" / "data" / "alpaca_en_200.json"
SIDES = ("trl", "kubetune")
MODES = ("unpacked", "packed")
SHAPES = {
    "full": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1536),
    "quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=384),
}  # fmt: skip
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LR = 1e-3
SEED = 42


def build_model(out: Path, shape: str) -> tuple[Path, int]:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from kubetune_trainer.tiny import build_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(
        **SHAPES[shape], vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- the measuring callback (both sides)


def meter(pad_id: int) -> Any:
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        """CPU time of the loop, real and padded positions of every batch, first-step time, loss."""

        real = padded = 0
        first_step_s: float | None = None

        def _count(self, module: Any, args: Any, kwargs: dict) -> None:
            ids = kwargs.get("input_ids")
            if ids is None:
                return
            self.padded += ids.numel()
            mask = kwargs.get("attention_mask")
            if mask is not None:
                self.real += int(mask.sum())
                return
            # packed rows (no mask): padding is the trailing run of pad ids with label -100
            labels = kwargs.get("labels")
            for row, lab in zip(ids.tolist(), labels.tolist(), strict=True):
                n = len(row)
                while n and row[n - 1] == pad_id and lab[n - 1] == -100:
                    n -= 1
                self.real += n

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.cpu = time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.first_step_s is None:
                self.first_step_s = time.time() - float(os.environ["PEERS_LAUNCHED_AT"])

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.cpu = time.process_time() - self.cpu
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.loss = losses[-1] if losses else None
            self.steps = state.global_step

    return Meter()


def _result(m: Any) -> dict:
    return {
        "real": m.real, "padded": m.padded, "cpu_s": m.cpu, "steps": m.steps, "loss": m.loss,
        "startup_s": m.first_step_s, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


# ---------------------------------------------------------------- workers (one process each)


def worker_kubetune(model_dir: Path, data: Path, mode: str, a: argparse.Namespace, work: Path) -> dict:
    from kubetune.spec import FineTuneJob
    from kubetune_trainer.train import run_training

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "peers"},
            "spec": {
                "model": {"uri": str(model_dir)},
                "dataset": {"uri": str(data), "format": "alpaca"},
                "pet_config": {"pet_type": "lora", "lora_rank": LORA["r"], "lora_alpha": LORA["lora_alpha"],
                               "lora_dropout": LORA["lora_dropout"], "target_modules": "all-linear"},
                "training": {"learning_rate": LR, "num_train_epochs": 1, "per_device_train_batch_size": a.batch_size,
                             "seq_length": a.seq_length, "precision": a.precision, "lr_scheduler_type": "constant",
                             "logging_steps": 1, "seed": SEED, "packing": mode == "packed",
                             "gradient_checkpointing": a.gradient_checkpointing},
                "checkpoint": {"every_steps": 1_000_000},
                "output": {"uri": str(work / "out"), "merge_adapter": False},
            },
        }
    )  # fmt: skip
    from transformers import AutoTokenizer

    m = meter(AutoTokenizer.from_pretrained(model_dir).pad_token_id)
    run_training(job, workdir=work, callbacks=[m])
    return _result(m)


def worker_trl(model_dir: Path, data: Path, mode: str, a: argparse.Namespace, work: Path) -> dict:
    """The plain TRL script."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def to_conversation(row: dict) -> dict:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }

    raw = datasets.load_dataset("json", data_files=str(data), split="train")
    train = raw.map(to_conversation, remove_columns=raw.column_names)
    args = SFTConfig(
        output_dir=str(work), per_device_train_batch_size=a.batch_size, num_train_epochs=1, learning_rate=LR,
        lr_scheduler_type="constant", logging_steps=1, seed=SEED, max_length=a.seq_length,
        packing=mode == "packed", use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True,
        gradient_checkpointing=a.gradient_checkpointing,  # TRL's default is on, kubetune's off: the same here
        bf16=a.precision == "bf16",  # TRL's default is bf16 where the machine has it (autocast, fp32 weights)
    )  # fmt: skip
    m = meter(tokenizer.pad_token_id)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer,
        peft_config=LoraConfig(**LORA, target_modules="all-linear", task_type="CAUSAL_LM"), callbacks=[m],
    )  # fmt: skip
    trainer.train()
    return _result(m)


# ---------------------------------------------------------------- the table


def run_one(side: str, mode: str, model_dir: Path, data: Path, a: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--mode", mode, "--model", str(model_dir),
           "--data", str(data), "--workdir", str(work), "--seq-length", str(a.seq_length),
           "--batch-size", str(a.batch_size), "--precision", a.precision] + (["--gradient-checkpointing"] if a.gradient_checkpointing else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PEERS_LAUNCHED_AT=repr(time.time()))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} {mode} run failed (exit {proc.returncode})")
    r = json.loads(line[7:])
    r["tok_per_cpu_s"] = r["real"] / r["cpu_s"]
    return r


def table(best: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| mode | trainer | real tok/CPU-s | vs TRL | fill | peak RSS | start-up to first step | final loss | steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        base = best[("trl", mode)]["tok_per_cpu_s"]
        for side in SIDES:
            r = best[(side, mode)]
            lines.append(
                f"| {mode} | {side} | {r['tok_per_cpu_s']:.1f} | {r['tok_per_cpu_s'] / base:.3f} | "
                f"{r['real'] / r['padded']:.3f} | {r['peak_rss_mib']:.0f} MiB | {r['startup_s']:.1f} s | "
                f"{r['loss']:.4f} | {r['steps']} |"
            )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, seq 128, 8 rows, one repeat (seconds)")
    p.add_argument("--rows", type=int, default=64, help="rows of the alpaca demo trained on (one epoch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="on both sides (default off on both; TRL's own default is on)",
    )
    p.add_argument(
        "--precision", choices=["bf16", "fp32"], default="bf16",
        help="both sides (default bf16: TRL's default and kubetune's precision auto on CPUs with AMX/AVX512-BF16)",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="also write every run here")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(1)
        fn = worker_kubetune if a.worker == "kubetune" else worker_trl
        print("RESULT " + json.dumps(fn(a.model, a.data, a.mode, a, a.workdir)), flush=True)
        return 0
    if a.quick:
        a.rows, a.repeats, a.seq_length = 8, 1, 128

    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in SIDES for m in MODES}
    with tempfile.TemporaryDirectory(prefix="kubetune-peers-") as t:
        tmp = Path(t)
        model_dir, n_params = build_model(tmp / "model", "quick" if a.quick else "full")
        data = tmp / "rows.json"
        data.write_text(
            json.dumps(json.loads(ALPACA.read_text(encoding="utf-8"))[: a.rows]), encoding="utf-8"
        )
        for i in range(a.repeats):
            for mode in MODES:
                for side in SIDES:
                    r = run_one(side, mode, model_dir, data, a, tmp / f"w-{side}-{mode}-{i}")
                    runs[(side, mode)].append(r)
                    print(f"  run {i + 1} {mode:8s} {side:8s}: {r['tok_per_cpu_s']:7.1f} real tok/CPU-s, "
                          f"fill {r['real'] / r['padded']:.3f}, {r['real']} real tokens, {r['steps']} steps, "
                          f"{r['cpu_s']:.1f} CPU-s, loss {r['loss']:.4f}", file=sys.stderr, flush=True)  # fmt: skip
    best = {k: max(rs, key=lambda r: r["tok_per_cpu_s"]) for k, rs in runs.items()}
    print(
        f"\npeers: {n_params / 1e6:.1f}M-parameter Qwen2, LoRA r16 all-linear, {a.precision}, seq {a.seq_length}, "
        f"gradient checkpointing {'on' if a.gradient_checkpointing else 'off'} on both sides, "
        f"batch {a.batch_size}, one epoch of {a.rows} alpaca rows, 1 thread, best of {a.repeats}"
    )
    print(table(best))
    if a.json:
        a.json.write_text(json.dumps({" ".join(k): v for k, v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
