"""`kubetune chat OUTPUT`: talk to a trained model without writing a transformers script.

OUTPUT is whatever :func:`kubetune_trainer.convert.locate` finds: a job's output (local or s3://;
its ``final/merged``, else ``final/adapter``, else its newest committed checkpoint), one of those
directories itself, or a checkpoint. An adapter is merged onto its base (the one it records, or
``--base``). The conversation is rendered with the chat template the job trained with: the one
saved with the export's tokenizer (kubetune's ChatML or the model's own, with the job's
system_prompt as the default system turn), or rebuilt from what a checkpoint records; ``--system``
replaces the system prompt. Generation stops at the end-of-turn tokens training taught.

- ``--prompt TEXT``: one answer on stdout (nothing else there), greedy unless ``--temperature``.
- otherwise an interactive chat: the history is kept, tokens stream as they are generated
  (transformers' ``TextStreamer``), ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) ends.
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any

from kubetune_trainer.errors import JobError

if TYPE_CHECKING:
    from kubetune.spec import S3Storage

INTERACTIVE_TEMPERATURE = 0.7
HELP = "/reset forgets the conversation, /exit ends (or Ctrl-D)"


class ChatSession:
    """A loaded model, its tokenizer and one conversation."""

    def __init__(self, model: Any, tokenizer: Any, *, system: str | None = None) -> None:
        from kubetune_trainer.chat_render import ChatRenderer

        self.model, self.tok = model.eval(), tokenizer
        self.system = system
        self.history: list[dict[str, str]] = []
        # the tokens that close a reply as trained; the exported generation_config names them too,
        # a checkpoint's base model may not
        self.stop_ids = ChatRenderer(tokenizer).end_of_turn_token_ids()

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history = []

    def ask(
        self, text: str, *, max_new_tokens: int, temperature: float, stream: IO[str] | None = None
    ) -> str:
        """Add `text` as the user's turn, generate the reply (streamed to `stream` as it comes) and
        keep both in the history; returns the reply."""
        import torch

        self.history.append({"role": "user", "content": text})
        inputs = self.tok.apply_chat_template(
            self.messages(), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self.stop_ids or None,
            "pad_token_id": self.tok.pad_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:  # greedy; sampling settings a generation_config carries do not apply
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stream is not None:
            kwargs["streamer"] = _Streamer(self.tok, stream)
        with torch.no_grad():
            out = self.model.generate(**inputs, **kwargs)
        reply = self.tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply


def _streamer_class() -> type:
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """transformers' TextStreamer, writing to a given stream (it prints to stdout)."""

        def __init__(self, tokenizer: Any, stream: IO[str]) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stream = stream

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.stream.write(text + ("\n" if stream_end else ""))
            self.stream.flush()

    return Streamer


def _Streamer(tokenizer: Any, stream: IO[str]) -> Any:  # noqa: N802 - reads as the class it builds
    return _streamer_class()(tokenizer, stream)


def open_chat(target: str, *, base: str | None = None, s3: S3Storage | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, a description of what was loaded) for OUTPUT `target`."""
    from kubetune_trainer.chat_render import training_chat_template
    from kubetune_trainer.convert import head_of, load_model, load_tokenizer_for, locate, resolve_dtype
    from kubetune_trainer.recipes.base import CAUSAL_LM

    source = locate(target, s3=s3, prefer="merged")
    if head_of(source) != CAUSAL_LM:
        raise JobError(
            f"{target}: a reward model (a sequence classifier) scores replies and does not write them; "
            "chat with a generative job's output"
        )
    model, base_dir = load_model(source, base=base, s3=s3, dtype=resolve_dtype("auto", source, None))
    tok = load_tokenizer_for(source, base_dir)
    if not getattr(tok, "chat_template", None):  # what training rendered with when the job did not say
        tok.chat_template = training_chat_template(tok, apply_chat_template=False, system_prompt=None)
    what = f"{source.kind} {source.uri}" + (f" on {base_dir}" if base_dir else "")
    return model, tok, what


def run_chat(
    target: str,
    *,
    prompt: str | None = None,
    system: str | None = None,
    base: str | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """`kubetune chat`; returns the exit status."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if max_new_tokens < 1:
        raise JobError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise JobError(f"--temperature: must be >= 0 (0: greedy), got {temperature}")
    model, tok, what = open_chat(target, base=base)
    session = ChatSession(model, tok, system=system)
    if prompt is not None:
        session.ask(prompt, max_new_tokens=max_new_tokens, temperature=temperature or 0.0, stream=stdout)
        return 0
    temp = INTERACTIVE_TEMPERATURE if temperature is None else temperature
    print(f"kubetune chat: {what}; {HELP}", file=stderr, flush=True)
    if stdin.isatty():
        import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            line = input("you> ") if stdin is sys.stdin else _prompt(stdin, stdout)
        except (EOFError, KeyboardInterrupt):
            stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {HELP}", file=stdout, flush=True)
            continue
        stdout.write("assistant> ")
        stdout.flush()
        session.ask(text, max_new_tokens=max_new_tokens, temperature=temp, stream=stdout)


def _prompt(stdin: IO[str], stdout: IO[str]) -> str:
    stdout.write("you> ")
    stdout.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


__all__ = ["ChatSession", "open_chat", "run_chat"]
