"""Read raw rows from wherever a FineTuneJob's data lives.

A data URI names a file or a directory:

- a plain path or ``file://`` path, ``pvc://claim/path`` (:func:`kubetune.locations.local_path`,
  as for the model), ``s3://bucket/key`` (fetched once into the local cache,
  :func:`kubetune_trainer.locations.fetch`), ``hf://org/name`` (``datasets.load_dataset``, only
  where the hub is reachable);
- files: ``.json`` (an array of objects, or an object holding one such array), ``.jsonl`` /
  ``.ndjson`` (one object per line), ``.parquet``, ``.csv``, ``.tsv``, ``.txt`` (one row per
  non-blank line, in the text column); each may also end in ``.gz``;
- a directory: a ``datasets`` ``save_to_disk`` directory (its ``train`` split when it holds a
  DatasetDict), or else every data file below it, in sorted path order.

Rows come out lazily, one :class:`Row` at a time with the file and 1-based row number they came
from, so errors can name them and streaming pre-training never holds a corpus in memory (except a
``.json`` array, which is parsed whole).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kubetune.uris import parse_uri
from kubetune_trainer.errors import JobError

log = logging.getLogger("kubetune.data")

DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".csv", ".tsv", ".txt")
_DISK_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")


class DataError(JobError, ValueError):
    """A problem with the training data that the user can fix; the message says what and where.
    A :class:`JobError` (entry points print it as one line, no traceback) and a ValueError."""


class BadRowError(DataError):
    """One malformed row: ``data.jsonl row 17: field 'output': expected a string, got null``."""

    def __init__(self, file: str, row: int, field: str | None, problem: str, line: int | None = None) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.problem = problem
        self.line = line
        where = f"{file} row {row}"
        if line is not None and line != row:
            where += f" (line {line})"
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    data: dict[str, Any]
    file: str  # as the user would recognise it: the URI, or URI/relative path inside a directory
    row: int  # 1-based record number within the file
    line: int | None = None  # 1-based line number for line-based files, when it helps

    def error(self, field: str | None, problem: str) -> BadRowError:
        return BadRowError(self.file, self.row, field, problem, self.line)


class BadRows:
    """What to do with a bad row: raise it (``on_bad_row: error``) or count and skip it."""

    def __init__(self, mode: str = "error") -> None:
        if mode not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {mode!r}")
        self.mode = mode
        self.count = 0
        self.first: list[str] = []

    def __call__(self, err: BadRowError) -> None:
        if self.mode == "error":
            raise err
        self.count += 1
        if len(self.first) < 5:
            self.first.append(str(err))
            log.warning("skipping bad row: %s", err)
        elif self.count == 6:
            log.warning("skipping more bad rows (counted, not shown)")


def type_name(value: Any) -> str:
    """JSON-ish type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------- locating data


def _is_data_file(name: str) -> bool:
    n = name.lower()
    if n.endswith(".gz"):
        n = n[:-3]
    return n.endswith(DATA_SUFFIXES)


@dataclass(frozen=True)
class LocalData:
    """A data URI resolved to something on the local file system."""

    uri: str  # what the user wrote
    path: Path
    kind: str  # "file" | "dir" | "disk" (save_to_disk) | "hf"


def _data_keys(text: str) -> Callable[[list[str]], list[str]]:
    """Which objects of an s3:// prefix are data: all of a save_to_disk directory, else data files."""

    def select(keys: list[str]) -> list[str]:
        if any(k.rsplit("/", 1)[-1] in _DISK_MARKERS for k in keys):
            return keys
        wanted = [k for k in keys if _is_data_file(k)]
        if not wanted:
            raise DataError(
                f"{text}: no data files under this prefix (looked for {', '.join(DATA_SUFFIXES)}); "
                f"found e.g. {', '.join(keys[:3])}"
            )
        return wanted

    return select


def resolve(text: str, s3: Any = None) -> LocalData:
    """Turn a data URI into a local file or directory (s3:// data fetched into the cache once,
    pvc:// found where kubetune.locations.local_path says, as for the model)."""
    try:
        uri = parse_uri(text)
    except ValueError as e:
        raise DataError(f"dataset uri {text!r}: {e}") from None
    if uri.scheme == "hf":
        return LocalData(text, Path(uri.path), "hf")
    from kubetune_trainer.locations import to_local

    try:
        path = to_local(text, s3, field="", select=_data_keys(text))
    except DataError:
        raise
    except JobError as e:  # the same one line, as the data error it is
        raise DataError(str(e)) from None
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if names & set(_DISK_MARKERS):
            return LocalData(text, path, "disk")
        return LocalData(text, path, "dir")
    return LocalData(text, path, "file")


def data_files(local: LocalData) -> list[tuple[Path, str]]:
    """(path, display name) of every file a resolved URI stands for, in reading order."""
    if local.kind == "file":
        if not _is_data_file(local.path.name):
            raise DataError(
                f"{local.uri}: unsupported file type {local.path.suffix!r}; "
                f"use {', '.join(DATA_SUFFIXES)} (optionally .gz) or a datasets save_to_disk directory"
            )
        return [(local.path, local.uri)]
    if local.kind != "dir":
        return []
    found = sorted(
        p
        for p in local.path.rglob("*")
        if p.is_file() and _is_data_file(p.name) and not p.name.startswith(".")
    )
    if not found:
        raise DataError(f"{local.uri}: directory holds no data files ({', '.join(DATA_SUFFIXES)})")
    base = local.uri.rstrip("/")
    return [(p, f"{base}/{p.relative_to(local.path).as_posix()}") for p in found]


