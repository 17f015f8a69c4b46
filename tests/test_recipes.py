"""One recipe per training method: the core's table (kubetune/methods.py) and the trainer's recipes
(kubetune_trainer/recipes/) name the same methods, every row's examples exist and validate, and no
product code outside those two branches on a method's name."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune import methods as table
from kubetune import spec as s
from kubetune.validate import load_job

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [
    ROOT / "kubetune",
    ROOT / "operator" / "kubetune_operator",
    ROOT / "trainer_image" / "kubetune_trainer",
]
# where a method's name may decide something: the table and the recipes
ALLOWED = [ROOT / "kubetune" / "methods.py", ROOT / "trainer_image" / "kubetune_trainer" / "recipes"]


def method_branches(text: str, names: tuple[str, ...] = table.METHOD_NAMES) -> list[str]:
    """Comparisons of something called `method` with a method's name: == / != either way round,
    in / not in a literal list or tuple (Python or CEL)."""
    name = "|".join(map(re.escape, names))
    lit = rf"""["'](?:{name})["']"""
    patterns = [
        rf"\bmethod\s*(?:==|!=)\s*{lit}",
        rf"{lit}\s*(?:==|!=)\s*[\w.\[\]()]*\bmethod\b",
        rf"\bmethod\s+(?:not\s+)?in\s*[\[(][^\])]*{lit}",
    ]
    return [m.group(0) for p in patterns for m in re.finditer(p, text)]


def test_the_branch_finder_finds_branches() -> None:
    """The pattern itself, on the kinds of branch the recipes replaced."""
    for line in (
        'if spec.method == "dpo":',
        "if data.method != 'pretrain':",
        'truncate = "pretrain" != self.method',
        'if job.spec.method in ("sft", "pretrain"):',
        "if method not in ['dpo']:",
        "\"self.method != 'dpo' || self.dataset.format in ['auto']\"",
    ):
        assert method_branches(line), line
    for line in (
        "method = spec.method",
        'f"{spec.method} run"',
        'if pet_type == "lora":',
        "if a.method == 'lora':",
    ):
        assert not method_branches(line), line


def test_no_method_branches_outside_the_table_and_the_recipes() -> None:
    found = []
    for root in PRODUCT:
        for path in sorted(root.rglob("*.py")):
            if any(path == a or a in path.parents for a in ALLOWED):
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                found += [f"{path.relative_to(ROOT)}:{n}: {hit}" for hit in method_branches(line)]
    assert not found, (
        "decide by the method's row of kubetune.methods.METHODS (or in its recipe) instead:\n"
        + "\n".join(found)
    )


def test_the_registry_holds_exactly_the_tables_methods() -> None:
    from kubetune_trainer import recipes
    from kubetune_trainer.recipes import Recipe

    registry = recipes.registry()
    assert set(registry) == set(table.METHODS)
    for name, recipe in registry.items():
        assert isinstance(recipe, Recipe) and recipe.method == name and recipe.info is table.METHODS[name]
    assert typing.get_args(s.Method) == table.METHOD_NAMES
    with pytest.raises(KeyError, match="known: sft, dpo, pretrain"):
        recipes.get("ppo")


@pytest.mark.parametrize("name", table.METHOD_NAMES)
def test_every_methods_examples_exist_and_validate(name: str) -> None:
    row = table.METHODS[name]
    for example in (row.example, row.local_example):
        path = ROOT / example
        assert path.is_file(), example
        job = load_job(path)
        assert job.spec.method == name, example
        assert job.spec.dataset.format in ("auto", *row.reads), example


def test_every_format_has_a_parser_and_detectable_columns() -> None:
    from kubetune_trainer.formats import FORMATS, PARSERS, Columns

    assert tuple(PARSERS) == FORMATS == tuple(table.FORMATS)
    assert typing.get_args(s.DatasetFormat) == table.FORMAT_NAMES
    mapping = set(s.ColumnMapping.model_fields)
    for fmt in table.FORMATS.values():
        assert fmt.columns and set(fmt.columns) <= mapping <= set(vars(Columns())), fmt.name
    for m in table.METHODS.values():
        assert set(m.reads) <= set(m.detect) <= set(table.FORMATS), m.name
        assert m.auto_format is None or m.auto_format in m.formats, m.name


def _spec(method: str, fmt: str, text_column: bool = False) -> SimpleNamespace:
    columns = SimpleNamespace(text="body") if text_column else None
    return SimpleNamespace(method=method, dataset=SimpleNamespace(format=fmt, columns=columns))


def test_the_dataset_format_is_resolved_in_one_place() -> None:
    """auto: the method's own format, or left to the first row; pretrain reads a chat source's mapped
    text column as text."""
    expected = {("sft", "auto"): "auto", ("dpo", "auto"): "preference", ("pretrain", "auto"): "text",
                ("sft", "sharegpt"): "sharegpt", ("pretrain", "alpaca"): "text", ("pretrain", "text"): "text"}  # fmt: skip
    for (method, fmt), resolved in expected.items():
        assert table.main_format(method, fmt) == resolved
    job = s.FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "m"},
            "method": "pretrain",
            "output": {"uri": "o"},
            "dataset": {"uri": "d.json", "format": "sharegpt", "columns": {"text": "body"}},
        }  # fmt: skip
    )
    assert job.dataset_format() == "text"


