"""`--set PATH=VALUE` on the command line: change one field of a FineTuneJob file without editing it.

``kubetune run job.yaml --set training.learning_rate=1e-4 --set pet_config.lora_rank=16``. A PATH is
relative to ``spec`` (``spec.`` may be written out; ``metadata.name`` and friends name the metadata),
dotted, with ``[i]`` for an item of a list that is already there (``dataset.mix[1].weight``). The
VALUE is read as YAML (so ``1e-4`` is a number, ``true`` a boolean, ``"16"`` a string, ``[a, b]`` a
list, an empty value null) and the result is validated like the file, with the same one-line errors
naming the field. A path that names no field of the spec is refused before anything is validated.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.spec import FineTuneJob

_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_-]*)((?:\[\d+\])*)")


@dataclass(frozen=True)
class Override:
    """One parsed ``--set``: the full path (``spec.training.learning_rate``), its parts and the value."""

    text: str  # as given, for messages
    path: str
    parts: tuple[str | int, ...]
    value: Any

    def covers(self, field: str) -> bool:
        """Whether a problem reported at `field` is about this override's value."""
        return field == self.path or field.startswith((self.path + ".", self.path + "["))


class OverrideError(ValueError):
    """A ``--set`` that cannot apply; `path` is the field it names ("" when it names none)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def parse_override(text: str) -> Override:
    """``training.learning_rate=1e-4`` -> Override; OverrideError for a malformed one."""
    from kubetune.validate import DocumentTooLarge, load_yaml_documents

    raw_path, eq, raw_value = text.partition("=")
    raw_path = raw_path.strip()
    if not eq or not raw_path:
        raise OverrideError("", f"--set {text}: expected PATH=VALUE, e.g. training.learning_rate=1e-4")
    parts: list[str | int] = []
    for piece in raw_path.split("."):
        m = _PART.fullmatch(piece)
        if m is None:
            raise OverrideError("", f"--set {text}: {raw_path!r} is not a dotted field path")
        parts.append(m.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    if parts[0] not in ("spec", "metadata"):
        parts.insert(0, "spec")
    try:
        docs = load_yaml_documents(raw_value) if raw_value.strip() else []
    except (yaml.YAMLError, DocumentTooLarge) as e:
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise OverrideError(_dotted(parts), f"--set {text}: the value is not valid YAML: {reason}") from None
    if len(docs) > 1:
        raise OverrideError(_dotted(parts), f"--set {text}: the value is more than one YAML document")
    return Override(text, _dotted(parts), tuple(parts), docs[0] if docs else None)


def _dotted(parts: Sequence[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _container(tp: Any, kind: type) -> Any:
    """The value type of `tp` when it is (or may be) a `kind` (list or dict), else None."""
    origin = typing.get_origin(tp)
    if origin is kind:
        args = typing.get_args(tp)
        return args[-1] if args else Any
    for arg in typing.get_args(tp):
        found = _container(arg, kind)
        if found is not None:
            return found
    return None


def check_path(parts: Sequence[str | int], text: str) -> None:
    """OverrideError unless `parts` names a field of a FineTuneJob (a key of a mapping field counts)."""
    tp: Any = FineTuneJob
    for i, part in enumerate(parts):
        here = _dotted(parts[: i + 1])
        if isinstance(part, int):
            item = _container(tp, list)
            if item is None:
                raise OverrideError(here, f"--set {text}: {_dotted(parts[:i])} is not a list")
            tp = item
            continue
        model = _model_in(tp)
        if model is not None:
            fields = {n: f for n, f in model.model_fields.items() if n != "status"}
            field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
            if field is None:
                close = difflib.get_close_matches(part, list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise OverrideError(here, f"unknown field{hint} (--set {text})")
            tp = field.annotation
            continue
        value = _container(tp, dict)
        if value is None or tp is Any:
            if tp is Any:  # free-form (pod affinity, tolerations): anything goes below here
                return
            raise OverrideError(
                _dotted(parts[:i]), f"is a single value, it has no field {part!r} (--set {text})"
            )
        tp = value


def apply_overrides(doc: Any, sets: Sequence[str | Override]) -> Any:
    """`doc` (one parsed FineTuneJob document) with every ``--set`` applied, in order, to a copy.

    Missing sections on the way are created (``pet_config.quantization.bits=4`` on a job without a
    quantization block). OverrideError for a path that names no field or an item not in a list;
    the values themselves are checked by validating the result (:func:`kubetune.validate.problems_of`).
    """
    import copy

    out = copy.deepcopy(doc)
    for item in sets:
        o = item if isinstance(item, Override) else parse_override(item)
        check_path(o.parts, o.text)
        if not isinstance(out, dict):
            return out  # not a FineTuneJob at all: validation says so
        node: Any = out
        for i, part in enumerate(o.parts[:-1]):
            nxt = o.parts[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise OverrideError(_dotted(o.parts[: i + 1]), f"no such item (--set {o.text})")
            elif not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
            if isinstance(nxt, str) and not isinstance(node, dict):
                raise OverrideError(_dotted(o.parts[: i + 1]), f"is not a mapping (--set {o.text})")
        last = o.parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise OverrideError(o.path, f"no such item (--set {o.text})")
        elif not isinstance(node, dict):
            raise OverrideError(o.path, f"is not a mapping (--set {o.text})")
        node[last] = copy.deepcopy(o.value)
    return out


__all__ = ["Override", "OverrideError", "apply_overrides", "check_path", "parse_override"]
