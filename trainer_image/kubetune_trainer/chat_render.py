"""Render normalised examples to token ids and labels.

Loss masking: every token gets label -100 (no loss) except the tokens of every assistant reply
*and the end-of-turn token that closes it*. Training the end token is what teaches the model to
stop; without it a fine-tuned model "never stops generating". Prompt tokens (system, user, tool,
the ``<|im_start|>assistant\\n`` header) are never trained.

Two renderings:

``apply_chat_template: true``
    The tokenizer's own ``chat_template``. The reply spans are found by rendering the conversation
    up to each assistant turn with ``add_generation_prompt=True`` and up to the end of that turn: the
    difference is the reply plus the template's end-of-turn marker (trailing whitespace after the
    marker is left untrained). The template must render earlier turns the same way whatever follows
    them (true of ChatML/Qwen2.5, Llama 3, Mistral, Gemma templates); one that rewrites earlier
    turns is refused with a clear message. If a template closes assistant turns with no special
    token at all, the tokenizer's EOS token is added after each reply, so the model still learns to
    stop.
``apply_chat_template: false`` (default)
    kubetune's documented ChatML, as in seed 003 and Qwen::

        <|im_start|>system\\n{system}<|im_end|>\\n
        <|im_start|>user\\n{user}<|im_end|>\\n
        <|im_start|>assistant\\n{reply}<|im_end|>\\n

    ``{reply}<|im_end|>`` is trained. A tokenizer without an ``<|im_end|>`` token uses its EOS token as
    the end-of-turn marker instead (the markup otherwise unchanged), so generation stops on EOS. The
    tokenizer's BOS token, if it adds one, starts the sequence.

Each segment is tokenized on its own (``add_special_tokens=False``) and the pieces concatenated, so
the reply's tokens are exactly what the model must produce after the prompt, as at inference.
Samples longer than ``seq_length`` are cut at the end (the start is kept) and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.data_sources import DataError
from kubetune_trainer.formats import ASSISTANT, Example, Turn

IGNORE_INDEX = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def _special_strings(tok: Any) -> set[str]:
    names = set(getattr(tok, "all_special_tokens", []) or [])
    decoder = getattr(tok, "added_tokens_decoder", None) or {}
    for added in decoder.values():
        if getattr(added, "special", False):
            names.add(str(added))
    return {n for n in names if n}


def _probe_prefix(tok: Any) -> list[int]:
    """Token ids the tokenizer puts in front of text by itself (BOS), if any."""
    with_sp = list(tok("a b", add_special_tokens=True)["input_ids"])
    without = list(tok("a b", add_special_tokens=False)["input_ids"])
    n = len(without)
    for start in range(len(with_sp) - n + 1):
        if with_sp[start : start + n] == without:
            return with_sp[:start]
    return []


class ChatRenderer:
    """Turns :class:`Example` objects into :class:`Encoded` samples (or DPO text rows)."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        apply_chat_template: bool = False,
        system_prompt: str | None = None,
        seq_length: int | None = None,
    ) -> None:
        self.tok = tokenizer
        self.use_template = apply_chat_template
        self.system_prompt = system_prompt or None
        self.seq_length = seq_length
        self.special = _special_strings(tokenizer)
        self.bos_prefix = _probe_prefix(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)
        self.eos_token: str | None = eos if isinstance(eos, str) and eos else None
        self.eos_token_id: int | None = getattr(tokenizer, "eos_token_id", None)
        if apply_chat_template:
            if not getattr(tokenizer, "chat_template", None):
                raise DataError(
                    "dataset.apply_chat_template is true but the tokenizer has no chat_template; "
                    "set it to false to use kubetune's ChatML default"
                )
            self.turn_end = ""
        else:
            if self._single_token(IM_END):
                self.turn_end = IM_END
            elif self.eos_token is not None:
                self.turn_end = self.eos_token
            else:
                raise DataError(
                    "the tokenizer has neither an <|im_end|> token nor an EOS token, so the model could not "
                    "learn where a reply ends; use a tokenizer with an EOS token"
                )

    # ------------------------------------------------------------ helpers

    def _single_token(self, text: str) -> bool:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return len(ids) == 1

    def end_of_turn_token_ids(self) -> list[int]:
        """Token ids that can close an assistant reply as rendered here (for generation_config.eos_token_id)."""
        ids: list[int] = []
        cands = [self.turn_end] if self.turn_end else [IM_END, "<|eot_id|>", "<end_of_turn>", "<|end|>"]
        for text in [*cands, self.eos_token]:
            if not text or not self._single_token(text):
                continue
            tid = self.tok(text, add_special_tokens=False)["input_ids"][0]
            if tid not in ids:
                ids.append(tid)
        return ids

    def _ends_with_special(self, text: str) -> bool:
        return any(text.endswith(s) for s in self.special)

    def _system(self, ex: Example) -> str | None:
        return ex.system if ex.system is not None else self.system_prompt

    def _messages(self, system: str | None, turns: Sequence[Turn]) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": t.role, "content": t.content} for t in turns]

    def _render(self, msgs: list[dict[str, str]], gen: bool) -> str:
        try:
            out = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja raises template-defined errors
            raise DataError(f"the tokenizer's chat template failed on a conversation: {e}") from None
        return out if isinstance(out, str) else str(out)

    # ------------------------------------------------------------ segments

    def segments(self, ex: Example) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) pieces."""
        if ex.kind == "text":
            return [(ex.text or "", True)]
        if ex.kind != "chat":
            raise ValueError(f"cannot render a {ex.kind} example as a chat sample")
        system = self._system(ex)
        if self.use_template:
            return self._template_segments(system, ex.turns)
        return self._chatml_segments(system, ex.turns)

    def _chatml_turn(self, role: str, content: str) -> str:
        return f"{IM_START}{role}\n{content}{self.turn_end}\n"

    def _chatml_segments(self, system: str | None, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        segs: list[tuple[str, bool]] = []
        buf = self._chatml_turn("system", system) if system else ""
        for t in turns:
            if t.role == ASSISTANT:
                segs.append((buf + f"{IM_START}assistant\n", False))
                segs.append((t.content + self.turn_end, True))
                buf = "\n"
            else:
                buf += self._chatml_turn(t.role, t.content)
        segs.append((buf, False))
        return segs

    def _reply_span(self, prefix: str, upto: str) -> tuple[str, str]:
        """(trained text, text it stands for in the rendering) of one assistant turn."""
        reply = upto[len(prefix) :]
        trained = reply.rstrip()
        if self._ends_with_special(trained):
            return trained, trained
        if self.eos_token is None:
            raise DataError(
                "the chat template ends assistant replies with no special token and the tokenizer has no EOS "
                "token: the model could not learn to stop"
            )
        return trained + self.eos_token, trained

    def _template_segments(self, system: str | None, turns: Sequence[Turn]) -> list[tuple[str, bool]]:
        msgs = self._messages(system, turns)
        off = len(msgs) - len(turns)
        full = self._render(msgs, False)
        segs: list[tuple[str, bool]] = []
        cursor = 0
        for i, t in enumerate(turns):
            if t.role != ASSISTANT:
                continue
            prefix = self._render(msgs[: off + i], True)
            upto = self._render(msgs[: off + i + 1], False)
            if not (upto.startswith(prefix) and full.startswith(upto) and len(prefix) >= cursor):
                raise DataError(
                    "the tokenizer's chat template renders a conversation differently depending on what follows "
                    "(it rewrites earlier turns), so the trained replies cannot be located; set "
                    "dataset.apply_chat_template to false to use kubetune's ChatML rendering"
                )
            trained, covers = self._reply_span(prefix, upto)
            segs.append((prefix[cursor:], False))
            segs.append((trained, True))
            cursor = len(prefix) + len(covers)
        segs.append((full[cursor:], False))
        return segs

    # ------------------------------------------------------------ encoding

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def encode_batch(self, examples: Sequence[Example], *, truncate: bool = True) -> list[Encoded]:
        """Tokenize many chat or text examples in one tokenizer call."""
        all_segs = [self.segments(ex) for ex in examples]
        flat = [text for segs in all_segs for text, _ in segs]
        ids = iter(self._tokenize(flat))
        out: list[Encoded] = []
        for ex, segs in zip(examples, all_segs, strict=True):
            input_ids: list[int] = list(self.bos_prefix) if not self.use_template or ex.kind == "text" else []
            labels: list[int] = [IGNORE_INDEX] * len(input_ids)
            for _, trained in segs:
                piece = next(ids)
                input_ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            if ex.kind == "text" and self.eos_token_id is not None:
                input_ids.append(self.eos_token_id)
                labels.append(self.eos_token_id)
            if labels:
                labels[0] = IGNORE_INDEX  # nothing predicts the first token
            enc = Encoded(input_ids, labels)
            if truncate and self.seq_length is not None and len(input_ids) > self.seq_length:
                enc = Encoded(input_ids[: self.seq_length], labels[: self.seq_length], True)
            out.append(enc)
        return out

    def encode(self, ex: Example, *, truncate: bool = True) -> Encoded:
        return self.encode_batch([ex], truncate=truncate)[0]

    # ------------------------------------------------------------ preference (DPO)

    def preference_row(self, ex: Example) -> dict[str, str]:
        """{prompt, chosen, rejected} text for TRL's DPOTrainer: prompt ends with the assistant header,
        chosen/rejected are the replies with their end-of-turn token. TRL tokenizes the prompt with the
        tokenizer's own special tokens (BOS), so the rendered BOS is not repeated here."""
        if ex.kind != "preference":
            raise ValueError("preference_row needs a preference example")
        system = self._system(ex)
        if self.use_template:
            msgs = self._messages(system, ex.turns)
            prompt = self._render(msgs, True)
            out = {"prompt": prompt}
            for key, reply in (("chosen", ex.chosen or ""), ("rejected", ex.rejected or "")):
                upto = self._render([*msgs, {"role": "assistant", "content": reply}], False)
                if not upto.startswith(prompt):
                    raise DataError(
                        "the tokenizer's chat template renders the prompt differently once a reply follows; "
                        "set dataset.apply_chat_template to false to use kubetune's ChatML rendering"
                    )
                out[key] = self._reply_span(prompt, upto)[0]
            if self.bos_prefix:
                bos = self.tok.decode(self.bos_prefix)
                if bos and out["prompt"].startswith(bos):
                    out["prompt"] = out["prompt"][len(bos) :]
            return out
        segs = self._chatml_segments(system, ex.turns)
        prompt = "".join(text for text, _ in segs) + f"{IM_START}assistant\n"
        return {
            "prompt": prompt,
            "chosen": (ex.chosen or "") + self.turn_end,
            "rejected": (ex.rejected or "") + self.turn_end,
        }


