"""Every source type and file format loads, rows are numbered, bad rows are named or skipped."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kubetune_trainer.data_sources import BadRowError, BadRows, DataError, iter_rows
from tests.fixtures_data import EXAMPLE_DATA, SHARED_DATA, write_rows

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "1+1", "output": "2"},
    {"instruction": "Name a color", "input": "", "output": "Blue"},
]


def _data(uri: str, **kw) -> list[dict]:
    return [r.data for r in iter_rows(uri, **kw)]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_file_formats_load(tmp_path: Path, suffix: str) -> None:
    path = write_rows(tmp_path / f"data{suffix}", ROWS)
    rows = list(iter_rows(str(path)))
    assert [r.data for r in rows] == ROWS
    assert [r.row for r in rows] == [1, 2, 3]
    assert rows[0].file == str(path)


def test_file_uri_and_gzip_and_tsv(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    assert _data(f"file://{path}") == ROWS
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert _data(str(gz)) == ROWS
    tsv = tmp_path / "data.tsv"
    tsv.write_text(
        "instruction\tinput\toutput\n"
        + "".join(f"{r['instruction']}\t{r['input']}\t{r['output']}\n" for r in ROWS)
    )
    assert _data(str(tsv)) == ROWS


def test_txt_one_row_per_nonblank_line(tmp_path: Path) -> None:
    p = tmp_path / "corpus.txt"
    p.write_text("first document\n\nsecond document\nthird\n")
    rows = list(iter_rows(str(p)))
    assert [r.data for r in rows] == [
        {"text": "first document"},
        {"text": "second document"},
        {"text": "third"},
    ]
    assert [(r.row, r.line) for r in rows] == [(1, 1), (2, 3), (3, 4)]
    assert [r.data for r in iter_rows(str(p), text_column="body")][0] == {"body": "first document"}


def test_json_object_holding_rows_and_json_lines_in_json(tmp_path: Path) -> None:
    p = tmp_path / "wrapped.json"
    p.write_text(json.dumps({"version": 1, "data": ROWS}))
    assert _data(str(p)) == ROWS
    p2 = tmp_path / "lines.json"
    p2.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert _data(str(p2)) == ROWS


def test_directory_of_files_in_sorted_order(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    write_rows(d / "b.jsonl", ROWS[1:])
    write_rows(d / "a.json", ROWS[:1])
    (d / "notes.md").write_text("not data")
    rows = list(iter_rows(str(d)))
    assert [r.data for r in rows] == ROWS
    assert rows[0].file.endswith("corpus/a.json") and rows[1].file.endswith("corpus/b.jsonl")


def test_save_to_disk_dataset_and_datasetdict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "ds"))
    assert _data(str(tmp_path / "ds")) == ROWS
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert _data(str(tmp_path / "dd")) == ROWS
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "nodtrain"))
    with pytest.raises(DataError, match="without a 'train' split"):
        _data(str(tmp_path / "nodtrain"))


def test_pvc_uri_reads_the_claim_where_kubetune_pvc_root_puts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the model loader does: $KUBETUNE_PVC_ROOT/<claim>/<path> outside the cluster."""
    write_rows(tmp_path / "claims" / "my-claim" / "sft" / "data.jsonl", ROWS)
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "claims"))
    assert _data("pvc://my-claim/sft/data.jsonl") == ROWS
    with pytest.raises(DataError, match="is the claim mounted"):
        _data("pvc://other-claim/data.jsonl")


def test_shared_public_data_loads() -> None:
    for name in ("alpaca_en_200.json", "dpo_en_100.json", "c4_118.jsonl"):
        rows = list(iter_rows(str(EXAMPLE_DATA / name)))
        assert len(rows) in (200, 100, 118)
    if SHARED_DATA.exists():
        assert sum(1 for _ in iter_rows(str(SHARED_DATA / "identity.json"))) == 91


