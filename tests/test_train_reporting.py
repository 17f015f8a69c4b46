"""metrics.jsonl and loss.png as a resumed run leaves them; progress fields other callbacks read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from kubetune_trainer.reporting import ReportingCallback, format_duration, plot_loss


def _state(step: int, max_steps: int = 20, tokens: int = 0) -> TrainerState:
    s = TrainerState()
    s.global_step, s.max_steps, s.num_input_tokens_seen, s.epoch = step, max_steps, tokens, step / 10
    return s


def test_resumed_run_drops_lines_logged_after_its_checkpoint_and_plots_one_curve(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 5.0 - i / 10}) + "\n" for i in range(1, 13)))
    cb = ReportingCallback(tmp_path, bar=False)
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to=[])
    cb.on_train_begin(args, _state(10, tokens=1000), TrainerControl())  # resumed from checkpoint-10
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 11))

    logs = {"loss": 3.5, "learning_rate": 1e-4}
    cb.on_log(args, _state(11, tokens=1500), TrainerControl(), logs=logs)
    assert logs["tokens_per_second"] > 0 and logs["eta_seconds"] >= 0  # for callbacks after this one
    cb.on_log(args, _state(11, tokens=1500), TrainerControl(), logs={"eval_loss": 3.9})
    cb.on_train_end(args, _state(11), TrainerControl())
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert lines[-2]["step"] == 11 and lines[-2]["loss"] == 3.5 and "tokens_per_second" in lines[-2]
    assert lines[-1]["step"] == 11 and lines[-1]["eval_loss"] == 3.9
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_no_losses_no_plot(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_runtime": 3.0}\n')
    assert plot_loss(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (None, 5, 75, 3725)] == ["?", "5s", "1m15s", "1h02m"]


def test_preference_runs_show_reward_margin_and_accuracy_on_the_progress_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), report_to=[])
    # what TRL's DPOTrainer logs with each loss
    logs = {"loss": 0.52, "rewards/chosen": 0.4, "rewards/rejected": -0.9, "rewards/margins": 1.3,
            "rewards/accuracies": 0.95, "learning_rate": 1e-4}  # fmt: skip
    plain = ReportingCallback(tmp_path / "plain", bar=False)
    plain.on_train_begin(args, _state(0), TrainerControl())
    plain.on_log(args, _state(5, tokens=100), TrainerControl(), logs=dict(logs))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss 0.5200" in line and "reward margin 1.300" in line and "accuracy 95%" in line

    bar = ReportingCallback(tmp_path / "bar", bar=True)
    bar.on_train_begin(args, _state(0), TrainerControl())
    bar.on_log(args, _state(5, tokens=100), TrainerControl(), logs=dict(logs))
    assert "reward margin 1.300" in bar.bar.postfix and "accuracy 95%" in bar.bar.postfix
    bar.on_train_end(args, _state(5), TrainerControl())
    capsys.readouterr()

    sft = ReportingCallback(tmp_path / "sft", bar=False)  # no rewards logged: nothing about them shown
    sft.on_train_begin(args, _state(0), TrainerControl())
    sft.on_log(args, _state(5, tokens=100), TrainerControl(), logs={"loss": 1.0})
    assert "reward" not in capsys.readouterr().err
