"""Every row format normalises to the same small Example; bad rows name file, row and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.data_sources import BadRowError, BadRows, DataError, Row, iter_rows
from kubetune_trainer.formats import ASSISTANT, SYSTEM, TOOL, USER, Columns, Example, Normalizer, Turn
from tests.fixtures_data import EXAMPLE_DATA, make_job, write_rows


def norm(
    data: dict[str, Any], fmt: str = "auto", method: str = "sft", cols: Columns | None = None
) -> Example:
    ex = Normalizer(fmt, cols or Columns(), method, BadRows("error"))(Row(data, "data.jsonl", 17))
    assert ex is not None
    return ex


def bad(data: dict[str, Any], fmt: str = "auto", method: str = "sft", cols: Columns | None = None) -> str:
    with pytest.raises(BadRowError) as err:
        norm(data, fmt, method, cols)
    return str(err.value)


def test_alpaca_with_input_system_history() -> None:
    ex = norm(
        {
            "instruction": "Translate",
            "input": "bonjour",
            "output": "hello",
            "system": "You translate.",
            "history": [["Hi", "Hello! How can I help?"]],
        }
    )
    assert ex.kind == "chat" and ex.system == "You translate."
    assert ex.turns == (
        Turn(USER, "Hi"),
        Turn(ASSISTANT, "Hello! How can I help?"),
        Turn(USER, "Translate\nbonjour"),
        Turn(ASSISTANT, "hello"),
    )
    assert norm({"instruction": "Do it", "input": "", "output": "Done"}).turns[0] == Turn(USER, "Do it")
    assert (
        norm({"instruction": "Do it", "input": None, "output": "Done"}, "alpaca").turns[0].content == "Do it"
    )


def test_sharegpt_roles_and_system_turn() -> None:
    ex = norm(
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": '{"name": "weather"}'},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny."},
                {"from": "human", "value": "thanks"},
            ]
        }
    )
    assert ex.system == "Be terse."
    # the trailing user turn has no reply to train and is dropped
    assert [t.role for t in ex.turns] == [USER, ASSISTANT, TOOL, ASSISTANT]
    # a separate system column wins over nothing, a system turn is used when the column is absent
    ex2 = norm(
        {"system": "S", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    )
    assert ex2.system == "S"


def test_messages_with_text_parts() -> None:
    ex = norm(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": "Hi."},
            ]
        }
    )
    assert ex.system == "sys" and ex.turns == (Turn(USER, "Hello there"), Turn(ASSISTANT, "Hi."))


def test_text_and_empty_text() -> None:
    assert norm({"text": "some prose"}, method="pretrain") == Example(
        "text", text="some prose", origin="data.jsonl row 17"
    )
    n = Normalizer("text", Columns(), "pretrain", BadRows("error"))
    assert n(Row({"text": "  "}, "f", 1)) is None and n.empty == 1


def test_column_mapping_from_spec() -> None:
    job = make_job(
        {
            "uri": "x.json",
            "format": "alpaca",
            "columns": {"instruction": "q", "output": "a", "system": "persona"},
        }
    )
    cols = Columns.from_spec(job.spec.dataset.columns)
    assert cols.mapped == {"instruction", "output", "system"}
    ex = norm({"q": "Question?", "a": "Answer.", "persona": "P"}, "alpaca", cols=cols)
    assert ex.turns == (Turn(USER, "Question?"), Turn(ASSISTANT, "Answer.")) and ex.system == "P"
    tcols = Columns(text="content")
    assert norm({"content": "doc"}, "text", "pretrain", tcols).text == "doc"


def test_auto_detection() -> None:
    assert norm({"instruction": "i", "output": "o"}).turns[-1].content == "o"
    assert (
        norm({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}).kind
        == "chat"
    )
    assert (
        norm({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).kind
        == "chat"
    )
    with pytest.raises(DataError, match="plain text trains with method pretrain"):
        norm({"text": "prose"})
    with pytest.raises(DataError, match="preference data trains with method dpo"):
        norm({"prompt": "p", "chosen": "c", "rejected": "r"})
    with pytest.raises(DataError, match="cannot tell the format"):
        norm({"foo": 1})


def test_preference_variants() -> None:
    simple = norm({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, method="dpo")
    assert simple.kind == "preference" and simple.turns == (Turn(USER, "2+2?"),)
    assert (simple.chosen, simple.rejected) == ("4", "5")

    sharegpt = norm(
        {
            "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}],
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        method="dpo",
    )
    assert sharegpt.system == "S" and sharegpt.turns == (Turn(USER, "q"),)
    assert (sharegpt.chosen, sharegpt.rejected) == ("good", "bad")

    messages = norm(
        {
            "messages": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        method="dpo",
    )
    assert (messages.chosen, messages.rejected) == ("good", "bad")

    implicit = norm(
        {
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
        },
        method="dpo",
    )
    assert implicit.turns == (Turn(USER, "q"),) and implicit.chosen == "good"

    alpaca = norm({"instruction": "i", "input": "x", "chosen": "c", "rejected": "r"}, method="dpo")
    assert alpaca.turns == (Turn(USER, "i\nx"),)


def test_dpo_demo_slice_loads() -> None:
    n = Normalizer("preference", Columns(), "dpo", BadRows("error"))
    exs = [n(r) for r in iter_rows(str(EXAMPLE_DATA / "dpo_en_100.json"))]
    assert len(exs) == 100 and all(e is not None and e.kind == "preference" for e in exs)
    assert any(e.system for e in exs) and any(len(e.turns) > 1 for e in exs)
    assert all(e.turns[-1].role == USER for e in exs)


def test_bad_row_messages_name_file_row_field() -> None:
    assert bad({"instruction": "i", "input": "", "output": None}) == (
        "data.jsonl row 17: field 'output': expected a string, got null"
    )
    assert bad({"instruction": "i", "output": ""}, "alpaca") == (
        "data.jsonl row 17: field 'output': expected a non-empty string, got an empty string"
    )
    assert "field 'instruction': missing (the row has: input, output)" in bad(
        {"input": "", "output": "o"}, "alpaca"
    )
    assert "field 'history[0]': expected an [instruction, response] pair" in bad(
        {"instruction": "i", "output": "o", "history": [["only one"]]}
    )
    conv = {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}
    assert "field 'conversations[1].from': unknown role 'robot'" in bad(conv)
    assert "field 'conversations': has no assistant reply" in bad(
        {"conversations": [{"from": "human", "value": "a"}]}
    )
    assert "field 'conversations[1].value': expected a string, got a number" in bad(
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}]}
    )
    assert "field 'messages': expected a list of turns, got a string" in bad({"messages": "hi"}, "messages")
    assert "field 'text': expected a string, got a number" in bad({"text": 5}, "text", "pretrain")
    assert "field 'rejected': missing" in bad({"prompt": "p", "chosen": "c"}, method="dpo")
    assert "the prompt ends with an assistant turn" in bad(
        {
            "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
            "chosen": {"from": "gpt", "value": "c"},
            "rejected": {"from": "gpt", "value": "d"},
        },
        method="dpo",
    )


def test_bad_rows_in_a_file_error_or_skip(tmp_path: Path) -> None:
    from kubetune_trainer.datasets_build import build_datasets
    from kubetune_trainer.tiny import build_tokenizer

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(20)]
    rows[16]["output"] = None
    rows[4] = {"instruction": "q", "output": ["not", "a", "string"]}
    path = write_rows(tmp_path / "data.jsonl", rows)
    tok = build_tokenizer()
    with pytest.raises(
        BadRowError, match=r"data\.jsonl row 5: field 'output': expected a string, got a list"
    ):
        build_datasets(make_job({"uri": str(path)}), tok, seed=0)
    built = build_datasets(make_job({"uri": str(path), "on_bad_row": "skip"}), tok, seed=0)
    assert built.stats.skipped_bad_rows == 2 and built.stats.samples == 18 and built.stats.rows == 20
    assert "row 17: field 'output': expected a string, got null" in built.stats.bad_row_examples[1]


def test_csv_history_as_json_text(tmp_path: Path) -> None:
    path = write_rows(
        tmp_path / "d.csv", [{"instruction": "i", "input": "", "output": "o", "history": '[["h", "r"]]'}]
    )
    n = Normalizer("alpaca", Columns(), "sft", BadRows("error"))
    ex = n(next(iter_rows(str(path))))
    assert ex is not None and ex.turns[:2] == (Turn(USER, "h"), Turn(ASSISTANT, "r"))


def test_role_constants() -> None:
    assert {SYSTEM, USER, ASSISTANT, TOOL} == {"system", "user", "assistant", "tool"}


def test_check_dataset_for_validate(tmp_path: Path) -> None:
    """What `kubetune validate` can report about local data, without a tokenizer."""
    import subprocess
    import sys

    from kubetune_trainer.formats import check_dataset

    pref = write_rows(
        tmp_path / "pref.json",
        [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p2", "chosen": "c2"}],
    )
    assert check_dataset(make_job({"uri": str(pref)}, method="dpo").spec) == [
        f"{pref} row 2: field 'rejected': missing (the row has: chosen, prompt)"
    ]
    alpaca = str(EXAMPLE_DATA / "alpaca_en_200.json")
    assert check_dataset(make_job({"uri": alpaca}).spec) == []
    dpo_on_sft = check_dataset(make_job({"uri": alpaca}, method="dpo").spec, limit=2)
    assert dpo_on_sft[0].endswith("row 1: field 'chosen': missing (the row has: input, instruction, output)")
    pretrain_on_chat = check_dataset(make_job({"uri": alpaca}, method="pretrain").spec, limit=1)
    assert pretrain_on_chat[0].endswith(
        "row 1: field 'text': missing (the row has: input, instruction, output)"
    )
    assert check_dataset(make_job({"uri": "s3://bucket/data.json"}).spec) == []
    assert "no such file" in check_dataset(make_job({"uri": str(tmp_path / "nope.json")}).spec)[0]
    # usable by the operator-free CLI: no torch import
    code = "import sys, kubetune_trainer.formats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