def training_chat_template(tokenizer: Any, *, apply_chat_template: bool, system_prompt: str | None) -> str:
    """A Jinja chat template that renders a conversation as training did, for the exported tokenizer:
    then ``tokenizer.apply_chat_template`` (transformers pipelines, vLLM, ``kubetune chat``) prompts
    the trained model the way it learned. ``apply_chat_template: false``: kubetune's ChatML above
    (its end-of-turn token, the tokenizer's BOS); true: the tokenizer's own template. A job's
    `system_prompt` becomes the system turn of a conversation that brings none, as in training."""
    import json

    if apply_chat_template:
        body = tokenizer.chat_template
        if not body:
            raise DataError("the tokenizer has no chat_template to record")
    else:
        r = ChatRenderer(tokenizer)
        bos = tokenizer.decode(r.bos_prefix) if r.bos_prefix else ""
        end = json.dumps(r.turn_end, ensure_ascii=False)
        body = (
            (f"{{{{- {json.dumps(bos, ensure_ascii=False)} }}}}" if bos else "")
            + "{%- for message in messages %}"
            f"{{{{- '{IM_START}' + message['role'] + '\n' + message['content'] + {end} + '\n' }}}}"
            "{%- endfor %}"
            f"{{%- if add_generation_prompt %}}{{{{- '{IM_START}assistant\n' }}}}{{%- endif %}}"
        )
    if not system_prompt:
        return body
    # Jinja string literal: json.dumps quoting, non-ASCII left as is (Jinja decodes its escapes)
    default = json.dumps(system_prompt, ensure_ascii=False)
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {default}}}] + messages %}}"
        "{%- endif %}" + body
    )


__all__ = ["ChatRenderer", "Encoded", "IGNORE_INDEX", "IM_END", "IM_START", "training_chat_template"]