def test_a_new_row_is_all_the_rules_need(monkeypatch: pytest.MonkeyPatch) -> None:
    """One more method that trains on preference pairs: the rules name it with dpo, refuse its
    other formats, and leave the other methods' rules as they were."""
    dpo = table.METHODS["dpo"]
    newpo = table.Method(
        **{**vars(dpo), "name": "newpo", "format_message": "method newpo needs a preference dataset"}
    )
    before = {r.cel: r.message for r in table.format_rules()}
    monkeypatch.setitem(table.METHODS, "newpo", newpo)
    rules = table.format_rules()
    messages = {r.message for r in rules}
    refused = f"a preference dataset needs method {table.join_or(table.methods_reading('preference'))}"
    assert refused.startswith("a preference dataset needs method dpo, ") and refused.endswith(" or newpo")
    assert refused in messages
    assert "method newpo needs a preference dataset" in messages
    kept = [cel for cel in before if "needs method" not in before[cel]]
    assert set(kept) <= {r.cel for r in rules}

    def problems(spec: SimpleNamespace) -> list[str]:
        return [r.message for r in rules if not r.check(spec)]

    assert problems(_spec("newpo", "preference")) == problems(_spec("newpo", "auto")) == []
    assert problems(_spec("newpo", "alpaca")) == ["method newpo needs a preference dataset"]
    assert problems(_spec("sft", "preference")) == [refused]
    assert problems(_spec("pretrain", "preference", text_column=True)) == [refused]


def test_auto_detection_follows_the_methods_row() -> None:
    from kubetune_trainer.data_sources import DataError, Row
    from kubetune_trainer.formats import Columns, detect_format

    def detect(data: dict, method: str) -> str:
        return detect_format(Row(data, "f.json", 1), Columns(), method)

    both = {"text": "t", "conversations": []}
    assert detect(both, "pretrain") == "text"  # pretrain tries text first
    assert detect(both, "sft") == "sharegpt"  # sft takes the conversation
    assert detect({"foo": 1}, "dpo") == "preference"  # one format: its parser names what is missing
    pair = {"conversations": [], "chosen": "c", "rejected": "r"}
    assert detect(pair, "pretrain") == "sharegpt"
    with pytest.raises(
        DataError, match="which method sft does not read; preference data trains with method dpo"
    ):
        detect(pair, "sft")


def test_the_recipes_ship_with_the_trainer_package() -> None:
    """The trainer image installs the package non-editable: every subpackage must be listed."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    trainer = ROOT / "trainer_image" / "kubetune_trainer"
    subpackages = {
        ".".join(("kubetune_trainer", *p.parent.relative_to(trainer).parts))
        for p in trainer.rglob("__init__.py")
    }
    assert "kubetune_trainer.recipes" in subpackages and subpackages <= listed


def test_pair_methods_count_the_tokens_of_both_replies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tokens/s is the same figure for every method trained on pairs: DPO concatenates both sides into
    input_ids; SimPO and ORPO (TRL's CPO and ORPO trainers) keep chosen_* and rejected_* apart, and
    were counted as no tokens at all (with a warning at every step)."""
    from kubetune_trainer.tiny import build_tiny_model
    from kubetune_trainer.train import run_training
    from tests.fixtures_preference import make_job, write_preferences

    model = build_tiny_model(tmp_path / "tiny")
    prefs = write_preferences(tmp_path / "prefs.jsonl", 8)
    seen = {}
    for method in ("dpo", "simpo", "orpo"):
        job = make_job(method, model, prefs, tmp_path / f"out-{method}", method=method,
                       training={"max_steps": 2, "per_device_train_batch_size": 4})  # fmt: skip
        seen[method] = run_training(job, workdir=tmp_path / f"work-{method}").tokens_seen
    assert seen["dpo"] > 0 and seen["simpo"] == seen["orpo"] == seen["dpo"], seen
    assert "Tried to track the number of tokens seen" not in caplog.text
