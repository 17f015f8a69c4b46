"""Load FineTuneJob YAML and turn every problem into one line naming the document and field."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.overrides import Override, OverrideError, apply_overrides, parse_override
from kubetune.spec import API_VERSION, KIND, CrossFieldError, FineTuneJob

if TYPE_CHECKING:
    from kubetune.profile_spec import FineTuneProfile


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-4` as a float, as Kubernetes does (PyYAML's YAML 1.1 reads a string),
    and refuses deep nesting before PyYAML's recursive composer overflows the stack."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise DocumentTooLarge(f"the document nests deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# A FineTuneJob is a few hundred values. Aliases can make a short file expand to billions (a
# "billion laughs"), which render, the API client and every pod's manifest would then copy; the
# API server itself stores no object over ~1.5 MiB.
MAX_VALUES = 10_000
MAX_TEXT = 1 << 20
MAX_DEPTH = 64


class DocumentTooLarge(ValueError):
    """A YAML document that expands (through aliases) beyond what a FineTuneJob can be."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def check_expansion(root: yaml.Node) -> None:
    """Raise DocumentTooLarge when `root`, with every alias expanded, is too big or recursive.

    Each node is measured once (aliases share nodes), so a bomb is measured in time linear in the file.
    """
    values: dict[int, int] = {}
    text: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            values[key] = 1 + sum(values[id(k)] for k in kids)
            text[key] = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(
                text[id(k)] for k in kids
            )
            if values[key] > MAX_VALUES or text[key] > MAX_TEXT:
                raise DocumentTooLarge(
                    f"the document expands to more than {MAX_VALUES} values or {MAX_TEXT >> 20} MiB of text "
                    "(through YAML aliases?); a FineTuneJob is far smaller"
                )
            continue
        if key in values:
            continue
        if key in on_path:
            raise DocumentTooLarge("a YAML alias refers to a node that contains it (a recursive document)")
        on_path.add(key)
        stack.append((node, True))
        stack += [(k, False) for k in _children(node) if id(k) not in values]


def load_yaml_documents(text: str) -> list[Any]:
    """All YAML documents in `text` (empty documents dropped); DocumentTooLarge for alias bombs."""
    loader = _Loader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            check_expansion(node)
            docs.append(loader.construct_document(node))
    finally:
        loader.dispose()
    return [d for d in docs if d is not None]


@dataclass
class Problem:
    document: str  # "job.yaml#1 (name)"
    path: str  # "spec.pet_config.lora_rank" or "" for the whole document
    message: str

    def __str__(self) -> str:
        return (
            f"{self.document}: {self.path}: {self.message}"
            if self.path
            else f"{self.document}: {self.message}"
        )


class SpecError(ValueError):
    """A FineTuneJob that does not validate; `problems` holds one entry per issue."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc` (for "did you mean")."""
    import typing

    model: Any = FineTuneJob
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            if isinstance(part, int):
                continue
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _first_model(field.annotation, typing)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _first_model(tp: Any, typing: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _first_model(arg, typing)
        if found is not None:
            return found
    return None


_TYPE_NAMES = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number", "float_parsing": "a number",
    "string_type": "a string", "bool_type": "true or false", "bool_parsing": "true or false",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping", "list_type": "a list",
}  # fmt: skip


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _message(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        model = _model_at(err["loc"])
        name = str(err["loc"][-1])
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f"; did you mean {close[0]!r}?"
        return f"unknown field{hint}"
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}, got {_describe(value)}"
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}, got {value!r}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}, got {value!r}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}, got {value!r}"
    if kind == "less_than":
        return f"must be < {ctx['lt']}, got {value!r}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {value!r}"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}, got {value!r}"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg
    return err["msg"]


def _path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        elif p in ("str", "list[str]", "function-after[_modules(), union[str,list[str]]]"):
            continue  # union member tags added by pydantic
        else:
            parts.append(str(p))
    return ".".join(parts)


