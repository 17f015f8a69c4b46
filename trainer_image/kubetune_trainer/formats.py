"""Normalise raw rows of every supported format to one small :class:`Example`.

Formats (``spec.dataset.format``; column names can be remapped with ``spec.dataset.columns``):

``alpaca``
    ``instruction`` (required), ``input`` (optional, appended to the instruction after a newline),
    ``output`` (required), optional ``system`` and ``history`` (a list of ``[instruction, response]``
    pairs that come before this one).
``sharegpt``
    ``conversations``: a list of ``{"from": ..., "value": ...}`` turns. ``from`` is ``human``/``user``,
    ``gpt``/``assistant``/``model``, ``system``, ``observation``/``tool``/``function_response`` (tool
    output) or ``function_call`` (an assistant tool call, trained like any assistant reply). An optional
    ``system`` column is a per-row system prompt.
``messages``
    ``messages``: a list of ``{"role": ..., "content": ...}`` (OpenAI style; ``content`` may be a list of
    ``{"type": "text", "text": ...}`` parts).
``text``
    ``text``: plain text for continued pre-training.
``preference``
    ``prompt``/``chosen``/``rejected`` columns (each a string or messages), or a ``conversations`` /
    ``messages`` / alpaca ``instruction`` prompt with ``chosen`` and ``rejected`` final turns, as in
    LLaMA-Factory's ``dpo_en_demo.json``.
``unpaired_preference``
    ``prompt`` (a string or messages), ``completion`` (the reply) and ``label`` (true: desirable, false:
    undesirable), one reply per row (KTO's data).
``auto``
    What the method's row of ``kubetune.methods.METHODS`` says: a fixed format (pretrain: text; dpo:
    preference) or detected from the first row's columns (sft: sharegpt, messages or alpaca).

A row's own system prompt wins over ``spec.dataset.system_prompt``. Conversations must hold at
least one assistant reply; turns after the last assistant reply teach nothing and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune import methods as table
from kubetune_trainer.data_sources import BadRowError, DataError, Row, type_name

SYSTEM, USER, ASSISTANT, TOOL = "system", "user", "assistant", "tool"

ROLE_ALIASES = {
    "system": SYSTEM,
    "developer": SYSTEM,
    "human": USER,
    "user": USER,
    "gpt": ASSISTANT,
    "assistant": ASSISTANT,
    "model": ASSISTANT,
    "bot": ASSISTANT,
    "chatgpt": ASSISTANT,
    "function_call": ASSISTANT,
    "observation": TOOL,
    "tool": TOOL,
    "function": TOOL,
    "function_response": TOOL,
    "ipython": TOOL,
}

FORMATS = tuple(table.FORMATS)  # the core's table (kubetune.methods) names them; PARSERS parses each


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | tool
    content: str


@dataclass(frozen=True)
class Example:
    """One normalised sample.

    chat: ``turns`` (user/assistant/tool, the system prompt apart in ``system``);
    text: ``text``; preference: ``turns`` is the prompt, ``chosen``/``rejected`` the final replies.
    """

    kind: str  # "chat" | "text" | "preference"
    turns: tuple[Turn, ...] = ()
    system: str | None = None
    text: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    origin: str = ""  # "file row N", for messages

    def with_system(self, default: str | None) -> Example:
        if self.system is not None or not default:
            return self
        return Example(self.kind, self.turns, default, self.text, self.chosen, self.rejected, self.origin)


@dataclass
class Columns:
    """Column names in the user's data (defaults, overridden by spec.dataset.columns)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    history: str = "history"
    conversations: str = "conversations"
    messages: str = "messages"
    text: str = "text"
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    mapped: set[str] = field(default_factory=set)  # which ones the user set

    @classmethod
    def from_spec(cls, mapping: Any) -> Columns:
        cols = cls()
        if mapping is not None:
            for name, value in mapping.model_dump(exclude_none=True).items():
                setattr(cols, name, value)
                cols.mapped.add(name)
        return cols


# ---------------------------------------------------------------- helpers


