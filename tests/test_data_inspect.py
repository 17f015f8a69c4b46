"""`kubetune inspect-data job.yaml` shows rendered samples with the trained span marked, and counts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer.inspect_data import inspect_data
from tests.fixtures_data import EXAMPLE_DATA, make_job, write_rows


def test_inspect_sft_marks_replies_and_counts(tokenizer: Any, tmp_path: Path) -> None:
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Goodbye!"},
            ]
        },
        {"conversations": [{"from": "human", "value": "Only a question"}]},
    ]
    path = write_rows(tmp_path / "chat.jsonl", rows)
    job = make_job(
        {"uri": str(path), "system_prompt": "Be nice.", "on_bad_row": "skip", "apply_chat_template": True}
    )
    out = io.StringIO()
    stats = inspect_data(job, samples=3, tokenizer=tokenizer, file=out)
    text = out.getvalue()
    assert "[[Hello!<|im_end|>]]" in text and "[[Goodbye!<|im_end|>]]" in text
    assert "<|im_start|>system\nBe nice.<|im_end|>" in text
    assert "<|im_start|>assistant\n[[" in text  # the assistant header itself is not trained
    assert f"{path} row 1" in text
    assert "skipped: " in text and "row 2: field 'conversations': has no assistant reply" in text
    assert stats.samples == 1 and stats.skipped_bad_rows == 1
    for line in (
        "samples              1",
        "skipped bad rows     1",
        "no trainable         0",
        "truncated            0",
    ):
        assert line in text


def test_inspect_color_on_a_terminal(tokenizer: Any) -> None:
    job = make_job({"uri": str(EXAMPLE_DATA / "alpaca_en_200.json")}, training={"seq_length": 128})
    out = io.StringIO()
    inspect_data(job, samples=1, tokenizer=tokenizer, file=out, color=True)
    assert "\033[1;32m" in out.getvalue() and "[[" not in out.getvalue()


def test_inspect_dpo_and_streaming_pretrain(tokenizer: Any) -> None:
    out = io.StringIO()
    job = make_job({"uri": str(EXAMPLE_DATA / "dpo_en_100.json")}, method="dpo")
    inspect_data(job, samples=2, tokenizer=tokenizer, file=out)
    text = out.getvalue()
    assert "-- chosen:\n[[" in text and "<|im_end|>]]" in text and "samples              100" in text

    out = io.StringIO()
    job = make_job(
        {"uri": str(EXAMPLE_DATA / "c4_118.jsonl"), "streaming": True},
        method="pretrain",
        training={"max_steps": 5, "packing": True, "seq_length": 256},
    )
    stats = inspect_data(job, samples=1, tokenizer=tokenizer, file=out)
    assert stats.samples == 118 and stats.sequences and stats.streaming
    assert "[[" in out.getvalue() and "samples              118" in out.getvalue()


def test_cli_inspect_data_loads_the_models_tokenizer(
    tiny_model_dirs: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from kubetune.cli import main

    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "inspect"},
        "spec": {
            "model": {"uri": str(tiny_model_dirs["qwen2"])},
            "dataset": {"uri": str(EXAMPLE_DATA / "alpaca_en_200.json"), "system_prompt": "You are Kubi."},
            "training": {"seq_length": 256, "packing": True},
            "output": {"uri": str(tmp_path / "out")},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["inspect-data", str(path), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("== sample") == 2 and "You are Kubi." in out and "[[" in out
    assert "samples              200" in out and "packing efficiency" in out
