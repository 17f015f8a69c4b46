"""`kubetune validate`: every bad input fails with one line naming the document, field and problem."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main
from kubetune.validate import SpecError, load_jobs_text
from tests.fixtures_spec import BAD_COMBINATIONS, BAD_FIELDS, BASE, EXAMPLES, set_field


def _with_affinity(yaml_lines: list[str]) -> str:
    """BASE with `yaml_lines` written as the body of spec.resources.affinity."""
    return (
        yaml.safe_dump(BASE)
        + "  resources:\n    affinity:\n"
        + "".join(f"      {line}\n" for line in yaml_lines)
    )


# Ten levels of ten aliases: 10**10 values once expanded, from a 1 KB file ("billion laughs").
ALIAS_BOMB = _with_affinity(
    ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
)

# Whole-document problems: (case id, file text, expected words)
BAD_DOCUMENTS = [
    ("empty-file", "", "empty file"),
    ("comments-only", "# nothing here\n", "empty file"),
    ("not-yaml", "spec: [unclosed\n  model: {", "not valid YAML at line"),
    ("tab-indented", "spec:\n\tmodel: x\n", "not valid YAML"),
    ("a-list", "- 1\n- 2\n", "must be a YAML mapping, got a list"),
    ("a-scalar", "hello\n", "must be a YAML mapping, got 'hello'"),
    ("wrong-kind", "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x}\n", "not a FineTuneJob"),
    ("wrong-version", yaml.safe_dump({**BASE, "apiVersion": "kubetune.io/v2"}), "not a FineTuneJob"),
    ("bad-name", yaml.safe_dump({**BASE, "metadata": {"name": "Bad_Name"}}), "metadata.name"),
    ("name-with-a-dot", yaml.safe_dump({**BASE, "metadata": {"name": "qwen2.5-lora"}}), "metadata.name: must be a DNS-1123 label"),
    ("name-too-long", yaml.safe_dump({**BASE, "metadata": {"name": "j" * 64}}), "metadata.name: must be a DNS-1123 label: at most 63"),
    ("name-ends-with-dash", yaml.safe_dump({**BASE, "metadata": {"name": "lora-"}}), "metadata.name: must be a DNS-1123 label"),
    ("no-spec", yaml.safe_dump({k: v for k, v in BASE.items() if k != "spec"}), "spec: required field is missing"),
    # hostile documents: refused before anything walks them
    ("alias-bomb", ALIAS_BOMB, "refused: the document expands to more than 10000 values"),
    ("alias-bomb-of-text", _with_affinity(["t: &t " + "x" * 60000, "l: [" + ", ".join(["*t"] * 20) + "]"]), "1 MiB of text"),
    ("recursive-alias", _with_affinity(["a: &a {b: *a}"]), "refused: a YAML alias refers to a node that contains it"),
    ("deep-nesting", "spec: " + "[" * 100000 + "]" * 100000 + "\n", "refused: the document nests deeper than 64 levels"),
]  # fmt: skip


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_jobs_text(text, "job.yaml")
    return [str(p) for p in e.value.problems]


def test_there_are_at_least_40_distinct_bad_inputs() -> None:
    ids = [c[0] for c in BAD_FIELDS + BAD_COMBINATIONS + BAD_DOCUMENTS]
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("case,path,value,field,words", BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_field(case: str, path: str, value: Any, field: str, words: str) -> None:
    lines = _problems(yaml.safe_dump(set_field(BASE, path, value)))
    assert any(line.startswith(f"job.yaml (job): {field}: ") and words in line for line in lines), lines


@pytest.mark.parametrize("case,patch,field,words", BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS])
def test_bad_combination(case: str, patch: dict[str, Any], field: str, words: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(patch)
    lines = _problems(yaml.safe_dump(doc))
    assert any(f": {field}: " in line and words in line for line in lines), lines


@pytest.mark.parametrize("case,text,words", BAD_DOCUMENTS, ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_document(case: str, text: str, words: str) -> None:
    lines = _problems(text)
    assert any(line.startswith("job.yaml") and words in line for line in lines), lines


def test_render_refuses_an_alias_bomb_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert main(["render", str(bomb)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{bomb}: refused: the document expands to more than 10000 values")


def test_minimal_job_gets_defaults() -> None:
    (job,) = load_jobs_text(yaml.safe_dump(BASE))
    assert job.spec.method == "sft"
    assert job.spec.pet_config.pet_type == "lora"
    assert job.spec.parallel_config.nnodes == 1
    assert job.spec.checkpoint_uri() == "s3://runs/job/checkpoints"


def test_scientific_notation_is_a_number_like_in_kubernetes() -> None:
    # PyYAML alone reads `2e-4` as a string; users write it this way and Kubernetes reads a number.
    text = yaml.safe_dump(BASE).replace("spec:\n", "spec:\n  training: {learning_rate: 2e-4}\n", 1)
    (job,) = load_jobs_text(text)
    assert job.spec.training.learning_rate == pytest.approx(2e-4)


def test_multi_document_names_each_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = yaml.safe_dump(BASE)
    bad = yaml.safe_dump(
        set_field(set_field(BASE, "metadata.name", "second"), "spec.parallel_config.nnodes", 0)
    )
    f = tmp_path / "jobs.yaml"
    f.write_text(good + "---\n" + bad)
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{f}#2 (second): spec.parallel_config.nnodes: must be >= 1, got 0"]


def test_every_problem_is_reported_not_just_the_first() -> None:
    doc = set_field(set_field(BASE, "spec.pet_config.lora_rank", 0), "spec.training.learning_rate", -1.0)
    lines = _problems(yaml.safe_dump(doc))
    assert len(lines) == 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    assert main(["validate", "-q", str(path)]) == 0


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(set_field(BASE, "spec.pet_config.lora_rank", 0)))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(bad), *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if ": warning: " not in line]  # ./runs/tiny-qwen2
    assert errors == [f"{bad} (job): spec.pet_config.lora_rank: must be >= 1, got 0"]
    ok = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", *map(str, EXAMPLES)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr


def test_validate_warns_about_local_paths_that_do_not_exist(tmp_path: Path) -> None:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    doc = set_field(set_field(BASE, "spec.model.uri", str(model)), "spec.dataset.uri", "data/train.jsonl")
    doc = set_field(doc, "spec.model.adapter_uri", "/opt/adapters/sft")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(job)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr  # a warning: the path may be meant for inside the image
    assert run.stdout.strip() == f"{job}: job: valid (sft, lora)"
    assert run.stderr.splitlines() == [
        f"{job} (job): spec.model.adapter_uri: warning: /opt/adapters/sft does not exist on this machine; "
        "fine if it is a path inside the trainer image",
        f"{job} (job): spec.dataset.uri: warning: data/train.jsonl does not exist here (a relative path is "
        f"read from the current directory, now {tmp_path}); fine if it is a path inside the trainer image",
    ]


def test_validate_reads_local_data_and_names_the_bad_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    data = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Capital of France?", "chosen": "Paris"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = set_field(
        set_field(BASE, "spec.method", "dpo"), "spec.dataset", {"uri": str(data), "format": "preference"}
    )
    job = tmp_path / "dpo.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert "prefs.jsonl row 2: field 'rejected'" in err and "spec.dataset" in err
    assert main(["validate", "--no-data", str(job)]) == 0
