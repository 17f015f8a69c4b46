"""What a run shows and leaves behind: a live progress line, metrics.jsonl and a loss-curve PNG.

:class:`ReportingCallback` is a transformers `TrainerCallback`. On every log event (all ranks) it
adds two numbers to the Trainer's `logs` dict, so callbacks added after it (progress.json, ...)
see them too:

- ``tokens_per_second``: input tokens (non-padding, all ranks together) per second since the last log;
- ``eta_seconds``: remaining steps times this session's mean seconds per step.

On rank 0 only it shows a tqdm bar with loss (for preference methods also the reward margin and
preference accuracy TRL logs), tokens/s and ETA when stderr is a terminal (one
plain line per log otherwise, e.g. in pods), appends one JSON object per log event to
``<output>/metrics.jsonl`` (``{"step", "epoch", "time", "loss", ...}``; a resumed run first drops
lines past its starting step, so the file is one consistent curve) and at the end draws
``<output>/loss.png`` (train loss, and eval loss where there is any) with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.conventions import LOSS_PLOT, METRICS_FILE

log = logging.getLogger("kubetune.report")

_SKIP = {"total_flos"}


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class ReportingCallback(TrainerCallback):
    """Progress display, metrics.jsonl and loss.png for one run (see the module docstring)."""

    def __init__(self, output_dir: Path, *, title: str = "", bar: bool | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.title = title
        self.use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar: Any = None
        self._t0 = self._t_last = 0.0
        self._step0 = 0
        self._tokens_last = 0

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def plot_path(self) -> Path:
        return self.output_dir / LOSS_PLOT

    # -- Trainer events

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t0 = self._t_last = time.monotonic()
        self._step0 = state.global_step
        self._tokens_last = state.num_input_tokens_seen
        if not state.is_world_process_zero:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(state.global_step)
        if self.use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.title or "train",
                unit="step", dynamic_ncols=True, file=sys.stderr,
            )  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        now = time.monotonic()
        if "loss" in logs:  # a training log (not eval, not the end-of-run summary)
            tokens = state.num_input_tokens_seen
            dt = now - self._t_last
            if dt > 0 and tokens > self._tokens_last:
                logs["tokens_per_second"] = round((tokens - self._tokens_last) / dt, 1)
            self._t_last, self._tokens_last = now, tokens
            done = state.global_step - self._step0
            if done > 0:
                logs["eta_seconds"] = round(
                    (now - self._t0) / done * (state.max_steps - state.global_step), 1
                )
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": _num(state.epoch), "time": round(time.time(), 3)}
        record.update({k: _num(v) for k, v in logs.items() if k not in _SKIP and k not in record})
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._show(state, logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if state.is_world_process_zero:
            try:
                plot_loss(self.metrics_path, self.plot_path, title=self.title)
            except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
                log.warning("could not draw %s: %s", self.plot_path, e)

    # -- helpers

    def _show(self, state: Any, logs: dict) -> None:
        if "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}", *_preference_parts(logs)]
            if "tokens_per_second" in logs:
                parts.append(f"{logs['tokens_per_second']:,.0f} tok/s")
            if self.bar is not None:
                self.bar.set_postfix_str(", ".join(parts), refresh=True)
                return
            pct = 100 * state.global_step / max(state.max_steps, 1)
            parts.insert(0, f"step {state.global_step}/{state.max_steps} ({pct:.0f}%)")
            if "learning_rate" in logs:
                parts.append(f"lr {_num(logs['learning_rate']):.3g}")
            parts.append(f"eta {format_duration(logs.get('eta_seconds'))}")
            print("  ".join(parts), file=sys.stderr, flush=True)
        elif "eval_loss" in logs:
            line = f"step {state.global_step}: eval_loss {_num(logs['eval_loss']):.4f}"
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def _truncate_metrics(self, step: int) -> None:
        """A resumed run starts at `step`: drop lines an earlier attempt logged after it."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        keep = [line for line in lines if line.strip() and _step_of(line) <= step]
        if len(keep) != len(lines):
            self.metrics_path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _preference_parts(logs: dict) -> list[str]:
    """Preference methods (dpo, ...): TRL logs `rewards/margins` and `rewards/accuracies` with each
    loss; a loss alone says little there (it starts at log 2 whatever the data), the margin and the
    share of pairs ranked right say whether the model learns the preference."""
    parts = []
    margin, accuracy = logs.get("rewards/margins"), logs.get("rewards/accuracies")
    if isinstance(_num(margin), (int, float)):
        parts.append(f"reward margin {_num(margin):.3f}")
    if isinstance(_num(accuracy), (int, float)):
        parts.append(f"accuracy {_num(accuracy):.0%}")
    return parts


def _num(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    if hasattr(v, "item"):
        return v.item()
    return v


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except (ValueError, AttributeError):
        return math.inf


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (unparsable lines skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def plot_loss(metrics: Path, out: Path, *, title: str = "") -> Path | None:
    """Draw train (and eval) loss against step from metrics.jsonl into `out`; None without data."""
    records = read_metrics(metrics) if Path(metrics).exists() else []
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1.2)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