def _parse_json_string(value: Any) -> Any:
    """CSV cells hold lists as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        import json

        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _string(row: Row, name: str, value: Any, *, required: bool = True, allow_empty: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise row.error(name, f"expected a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise row.error(
            name, f"expected a non-empty string, got {'an empty string' if not value else 'only whitespace'}"
        )
    return value


def _get(row: Row, column: str, *, required: bool = True) -> Any:
    if column not in row.data:
        if required:
            cols = ", ".join(sorted(map(str, row.data))[:12])
            raise row.error(column, f"missing (the row has: {cols})")
        return None
    return row.data[column]


def _content(row: Row, path: str, value: Any) -> str:
    """Message content: a string, or a list of text parts."""
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if isinstance(part, str):
                parts.append(part)
            elif (
                isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ):
                parts.append(part["text"])
            else:
                raise row.error(f"{path}[{j}]", "only text content parts are supported")
        return "".join(parts)
    if not isinstance(value, str):
        raise row.error(path, f"expected a string, got {type_name(value)}")
    return value


def _turn(row: Row, path: str, item: Any) -> Turn:
    """A {from, value} or {role, content} dict."""
    if not isinstance(item, dict):
        raise row.error(path, f"expected an object with from/value or role/content, got {type_name(item)}")
    if "from" in item or "value" in item:
        rkey, ckey = "from", "value"
    else:
        rkey, ckey = "role", "content"
    raw_role = item.get(rkey)
    if not isinstance(raw_role, str):
        raise row.error(f"{path}.{rkey}", f"expected a role string, got {type_name(raw_role)}")
    role = ROLE_ALIASES.get(raw_role.strip().lower())
    if role is None:
        known = ", ".join(sorted(ROLE_ALIASES))
        raise row.error(f"{path}.{rkey}", f"unknown role {raw_role!r} (known: {known})")
    if ckey not in item:
        raise row.error(f"{path}.{ckey}", "missing")
    content = _content(row, f"{path}.{ckey}", item[ckey])
    if role in (USER, ASSISTANT) and not content.strip():
        raise row.error(f"{path}.{ckey}", f"expected a non-empty string, got {type_name(item[ckey])}")
    return Turn(role, content)


def _turn_list(row: Row, column: str, value: Any) -> list[Turn]:
    value = _parse_json_string(value)
    if not isinstance(value, list):
        raise row.error(column, f"expected a list of turns, got {type_name(value)}")
    if not value:
        raise row.error(column, "expected a list of turns, got an empty list")
    return [_turn(row, f"{column}[{i}]", item) for i, item in enumerate(value)]


def _split_system(
    row: Row, column: str, turns: list[Turn], system: str | None
) -> tuple[str | None, list[Turn]]:
    if turns and turns[0].role == SYSTEM:
        if system is None or not system.strip():
            system = turns[0].content
        turns = turns[1:]
    for i, t in enumerate(turns):
        if t.role == SYSTEM:
            raise row.error(f"{column}[{i + 1}]", "a system turn is only allowed first")
    return (system if system and system.strip() else None), turns


def _chat(row: Row, column: str, turns: list[Turn], system: str | None) -> Example:
    system, turns = _split_system(row, column, turns, system)
    last = max((i for i, t in enumerate(turns) if t.role == ASSISTANT), default=-1)
    if last < 0:
        raise row.error(column, "has no assistant reply to train on")
    if turns[0].role == ASSISTANT:
        raise row.error(
            f"{column}[0]", "the conversation starts with an assistant reply; it needs a user turn first"
        )
    return Example("chat", tuple(turns[: last + 1]), system, origin=f"{row.file} row {row.row}")


def _optional_system(row: Row, cols: Columns) -> str | None:
    value = row.data.get(cols.system)
    if value is None or (isinstance(value, float) and value != value):  # None / NaN
        return None
    if not isinstance(value, str):
        raise row.error(cols.system, f"expected a string, got {type_name(value)}")
    return value if value.strip() else None


# ---------------------------------------------------------------- formats


def parse_alpaca(row: Row, cols: Columns) -> Example:
    instruction = _string(row, cols.instruction, _get(row, cols.instruction))
    extra = _string(row, cols.input, row.data.get(cols.input), required=False, allow_empty=True)
    output = _string(row, cols.output, _get(row, cols.output))
    turns: list[Turn] = []
    history = _parse_json_string(row.data.get(cols.history))
    if history not in (None, ""):
        if not isinstance(history, list):
            raise row.error(
                cols.history, f"expected a list of [instruction, response] pairs, got {type_name(history)}"
            )
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise row.error(f"{cols.history}[{i}]", "expected an [instruction, response] pair")
            turns.append(Turn(USER, _string(row, f"{cols.history}[{i}][0]", pair[0])))
            turns.append(Turn(ASSISTANT, _string(row, f"{cols.history}[{i}][1]", pair[1])))
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    turns += [Turn(USER, user), Turn(ASSISTANT, output)]
    return Example("chat", tuple(turns), _optional_system(row, cols), origin=f"{row.file} row {row.row}")


def parse_sharegpt(row: Row, cols: Columns) -> Example:
    turns = _turn_list(row, cols.conversations, _get(row, cols.conversations))
    return _chat(row, cols.conversations, turns, _optional_system(row, cols))


def parse_messages(row: Row, cols: Columns) -> Example:
    turns = _turn_list(row, cols.messages, _get(row, cols.messages))
    return _chat(row, cols.messages, turns, _optional_system(row, cols))


def parse_text(row: Row, cols: Columns) -> Example:
    text = _string(row, cols.text, _get(row, cols.text), allow_empty=True)
    return Example("text", text=text, origin=f"{row.file} row {row.row}")


def _reply(row: Row, column: str, value: Any) -> str | list[Turn]:
    """A chosen/rejected answer: a string, a turn dict, or a list of turns."""
    value = _parse_json_string(value)
    if isinstance(value, str):
        return _string(row, column, value)
    if isinstance(value, dict):
        t = _turn(row, column, value)
        if t.role != ASSISTANT:
            raise row.error(column, f"expected an assistant turn, got role {t.role!r}")
        return t.content
    if isinstance(value, list):
        return _turn_list(row, column, value)
    raise row.error(column, f"expected a string or an assistant turn, got {type_name(value)}")


def parse_preference(row: Row, cols: Columns) -> Example:
    chosen = _reply(row, cols.chosen, _get(row, cols.chosen))
    rejected = _reply(row, cols.rejected, _get(row, cols.rejected))
    system = _optional_system(row, cols)
    prompt_col = cols.prompt
    if cols.prompt in row.data:
        raw = _parse_json_string(row.data[cols.prompt])
        if isinstance(raw, str):
            prompt = [Turn(USER, _string(row, cols.prompt, raw))]
        else:
            prompt = _turn_list(row, cols.prompt, raw)
    elif cols.conversations in row.data:
        prompt_col = cols.conversations
        prompt = _turn_list(row, prompt_col, row.data[prompt_col])
    elif cols.messages in row.data:
        prompt_col = cols.messages
        prompt = _turn_list(row, prompt_col, row.data[prompt_col])
    elif cols.instruction in row.data:
        prompt_col = cols.instruction
        instruction = _string(row, cols.instruction, row.data[cols.instruction])
        extra = _string(row, cols.input, row.data.get(cols.input), required=False, allow_empty=True)
        prompt = [Turn(USER, f"{instruction}\n{extra}" if extra.strip() else instruction)]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's implicit prompt: chosen and rejected are whole conversations sharing a prefix.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise row.error(cols.prompt, "missing, and chosen/rejected share no prompt turns")
    else:
        raise row.error(
            cols.prompt, "missing (a preference row needs prompt, conversations, messages or instruction)"
        )

    def final(column: str, value: str | list[Turn]) -> str:
        if isinstance(value, str):
            return value
        if len(value) != 1 or value[0].role != ASSISTANT:
            raise row.error(column, "expected one assistant turn after the prompt")
        if not value[0].content.strip():
            raise row.error(column, "expected a non-empty reply")
        return value[0].content

    chosen_text, rejected_text = final(cols.chosen, chosen), final(cols.rejected, rejected)
    system, prompt = _split_system(row, prompt_col, prompt, system)
    if not prompt:
        raise row.error(prompt_col, "the prompt has no user turn")
    if prompt[-1].role == ASSISTANT:
        raise row.error(
            prompt_col, "the prompt ends with an assistant turn; chosen/rejected must answer a user turn"
        )
    return Example(
        "preference", tuple(prompt), system, chosen=chosen_text, rejected=rejected_text,
        origin=f"{row.file} row {row.row}",
    )  # fmt: skip


def parse_unpaired_preference(row: Row, cols: Columns) -> Example:
    """One reply and whether it is desirable (KTO's data): a preference example with only ``chosen``
    (label true) or only ``rejected`` (label false) set."""
    label = _parse_json_string(_get(row, cols.label))
    if label in (0, 1) and not isinstance(label, float):
        label = bool(label)
    if not isinstance(label, bool):
        raise row.error(cols.label, f"expected true or false, got {type_name(label)} {label!r}")
    reply = _reply(row, cols.completion, _get(row, cols.completion))
    if not isinstance(reply, str):
        if len(reply) != 1 or reply[0].role != ASSISTANT:
            raise row.error(cols.completion, "expected one assistant turn")
        reply = reply[0].content
    if not reply.strip():
        raise row.error(cols.completion, "expected a non-empty reply")
    raw = _parse_json_string(_get(row, cols.prompt))
    prompt = (
        [Turn(USER, _string(row, cols.prompt, raw))]
        if isinstance(raw, str)
        else _turn_list(row, cols.prompt, raw)
    )
    system, prompt = _split_system(row, cols.prompt, prompt, _optional_system(row, cols))
    if not prompt or prompt[-1].role == ASSISTANT:
        raise row.error(cols.prompt, "the prompt must end with a user turn")
    return Example(
        "preference", tuple(prompt), system, chosen=reply if label else None, rejected=None if label else reply,
        origin=f"{row.file} row {row.row}",
    )  # fmt: skip


PARSERS: dict[str, Callable[[Row, Columns], Example]] = {
    "alpaca": parse_alpaca,
    "sharegpt": parse_sharegpt,
    "messages": parse_messages,
    "text": parse_text,
    "preference": parse_preference,
    "unpaired_preference": parse_unpaired_preference,
}


def detect_format(row: Row, cols: Columns, method: str = "sft") -> str:
    """The format of a source, from its first row's columns, in the order the method's row of
    ``kubetune.methods.METHODS`` says (``detect``); a method that reads one format takes it unseen
    (its parser names a missing column). A row of a format the method does not read is refused,
    naming the methods that train on it."""
    m = table.method(method)
    if len(m.reads) == 1:
        return m.reads[0]
    keys = set(row.data)
    for name in m.detect:
        columns = [getattr(cols, c) for c in table.FORMATS[name].columns]
        if not all(c in keys for c in columns):
            continue
        if name in m.reads:
            return name
        fmt = table.FORMATS[name]
        have = (
            f"a '{columns[0]}' column"
            if len(columns) == 1
            else " and ".join(f"'{c}'" for c in columns) + " columns"
        )
        readers = table.methods_reading(name)
        raise DataError(
            f"{row.file}: rows have {have} ({fmt.label}), which method {method} does not read; {fmt.label} "
            f"trains with method {table.join_or(readers)} (or set dataset.format and dataset.columns)"
        )
    raise DataError(
        f"{row.file}: cannot tell the format from the columns ({', '.join(sorted(map(str, keys))[:12])}); "
        f"set dataset.format ({', '.join(FORMATS)}) and dataset.columns"
    )


class Normalizer:
    """Row -> Example for one source; the format is fixed on the first row when it is ``auto``."""

    def __init__(self, fmt: str, cols: Columns, method: str, on_bad: Callable[[BadRowError], None]) -> None:
        if fmt != "auto" and fmt not in PARSERS:
            raise DataError(f"unknown dataset format {fmt!r}; use auto or one of {', '.join(FORMATS)}")
        self.format = fmt
        self.cols = cols
        self.method = method
        self.on_bad = on_bad
        self.empty = 0  # empty text rows (pre-training): skipped, counted, not an error

    def __call__(self, row: Row) -> Example | None:
        if self.format == "auto":
            self.format = detect_format(row, self.cols, self.method)
        try:
            ex = PARSERS[self.format](row, self.cols)
        except BadRowError as e:
            self.on_bad(e)
            return None
        if ex.kind == "text" and not (ex.text or "").strip():
            self.empty += 1
            return None
        return ex


def check_dataset(spec: Any, limit: int = 200) -> list[str]:
    """Problems in the first ``limit`` rows of a job's local data (path, file:// or a mounted pvc://),
    for ``kubetune validate``: format detection and every bad row, each naming file, row and field.
    s3:// and hf:// data is not read here (no credentials at validation time); returns [] for it.
    Needs no tokenizer and no torch."""
    from itertools import islice

    from kubetune.uris import parse_uri
    from kubetune_trainer.data_sources import iter_rows

    problems: list[str] = []
    ds = spec.dataset
    sources = [(ds, spec.dataset_format())]
    sources += [(m, m.format) for m in ds.mix]
    for src, fmt in sources:
        try:
            if parse_uri(src.uri).scheme in ("s3", "hf"):
                continue
        except ValueError as e:
            problems.append(f"{src.uri}: {e}")
            continue
        cols = Columns.from_spec(src.columns)

        def collect(err: BadRowError) -> None:
            problems.append(str(err))

        norm = Normalizer(fmt, cols, spec.method, collect)
        try:
            for row in islice(iter_rows(src.uri, text_column=cols.text, on_bad=collect), limit):
                norm(row)
        except DataError as e:
            problems.append(str(e))
    return problems


__all__ = [
    "ASSISTANT", "Columns", "Example", "FORMATS", "Normalizer", "PARSERS", "SYSTEM", "TOOL", "Turn", "USER",
    "check_dataset", "detect_format",
]  # fmt: skip