def problems_of(doc: Any, where: str) -> list[Problem]:
    """Every problem of one parsed YAML document, [] when it is a valid FineTuneJob."""
    if not isinstance(doc, dict):
        return [Problem(where, "", f"a FineTuneJob must be a YAML mapping, got {_describe(doc)}")]
    name = (doc.get("metadata") or {}).get("name") if isinstance(doc.get("metadata"), dict) else None
    label = f"{where} ({name})" if name else where
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        return [
            Problem(
                label,
                "",
                f"not a FineTuneJob: apiVersion/kind must be {API_VERSION}/{KIND}, "
                f"got {doc.get('apiVersion')!r}/{doc.get('kind')!r}",
            )
        ]
    try:
        FineTuneJob.model_validate(doc)
    except ValidationError as e:
        out: list[Problem] = []
        seen: set[tuple[str, str]] = set()
        for err in e.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, CrossFieldError):
                items = cause.problems
            else:
                items = [(_path(err["loc"]), _message(err))]
            for path, msg in items:
                if (path, msg) not in seen:
                    seen.add((path, msg))
                    out.append(Problem(label, path, msg))
        # A union (str | list) reports one error per member; keep one line per field.
        return _collapse_union_noise(out)
    return []


def _collapse_union_noise(problems: list[Problem]) -> list[Problem]:
    by_path: dict[str, list[Problem]] = {}
    for p in problems:
        by_path.setdefault(p.path, []).append(p)
    out = []
    for p in problems:
        group = by_path[p.path]
        if len(group) > 1 and all(g.message.startswith("must be ") for g in group):
            if p is group[0]:
                kinds = " or ".join(g.message.split(",")[0].removeprefix("must be ") for g in group)
                out.append(
                    Problem(
                        p.document, p.path, f"must be {kinds}, got {group[0].message.split('got ', 1)[-1]}"
                    )
                )
            continue
        out.append(p)
    return out


def local_path_warnings(job: FineTuneJob) -> list[tuple[str, str]]:
    """(field, warning) for each model or data path that does not exist on this machine.

    A warning, not an error: the path may be meant for inside the trainer image or a pod.
    """
    from kubetune.uris import parse_uri

    fields = [(f, u) for f, u in job.spec.uri_fields() if f.startswith(("spec.model.", "spec.dataset."))]
    out = []
    for field, value in fields:
        if value is None or parse_uri(value).scheme != "file":
            continue
        raw = Path(parse_uri(value).path)
        path = raw.expanduser()
        if path.exists():
            continue
        if path.is_absolute():
            where = "on this machine"
        else:
            where = f"here (a relative path is read from the current directory, now {Path.cwd()})"
        out.append((field, f"{value} does not exist {where}; fine if it is a path inside the trainer image"))
    return out


