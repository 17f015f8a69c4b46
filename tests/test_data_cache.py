"""The tokenized-data cache: a second start of a job loads the rows the first one built (no tokenizing),
any change to what the rows depend on builds them again, the rows and batches are the same as without
the cache, a damaged entry is rebuilt after one warning line, and s3:// outputs work like local ones."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.data_cache import cache_uri, cached_build_data, lookup
from kubetune_trainer.recipes.sft import SFTRecipe
from tests.fixtures_data import EXAMPLE_DATA, make_job, write_rows


class CountingSFT(SFTRecipe):
    """The real SFT recipe, counting how often it builds (reads and tokenizes) the data."""

    def __init__(self) -> None:
        self.builds = 0

    def build_data(self, job: Any, tokenizer: Any, **kwargs: Any) -> Any:
        self.builds += 1
        return super().build_data(job, tokenizer, **kwargs)


def _job(data: Path | str, output: Path | str, *, storage: dict | None = None, **changes: Any) -> Any:
    """An SFT job on `data` writing to `output`; `changes`: {"dataset.system_prompt": "..."}."""
    dataset: dict[str, Any] = {"uri": str(data), "format": "alpaca", "validation_split": 0.1}
    training: dict[str, Any] = {"seq_length": 96, "packing": True}
    for path, value in changes.items():
        section, field = path.split(".")
        {"dataset": dataset, "training": training}[section][field] = value
    job = make_job(dataset, training=training, storage=storage)
    doc = job.model_dump(mode="json", exclude_none=True)
    doc["spec"]["output"]["uri"] = str(output)
    return type(job).model_validate(doc)


@pytest.fixture
def alpaca(tmp_path: Path) -> Path:
    rows = json.loads((EXAMPLE_DATA / "alpaca_en_200.json").read_text())[:60]
    return write_rows(tmp_path / "data" / "alpaca.jsonl", rows)


def _rows(ds: Any) -> list[dict[str, Any]]:
    return ds.to_list() if ds is not None else []


def _same(a: Any, b: Any) -> None:
    assert _rows(a.train_dataset) == _rows(b.train_dataset)
    assert _rows(a.eval_dataset) == _rows(b.eval_dataset)
    assert a.stats == b.stats and a.packed == b.packed and a.method == b.method
    assert a.end_of_turn_token_ids == b.end_of_turn_token_ids
    assert a.data_collator == b.data_collator


def test_second_build_is_a_hit_without_tokenizing(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    job = _job(alpaca, tmp_path / "out")
    recipe = CountingSFT()
    first, outcome = cached_build_data(recipe, job, tokenizer, seed=42)
    assert outcome.status == "miss" and outcome.wrote and recipe.builds == 1
    entry = Path(outcome.uri)
    assert entry.parent == tmp_path / "out" / "cache" / "data" and (entry / "COMMITTED").is_file()
    assert (entry / "train" / "dataset_info.json").is_file() and (entry / "eval").is_dir()
    # the run trains on the written entry, memory-mapped, not on rows held in the process
    assert first.train_dataset.cache_files[0]["filename"].startswith(str(entry))

    second, outcome2 = cached_build_data(recipe, job, tokenizer, seed=42)
    assert outcome2.status == "hit" and outcome2.uri == outcome.uri
    assert recipe.builds == 1  # loaded, not read and tokenized again
    _same(second, first)
    assert "hit" in outcome2.describe()


@pytest.mark.parametrize(
    "change",
    [
        {"dataset.system_prompt": "Answer briefly."},
        {"dataset.apply_chat_template": True},
        {"dataset.validation_split": 0.2},
        {"training.seq_length": 64},
        {"training.packing": False},
        {"training.group_by_length": True},
        {"training.seed": 7},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_spec_change_that_changes_the_rows_builds_again(
    change: dict[str, Any], tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    recipe = CountingSFT()
    job = _job(alpaca, tmp_path / "out")
    cached_build_data(recipe, job, tokenizer, seed=job.spec.training.seed)
    changed = _job(alpaca, tmp_path / "out", **change)
    built, outcome = cached_build_data(recipe, changed, tokenizer, seed=changed.spec.training.seed)
    assert outcome.status == "miss" and recipe.builds == 2
    _same(built, SFTRecipe().build_data(changed, tokenizer, seed=changed.spec.training.seed))
    # and the earlier key is still a hit
    assert cached_build_data(recipe, job, tokenizer, seed=job.spec.training.seed)[1].status == "hit"


def test_a_training_change_that_keeps_the_rows_is_a_hit(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    recipe = CountingSFT()
    cached_build_data(recipe, _job(alpaca, tmp_path / "out"), tokenizer, seed=42)
    other = _job(alpaca, tmp_path / "out", **{"training.learning_rate": 1e-3, "training.max_steps": 3})
    assert cached_build_data(recipe, other, tokenizer, seed=42)[1].status == "hit" and recipe.builds == 1


def test_changed_data_file_or_tokenizer_builds_again(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    recipe = CountingSFT()
    job = _job(alpaca, tmp_path / "out")
    cached_build_data(recipe, job, tokenizer, seed=42)

    rows = [json.loads(line) for line in alpaca.read_text().splitlines()]
    rows[3]["output"] = "A different answer."
    write_rows(alpaca, rows)
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "miss" and recipe.builds == 2

    from kubetune_trainer.tiny import CHATML_TEMPLATE, build_tokenizer

    other = build_tokenizer()
    other.chat_template = CHATML_TEMPLATE + "{# another template #}"
    assert cached_build_data(recipe, job, other, seed=42)[1].status == "miss" and recipe.builds == 3
    bigger = build_tokenizer(vocab_size=1024)
    assert cached_build_data(recipe, job, bigger, seed=42)[1].status == "miss" and recipe.builds == 4
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "hit" and recipe.builds == 4


def test_a_tokenizer_directory_is_keyed_by_its_files(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    recipe = CountingSFT()
    job = _job(alpaca, tmp_path / "out")
    cached_build_data(recipe, job, AutoTokenizer.from_pretrained(tok_dir), seed=42)
    assert cached_build_data(recipe, job, AutoTokenizer.from_pretrained(tok_dir), seed=42)[1].status == "hit"
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1234
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert cached_build_data(recipe, job, AutoTokenizer.from_pretrained(tok_dir), seed=42)[1].status == "miss"


def test_damaged_entry_is_rebuilt_with_one_warning(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = CountingSFT()
    job = _job(alpaca, tmp_path / "out")
    outcome = cached_build_data(recipe, job, tokenizer, seed=42)[1]  # (its rows, mapped, let go)
    entry = Path(outcome.uri)
    arrow = next((entry / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated in place: damaged on disk
    with caplog.at_level(logging.WARNING, logger="kubetune.data"):
        built, again = cached_build_data(recipe, job, tokenizer, seed=42)
    assert again.status == "rebuilt" and again.wrote and recipe.builds == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tokenizing again" in warnings[0].getMessage()
    assert warnings[0].exc_info is None and "train/" in warnings[0].getMessage()
    _same(built, SFTRecipe().build_data(job, tokenizer, seed=42))
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "hit" and recipe.builds == 2

    (entry / "COMMITTED").write_text("{not json")
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "rebuilt"
    shutil.rmtree(entry / "eval")
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "rebuilt"
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "hit" and recipe.builds == 4


def test_other_ranks_read_what_rank_0_wrote_and_never_write(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = CountingSFT()
    job = _job(alpaca, tmp_path / "out")
    monkeypatch.setenv("KUBETUNE_DATA_CACHE_WAIT_SECONDS", "0")
    built, outcome = cached_build_data(recipe, job, tokenizer, seed=42, rank=1)  # rank 0 never wrote it
    assert outcome.status == "miss" and not outcome.wrote and recipe.builds == 1
    assert not (tmp_path / "out" / "cache").exists()
    cached_build_data(recipe, job, tokenizer, seed=42, rank=0)
    hit, outcome = cached_build_data(recipe, job, tokenizer, seed=42, rank=3)
    assert outcome.status == "hit" and recipe.builds == 2
    _same(hit, built)


def test_other_ranks_wait_for_rank_0_to_build_it(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    job = _job(alpaca, tmp_path / "out")
    monkeypatch.setenv("KUBETUNE_DATA_CACHE_WAIT_SECONDS", "120")
    rank1 = CountingSFT()
    got: list[Any] = []
    waiter = threading.Thread(
        target=lambda: got.append(cached_build_data(rank1, job, tokenizer, seed=42, rank=1))
    )
    waiter.start()
    built, outcome = cached_build_data(CountingSFT(), job, tokenizer, seed=42, rank=0)
    waiter.join(timeout=60)
    assert outcome.wrote and got and got[0][1].status == "hit" and rank1.builds == 0
    _same(got[0][0], built)
    assert not (Path(outcome.uri) / "BUILDING").exists()


def test_streaming_and_hub_data_are_not_cached(tokenizer: Any, tmp_path: Path, data_cache: Path) -> None:
    from kubetune_trainer import recipes

    job = make_job(
        {"uri": str(EXAMPLE_DATA / "c4_118.jsonl"), "streaming": True}, method="pretrain",
        training={"max_steps": 3, "seq_length": 64},
    )  # fmt: skip
    _, outcome = cached_build_data(recipes.get("pretrain"), job, tokenizer, seed=42)
    assert outcome.status == "off" and "streaming" in outcome.reason
    hub = _job("hf://org/data", tmp_path / "out")
    assert lookup(SFTRecipe(), hub, tokenizer, seed=42)[1].status == "off"


def test_inspect_data_says_whether_the_cache_holds_the_rows(
    tokenizer: Any, alpaca: Path, tmp_path: Path, data_cache: Path
) -> None:
    from kubetune_trainer.inspect_data import inspect_data

    job = _job(alpaca, tmp_path / "out")
    out = io.StringIO()
    inspect_data(job, samples=1, tokenizer=tokenizer, file=out)
    assert f"data cache: miss: training tokenizes and writes {cache_uri(job)}/" in out.getvalue()
    assert not (tmp_path / "out" / "cache").exists()  # inspect-data only reads
    cached_build_data(SFTRecipe(), job, tokenizer, seed=42)
    out = io.StringIO()
    stats = inspect_data(job, samples=1, tokenizer=tokenizer, file=out)
    assert f"data cache: hit ({cache_uri(job)}/" in out.getvalue()
    assert stats == SFTRecipe().build_data(job, tokenizer, seed=42).stats


def test_s3_output_and_s3_data(tokenizer: Any, s3: Any, alpaca: Path, data_cache: Path) -> None:
    storage = {"s3": s3.settings.model_dump(mode="json", exclude_none=True)}
    s3.store("data").put_file(alpaca, "alpaca.jsonl")
    job = _job(s3.uri("data/alpaca.jsonl"), s3.uri("out"), storage=storage)
    recipe = CountingSFT()
    first, outcome = cached_build_data(recipe, job, tokenizer, seed=42)
    assert outcome.wrote and outcome.uri.startswith(s3.uri("out/cache/data/"))
    keys = s3.keys("out/cache/data/")
    assert any(k.endswith("/COMMITTED") for k in keys) and any("/train/" in k for k in keys)
    key = outcome.uri.rsplit("/", 1)[1]
    local = data_cache / "data" / key  # this node keeps what it uploaded, as if fetched
    assert first.train_dataset.cache_files[0]["filename"].startswith(str(local))

    shutil.rmtree(data_cache)  # another node: nothing fetched here yet
    second, outcome = cached_build_data(recipe, job, tokenizer, seed=42)
    assert outcome.status == "hit" and recipe.builds == 1
    _same(second, first)
    assert not any((data_cache / "fetched").glob("alpaca*"))  # the raw data was not downloaded

    rows = [json.loads(line) for line in alpaca.read_text().splitlines()][:-1]
    write_rows(alpaca, rows)
    s3.store("data").put_file(alpaca, "alpaca.jsonl")  # a new ETag
    _, outcome = cached_build_data(recipe, job, tokenizer, seed=42)
    assert outcome.status == "miss" and outcome.wrote and recipe.builds == 2

    # a damaged object in the store: fetched, found short, rebuilt
    key = outcome.uri.removeprefix(s3.uri() + "/")
    arrow = next(k for k in s3.keys(f"{key}/train/") if k.endswith(".arrow"))
    s3.store().put_bytes(arrow, b"garbage")
    shutil.rmtree(data_cache / "data")
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "rebuilt" and recipe.builds == 3
    shutil.rmtree(data_cache / "data")
    assert cached_build_data(recipe, job, tokenizer, seed=42)[1].status == "hit" and recipe.builds == 3


def test_a_restart_trains_on_the_same_batches_from_the_cache(
    train_job: Any, alpaca: Path, tmp_path: Path, data_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetune_trainer.train import run_training

    job = train_job(
        tmp_path / "out", training={"max_steps": 6, "packing": True, "optimizer": "adamw_torch"},
        dataset={"uri": str(alpaca), "validation_split": 0.2},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="kubetune"):
        first = run_training(job, workdir=tmp_path / "w1")
    assert "data cache: miss, tokenized; written to" in caplog.text
    caplog.clear()
    shutil.rmtree(tmp_path / "out" / "final")
    with caplog.at_level(logging.INFO, logger="kubetune"):
        second = run_training(job, workdir=tmp_path / "w2")
    assert "data cache: hit" in caplog.text
    losses = [[h["loss"] for h in r.log_history if "loss" in h] for r in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    assert first.eval_loss == second.eval_loss and first.tokens_seen == second.tokens_seen


def test_the_memory_tokenizing_used_goes_back_to_the_os() -> None:
    """What a build leaves free (token-id lists, Arrow buffers) would otherwise stay resident for the
    whole run: glibc and Arrow's pool keep it."""
    import subprocess
    import sys

    code = (
        "import random, pyarrow as pa\n"
        "from kubetune_trainer.startup import memory_mib\n"
        "from kubetune_trainer.data_cache import release_build_memory\n"
        "base = memory_mib()[0]\n"
        "rows = [[random.randrange(50000) for _ in range(300)] for _ in range(20000)]\n"
        "table = pa.table({'input_ids': rows})\n"
        "del rows, table\n"
        "held = memory_mib()[0]\n"
        "release_build_memory()\n"
        "print(held - base, memory_mib()[0] - base)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    held, after = map(float, out.stdout.split())
    assert held > 100 and after < held / 2, (held, after)
