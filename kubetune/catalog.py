"""The shipped example jobs (`kubetune examples`): list them, filter them, print one to copy.

Each file under ``examples/`` (and ``examples/platform/``) describes itself in one line with the
``kubetune.io/description`` annotation in its metadata, which ``kubectl describe`` shows too. An
installed package carries the files as ``kubetune/examples/`` (pyproject package-data); a source
checkout reads the repository's ``examples/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DESCRIPTION_ANNOTATION = "kubetune.io/description"


@dataclass(frozen=True)
class Example:
    name: str  # "sft-lora", "platform/job"
    path: Path
    kind: str  # FineTuneJob | FineTuneProfile
    description: str


def examples_root() -> Path:
    """Where the example files are: inside the installed package, else the source checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parent / "examples"):
        if any(candidate.glob("*.yaml")):
            return candidate
    raise FileNotFoundError("no examples directory found (neither in the package nor next to it)")


def list_examples(root: Path | None = None) -> list[Example]:
    """Every example, sorted by name; a file without a description is described by its kind."""
    from kubetune.validate import load_yaml_documents

    root = root or examples_root()
    out = []
    for path in sorted([*root.glob("*.yaml"), *root.glob("*/*.yaml")]):
        docs = [d for d in load_yaml_documents(path.read_text(encoding="utf-8")) if isinstance(d, dict)]
        doc = docs[0] if docs else {}
        meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
        annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
        kind = str(doc.get("kind") or "?")
        description = str(annotations.get(DESCRIPTION_ANNOTATION) or kind).strip()
        name = path.relative_to(root).with_suffix("").as_posix()
        out.append(Example(name, path, kind, description))
    return out


def find_examples(pattern: str | None, root: Path | None = None) -> list[Example]:
    """Those whose name or description matches `pattern` (a case-insensitive regular expression,
    as `xtuner list-cfg -p`); all of them without one."""
    examples = list_examples(root)
    if not pattern:
        return examples
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error:
        rx = re.compile(re.escape(pattern), re.IGNORECASE)  # a plain word with a stray bracket
    return [e for e in examples if rx.search(e.name) or rx.search(e.description)]


def get_example(name: str, root: Path | None = None) -> Example:
    """One example by name ("sft-lora", "platform/job"; ".yaml" may be written); KeyError naming
    the examples there when there is none of that name."""
    wanted = name.removesuffix(".yaml").removeprefix("examples/")
    examples = list_examples(root)
    for e in examples:
        if e.name == wanted:
            return e
    raise KeyError(f"no example named {name!r}; there are: {', '.join(e.name for e in examples)}")


__all__ = [
    "DESCRIPTION_ANNOTATION",
    "Example",
    "examples_root",
    "find_examples",
    "get_example",
    "list_examples",
]