def load_jobs_text(text: str, source: str = "<input>", overrides: Sequence[str] = ()) -> list[FineTuneJob]:
    """Parse and validate every document, with the ``--set PATH=VALUE`` `overrides` applied to each
    (kubetune.overrides); raise SpecError listing every problem."""
    try:
        docs = load_yaml_documents(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError([Problem(source, "", f"not valid YAML{where}: {reason}")]) from None
    except DocumentTooLarge as e:
        raise SpecError([Problem(source, "", f"refused: {e}")]) from None
    if not docs:
        raise SpecError([Problem(source, "", "empty file: no FineTuneJob found")])
    problems: list[Problem] = []
    jobs: list[FineTuneJob] = []
    sets = _parse_overrides(overrides, source)
    for i, doc in enumerate(docs, 1):
        where = source if len(docs) == 1 else f"{source}#{i}"
        if sets:
            try:
                doc = apply_overrides(doc, sets)
            except OverrideError as e:
                problems.append(Problem(_label(doc, where), e.path, e.message))
                continue
        found = [_blame(p, sets) for p in problems_of(doc, where)]
        if found:
            problems += found
        else:
            jobs.append(FineTuneJob.model_validate(doc))
    if problems:
        raise SpecError(problems)
    return jobs


def _parse_overrides(overrides: Sequence[str], source: str) -> list[Override]:
    out, problems = [], []
    for text in overrides:
        try:
            out.append(parse_override(text))
        except OverrideError as e:
            problems.append(Problem(source, e.path, e.message))
    if problems:
        raise SpecError(problems)
    return out


def _label(doc: Any, where: str) -> str:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"{where} ({name})" if name else where


def _blame(problem: Problem, sets: Sequence[Override]) -> Problem:
    """A problem with a value given on the command line says which --set gave it."""
    for o in reversed(sets):
        if problem.path and o.covers(problem.path):
            return Problem(problem.document, problem.path, f"{problem.message} (--set {o.text})")
    return problem


def load_jobs(path: str | Path, overrides: Sequence[str] = ()) -> list[FineTuneJob]:
    """Every FineTuneJob in a YAML file (with ``--set`` `overrides` applied)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(
            [Problem(str(p), "", f"cannot read: {e.strerror if isinstance(e, OSError) else e}")]
        ) from None
    return load_jobs_text(text, str(p), overrides)


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> FineTuneJob:
    """The single FineTuneJob in a YAML file (with ``--set`` `overrides` applied)."""
    jobs = load_jobs(path, overrides)
    if len(jobs) != 1:
        raise SpecError([Problem(str(path), "", f"expected one FineTuneJob, found {len(jobs)}")])
    return jobs[0]


# ---------------------------------------------------------------- profiles


def load_profile(path: str | Path) -> FineTuneProfile:
    """The single FineTuneProfile in a YAML file; SpecError naming the file and field otherwise."""
    from kubetune.profile_spec import PROFILE_KIND, FineTuneProfile

    where = str(path)
    try:
        docs = load_yaml_documents(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([Problem(where, "", f"cannot read: {getattr(e, 'strerror', None) or e}")]) from None
    except (yaml.YAMLError, DocumentTooLarge) as e:
        raise SpecError([Problem(where, "", f"not a valid profile file: {str(e).splitlines()[0]}")]) from None
    if len(docs) != 1 or not isinstance(docs[0], dict) or docs[0].get("kind") != PROFILE_KIND:
        raise SpecError([Problem(where, "", f"expected one {API_VERSION}/{PROFILE_KIND} document")])
    try:
        return FineTuneProfile.model_validate(docs[0])
    except ValidationError as e:
        name = (docs[0].get("metadata") or {}).get("name")
        label = f"{where} ({name})" if name else where
        raise SpecError([Problem(label, _path(err["loc"]), _message(err)) for err in e.errors()]) from None


def apply_profile(job: FineTuneJob, profile: FineTuneProfile | None, where: str) -> FineTuneJob:
    """`job` with its effective spec (kubetune.profiles); SpecError with one line per violation."""
    from kubetune.profiles import resolve

    label = f"{where} ({job.metadata.name})"
    if profile is not None and job.spec.profile not in (None, profile.name):
        raise SpecError(
            [
                Problem(
                    label,
                    "spec.profile",
                    f"names {job.spec.profile}, but the profile given is {profile.name}",
                )
            ]
        )
    resolved = resolve(job.spec, profile)
    if resolved.spec is None:
        hint = "; pass --profile FILE" if profile is None else ""
        raise SpecError([Problem(label, field, message + hint) for field, message in resolved.violations])
    return job.model_copy(update={"spec": resolved.spec})


def profile_warnings(job: FineTuneJob) -> list[tuple[str, str]]:
    """(field, warning) when a job relies on a profile that was not given."""
    if job.spec.profile:
        return [("spec.profile", f"{job.spec.profile} is applied by the cluster; pass --profile FILE to check "
                 "its defaults and limits here")]  # fmt: skip
    if job.spec.model.uri is None:
        return [("spec.model.name", f"{job.spec.model.name} comes from a profile's catalog; pass --profile FILE "
                 "to resolve it here")]  # fmt: skip
    return []
