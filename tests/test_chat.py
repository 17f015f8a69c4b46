"""`kubetune chat`: a trained model answers from its output, local and in S3, merged or as an adapter.

One real LoRA run of the tiny model learns 4 alpaca rows by heart, with a job system_prompt. The
answer to a trained question is the trained reply only when the chat renders the prompt exactly as
training did (kubetune's ChatML, the system prompt the job added): the export records that
template, and the chat uses it. The interactive mode runs in a pseudo-terminal (pexpect).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pexpect
import pytest

from tests.fixtures_cli import KUBETUNE, cli_env, kubetune
from tests.fixtures_train import MEMO_ROWS

SYSTEM = "You answer in one short sentence."
QUESTION = MEMO_ROWS[0]["instruction"]  # What is the capital of France?
ANSWER = MEMO_ROWS[0]["output"]  # Paris is the capital of France.


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, train_job: Any) -> Path:
    """The output of a finished LoRA run (adapter, merged model, one committed checkpoint)."""
    from kubetune_trainer.train import run_training

    base = tmp_path_factory.mktemp("chat-run")
    job = train_job(
        base / "out", pet_config={"pet_type": "lora", "target_modules": "all-linear"},
        dataset={"system_prompt": SYSTEM}, training={"max_steps": 30},
    )  # fmt: skip
    job.spec.checkpoint.every_steps = 30
    run_training(job, workdir=base / "work")
    return base / "out"


def chat(target: str | Path, *extra: str, env: dict[str, str]) -> Any:
    """`kubetune chat TARGET --prompt QUESTION` as a user runs it."""
    return kubetune(
        "chat", str(target), "--prompt", QUESTION, "--max-new-tokens", "16", *extra, env=env, timeout=300
    )


def answer(target: str | Path, capsys: pytest.CaptureFixture[str], **options: Any) -> str:
    """What run_chat (the same code, in this process: no interpreter start-up) prints for QUESTION."""
    from kubetune_trainer.chat import run_chat

    capsys.readouterr()
    assert run_chat(str(target), prompt=QUESTION, max_new_tokens=16, **options) == 0
    return capsys.readouterr().out


def test_the_export_records_the_template_and_system_prompt_training_rendered_with(run: Path) -> None:
    from transformers import AutoTokenizer

    from kubetune_trainer.chat_render import ChatRenderer
    from kubetune_trainer.formats import Example, Turn

    history = (Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", QUESTION))
    trained = ChatRenderer(AutoTokenizer.from_pretrained(run / "final" / "merged"), system_prompt=SYSTEM)
    want = trained.preference_row(Example(kind="preference", turns=history, chosen="", rejected=""))["prompt"]
    msgs = [{"role": t.role, "content": t.content} for t in history]
    for sub in ("merged", "adapter"):
        tok = AutoTokenizer.from_pretrained(run / "final" / sub)
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
        assert want.startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        # a conversation that brings its own system turn keeps it
        own = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *msgs], tokenize=False)
        assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and SYSTEM not in own


def test_prompt_answers_from_the_output_the_merged_model_and_the_adapter(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (run, run / "final" / "adapter"):
        done = chat(target, env=cli_env(tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == ANSWER + "\n", (target, done.stdout)  # and nothing else on stdout
        assert "Traceback" not in done.stderr
    assert answer(run / "final" / "merged", capsys) == ANSWER + "\n"


def test_an_adapter_takes_base_from_the_flag_when_its_recorded_base_is_gone(
    run: Path, tmp_path: Path, tiny_model_dirs: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune_trainer.chat import run_chat
    from kubetune_trainer.errors import JobError

    adapter = tmp_path / "adapter"
    shutil.copytree(run / "final" / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(JobError, match=r"its base model is not here \(.*moved-away\); pass --base MODEL"):
        run_chat(str(adapter), prompt=QUESTION)
    assert answer(adapter, capsys, base=str(tiny_model_dirs["qwen2"])) == ANSWER + "\n"


def test_prompt_answers_from_an_output_in_s3(
    run: Path, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.store("jobs/chat").upload_dir(run, "")
    where = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    done = chat(s3.uri("jobs/chat"), env=cli_env(tmp_path, **s3.env, **where))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ANSWER + "\n"
    for k, v in {**where, "KUBETUNE_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    assert answer(s3.uri("jobs/chat/final/adapter"), capsys) == ANSWER + "\n"
    from kubetune_trainer.chat import run_chat
    from kubetune_trainer.errors import JobError

    with pytest.raises(JobError, match="no such directory"):
        run_chat(s3.uri("jobs/nothing-here"), prompt=QUESTION)


def test_a_system_prompt_flag_replaces_the_jobs(run: Path) -> None:
    from kubetune_trainer.chat import ChatSession, open_chat

    model, tok, _ = open_chat(str(run))
    for system, shown, hidden in ((None, SYSTEM, "German"), ("Reply in German.", "Reply in German.", SYSTEM)):
        session = ChatSession(model, tok, system=system)
        session.history.append({"role": "user", "content": QUESTION})
        prompt = tok.apply_chat_template(session.messages(), tokenize=False, add_generation_prompt=True)
        assert f"<|im_start|>system\n{shown}" in prompt and hidden not in prompt


def test_interactive_chat_streams_keeps_history_resets_and_exits(run: Path, tmp_path: Path) -> None:
    child = pexpect.spawn(
        KUBETUNE, ["chat", str(run), "--temperature", "0", "--max-new-tokens", "16"],
        env=cli_env(tmp_path), encoding="utf-8", timeout=240,
    )  # fmt: skip
    try:
        child.expect_exact("you> ")
        child.sendline(QUESTION)
        child.expect_exact("assistant> ")
        child.expect_exact(ANSWER)  # streamed into the terminal as generated
        child.expect_exact("you> ")
        child.sendline("/reset")
        child.expect_exact("(conversation reset)")
        child.expect_exact("you> ")
        child.sendline(MEMO_ROWS[2]["instruction"])  # a fresh conversation: the trained prompt again
        child.expect_exact(MEMO_ROWS[2]["output"])
        child.expect_exact("you> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_the_session_keeps_the_history_between_turns(run: Path) -> None:
    from kubetune_trainer.chat import ChatSession, open_chat

    model, tok, _ = open_chat(str(run))
    session = ChatSession(model, tok)
    first = session.ask(QUESTION, max_new_tokens=16, temperature=0)
    session.ask("And of Germany?", max_new_tokens=8, temperature=0)
    assert first == ANSWER
    assert [m["role"] for m in session.messages()] == ["user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages() == [] and session.ask(QUESTION, max_new_tokens=16, temperature=0) == ANSWER