# ---------------------------------------------------------------- reading rows


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115


def _open_bytes(path: Path) -> IO[bytes]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")  # noqa: SIM115


def _lines(path: Path) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """(line number, text) of every line, decoded one by one: a line that is not UTF-8 comes as
    its error, so it can be skipped like any bad row instead of failing the whole file."""
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, e


def _not_utf8(e: UnicodeDecodeError, lineno: int) -> str:
    return f"not UTF-8 text ({e.reason} at byte {e.start + 1} of line {lineno})"


def _first_bad_line(path: Path) -> str:
    """Where a whole-file format (JSON, CSV) stops being UTF-8, as `line N: ...` (never a file offset)."""
    for lineno, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            return f"line {lineno}: {_not_utf8(line, lineno)}"
    return "not UTF-8 text"  # pragma: no cover - only called after a decode error


def _suffix(path: Path) -> str:
    n = path.name.lower()
    if n.endswith(".gz"):
        n = n[:-3]
    return "." + n.rsplit(".", 1)[-1]


def _rows_json(path: Path, name: str, on_bad: Callable[[BadRowError], None]) -> Iterator[Row]:
    with _open_text(path) as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file, as `datasets` accepts
            yield from _rows_jsonl(path, name, on_bad)
            return
        raise DataError(f"{name}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(
                f"{name}: expected a JSON array of rows (or an object holding exactly one array), "
                f"got an object with keys {sorted(doc)[:8]}"
            )
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{name}: expected a JSON array of rows, got {type_name(doc)}")
    for i, item in enumerate(doc, 1):
        if not isinstance(item, dict):
            on_bad(BadRowError(name, i, None, f"expected an object, got {type_name(item)}"))
            continue
        yield Row(item, name, i)


def _rows_jsonl(path: Path, name: str, on_bad: Callable[[BadRowError], None]) -> Iterator[Row]:
    row = 0
    for lineno, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            row += 1
            on_bad(BadRowError(name, row, None, _not_utf8(line, lineno), lineno))
            continue
        if not line.strip():
            continue
        row += 1
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            on_bad(BadRowError(name, row, None, f"not valid JSON: {e.msg} at column {e.colno}", lineno))
            continue
        if not isinstance(item, dict):
            on_bad(BadRowError(name, row, None, f"expected an object, got {type_name(item)}", lineno))
            continue
        yield Row(item, name, row, lineno)


def _rows_csv(path: Path, name: str, delimiter: str) -> Iterator[Row]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for i, rec in enumerate(reader, 1):
            rec.pop(None, None)  # extra cells beyond the header
            yield Row(dict(rec), name, i, reader.line_num)


def _rows_txt(
    path: Path, name: str, text_column: str, on_bad: Callable[[BadRowError], None]
) -> Iterator[Row]:
    row = 0
    for lineno, line in _lines(path):
        if isinstance(line, UnicodeDecodeError):
            row += 1
            on_bad(BadRowError(name, row, None, _not_utf8(line, lineno), lineno))
            continue
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        row += 1
        yield Row({text_column: line}, name, row, lineno)


def _rows_parquet(path: Path, name: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"{name}: not a readable parquet file: {e}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            i += 1
            yield Row(item, name, i)


def _rows_disk(local: LocalData) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(local.path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{local.uri}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); "
                "point the uri at the split's directory"
            )
        ds = ds["train"]
    for i, item in enumerate(ds, 1):
        yield Row(dict(item), local.uri, i)


def _rows_hf(local: LocalData) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(str(local.path), split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise DataError(f"{local.uri}: cannot load from the Hugging Face hub here: {e}") from None
    for i, item in enumerate(ds, 1):
        yield Row(dict(item), local.uri, i)


def iter_file_rows(
    path: Path, name: str, *, text_column: str = "text", on_bad: Callable[[BadRowError], None] | None = None
) -> Iterator[Row]:
    """Rows of one data file."""
    on_bad = on_bad or BadRows("error")
    suffix = _suffix(path)
    try:
        if suffix == ".json":
            yield from _rows_json(path, name, on_bad)
        elif suffix in (".jsonl", ".ndjson"):
            yield from _rows_jsonl(path, name, on_bad)
        elif suffix == ".csv":
            yield from _rows_csv(path, name, ",")
        elif suffix == ".tsv":
            yield from _rows_csv(path, name, "\t")
        elif suffix == ".txt":
            yield from _rows_txt(path, name, text_column, on_bad)
        elif suffix == ".parquet":
            yield from _rows_parquet(path, name)
        else:  # pragma: no cover - filtered by data_files
            raise DataError(f"{name}: unsupported file type {suffix!r}")
    except UnicodeDecodeError:
        raise DataError(f"{name} {_first_bad_line(path)}") from None
    except csv.Error as e:
        raise DataError(f"{name}: malformed CSV: {e}") from None


def iter_rows(
    uri: str,
    s3: Any = None,
    *,
    text_column: str = "text",
    on_bad: Callable[[BadRowError], None] | None = None,
) -> Iterator[Row]:
    """Every row behind a data URI, lazily, in a fixed order (files sorted by path)."""
    local = resolve(uri, s3)
    if local.kind == "disk":
        yield from _rows_disk(local)
        return
    if local.kind == "hf":
        yield from _rows_hf(local)
        return
    for path, name in data_files(local):
        yield from iter_file_rows(path, name, text_column=text_column, on_bad=on_bad)


__all__ = [
    "BadRowError", "BadRows", "DataError", "LocalData", "Row", "data_files", "iter_file_rows",
    "iter_rows", "resolve", "type_name",
]  # fmt: skip