def test_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        _data(str(tmp_path / "nope.json"))
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(DataError, match="unsupported file type"):
        _data(str(tmp_path / "x.xlsx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        _data(str(tmp_path / "empty"))
    (tmp_path / "broken.json").write_text('[{"a": 1},')
    with pytest.raises(DataError, match="not valid JSON"):
        _data(str(tmp_path / "broken.json"))


def test_bad_jsonl_line_named_or_skipped(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": oops}\n[1, 2]\n{"text": "b"}\n')
    with pytest.raises(BadRowError) as err:
        _data(str(p))
    assert str(err.value).startswith(f"{p} row 2 (line 3): not valid JSON")
    skip = BadRows("skip")
    assert _data(str(p), on_bad=skip) == [{"text": "a"}, {"text": "b"}]
    assert skip.count == 2
    assert "row 3 (line 4): expected an object, got a list" in skip.first[1]


# Line-based files with one line that is not UTF-8 (a Latin-1 "é" in row 2, after a blank line):
# (case id, file name, good rows around it)
NOT_UTF8_LINES = [
    ("jsonl", "data.jsonl", [b'{"text": "a"}', b'{"text": "caf\xe9"}', b'{"text": "b"}'], [{"text": "a"}, {"text": "b"}]),
    ("jsonl-gz", "data.jsonl.gz", [b'{"text": "a"}', b'{"text": "caf\xe9"}', b'{"text": "b"}'], [{"text": "a"}, {"text": "b"}]),
    ("txt", "corpus.txt", [b"first", b"caf\xe9 au lait", b"second"], [{"text": "first"}, {"text": "second"}]),
]  # fmt: skip


@pytest.mark.parametrize("case,name,lines,good", NOT_UTF8_LINES, ids=[c[0] for c in NOT_UTF8_LINES])
def test_a_line_that_is_not_utf8_is_a_bad_row_named_by_line(
    tmp_path: Path, case: str, name: str, lines: list[bytes], good: list[dict]
) -> None:
    body = lines[0] + b"\n\n" + b"\n".join(lines[1:]) + b"\n"
    p = tmp_path / name
    p.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    with pytest.raises(BadRowError) as err:
        _data(str(p))
    byte = lines[1].index(b"\xe9") + 1
    assert (
        str(err.value)
        == f"{p} row 2 (line 3): not UTF-8 text (invalid continuation byte at byte {byte} of line 3)"
    )
    skip = BadRows("skip")
    assert _data(str(p), on_bad=skip) == good
    assert skip.count == 1


@pytest.mark.parametrize("name", ["data.json", "data.csv"])
def test_whole_file_formats_name_the_line_that_is_not_utf8(tmp_path: Path, name: str) -> None:
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "caf\u00e9", "output": "c"}]
    p = write_rows(tmp_path / name, rows)
    p.write_bytes(p.read_bytes().replace("\u00e9".encode(), b"\xe9"))
    bad_line = next(i for i, line in enumerate(p.read_bytes().split(b"\n"), 1) if b"\xe9" in line)
    with pytest.raises(
        DataError,
        match=rf"^{p} line {bad_line}: not UTF-8 text \(invalid continuation byte at byte \d+ of line {bad_line}\)$",
    ):
        _data(str(p))


def test_s3_file_and_prefix(s3, data_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    store = s3.store("datasets")
    store.put_file(write_rows(tmp_path / "one.jsonl", ROWS), "sft/one.jsonl")
    store.put_file(write_rows(tmp_path / "a.parquet", ROWS[:2]), "corpus/a.parquet")
    store.put_file(write_rows(tmp_path / "b.json", ROWS[2:]), "corpus/b.json")
    store.put_bytes("corpus/README.md", b"ignored")

    rows = list(iter_rows(s3.uri("datasets/sft/one.jsonl"), s3.settings))
    assert [r.data for r in rows] == ROWS
    assert rows[0].file == s3.uri("datasets/sft/one.jsonl")
    assert [r.data for r in iter_rows(s3.uri("datasets/corpus"), s3.settings)] == ROWS
    # downloaded once into the cache: a second read works with the store gone
    s3.pause()
    try:
        assert _data(s3.uri("datasets/sft/one.jsonl"), s3=s3.settings) == ROWS
    finally:
        s3.resume()
    assert any(data_cache.rglob("one.jsonl"))
    with pytest.raises(DataError, match="no such object"):
        _data(s3.uri("datasets/sft/missing.jsonl"), s3=s3.settings)


def test_s3_save_to_disk_directory(
    s3, data_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import datasets

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    s3.store("disk").upload_dir(tmp_path / "ds", "")
    assert _data(s3.uri("disk"), s3=s3.settings) == ROWS
