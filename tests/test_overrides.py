"""`--set PATH=VALUE`: one field of a job changed on the command line, validated like the file.

The path is under `spec` (written out or not), the value is read as YAML; a bad value gets the
file's one-line error naming the field, plus the --set that gave it; a path that names no field is
refused. `kubetune validate`, `render` and `run` take it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.overrides import OverrideError, apply_overrides
from kubetune.validate import SpecError, load_job, load_jobs
from tests.fixtures_cli import cli_env, kubetune
from tests.fixtures_data import REPO
from tests.fixtures_train import write_job_file

JOB = REPO / "examples" / "local-lora.yaml"


def _doc() -> dict[str, Any]:
    return yaml.safe_load(JOB.read_text())


def _problems(*sets: str, path: Path = JOB) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_jobs(path, sets)
    return [str(p) for p in e.value.problems]


def test_values_are_yaml_scalars_and_the_path_is_under_spec() -> None:
    job = load_job(
        JOB,
        [
            "training.learning_rate=1e-4",  # a float, as in the file (not the string PyYAML reads)
            "pet_config.lora_rank=16",
            "spec.pet_config.lora_alpha=64",  # spec. written out
            "training.gradient_checkpointing=true",
            "pet_config.target_modules=[q_proj, v_proj]",
            "metadata.name=lora-lr-1e-4",
        ],
    )
    assert job.spec.training.learning_rate == 1e-4
    assert job.spec.pet_config.lora_rank == 16 and job.spec.pet_config.lora_alpha == 64
    assert job.spec.training.gradient_checkpointing is True
    assert job.spec.pet_config.target_modules == ["q_proj", "v_proj"]
    assert job.metadata.name == "lora-lr-1e-4"
    assert load_job(JOB).spec.training.learning_rate == 5e-3  # the file itself is not changed


def test_the_last_set_of_a_field_wins_and_missing_sections_are_created() -> None:
    doc = apply_overrides(
        _doc(),
        ["training.learning_rate=1e-3", "training.learning_rate=2e-3", "resources.node_selector.pool=a100"],
    )
    assert doc["spec"]["training"]["learning_rate"] == 2e-3
    assert doc["spec"]["resources"] == {"node_selector": {"pool": "a100"}}
    assert _doc()["spec"]["training"]["learning_rate"] == 5e-3  # a copy was changed


def test_an_item_of_a_list_already_there() -> None:
    doc = _doc()
    doc["spec"]["dataset"]["mix"] = [{"uri": "a.json", "ratio": 0.5}]
    assert apply_overrides(doc, ["dataset.mix[0].ratio=0.25"])["spec"]["dataset"]["mix"][0]["ratio"] == 0.25
    with pytest.raises(OverrideError, match=r"no such item"):
        apply_overrides(doc, ["dataset.mix[1].ratio=0.25"])


def test_a_bad_value_is_the_files_one_line_error_naming_the_field_and_the_set() -> None:
    prefix = f"{JOB} (local-lora): "
    assert _problems("pet_config.lora_rank=0") == [
        prefix + "spec.pet_config.lora_rank: must be >= 1, got 0 (--set pet_config.lora_rank=0)"
    ]
    assert _problems("pet_config.lora_rank=abc") == [
        prefix + "spec.pet_config.lora_rank: must be an integer, got 'abc' (--set pet_config.lora_rank=abc)"
    ]
    # quoted, it is a string: strict like the file (`lora_rank: "16"` is refused there too)
    assert _problems('pet_config.lora_rank="16"')[0].startswith(
        prefix + "spec.pet_config.lora_rank: must be an integer, got '16'"
    )
    # a cross-field rule the new value breaks
    assert any("spec.pet_config" in p and "quantization" in p for p in _problems("pet_config.pet_type=qlora"))


def test_paths_that_name_no_field_are_refused() -> None:
    prefix = f"{JOB} (local-lora): "
    assert _problems("pet_config.lora_rnk=16") == [
        prefix
        + "spec.pet_config.lora_rnk: unknown field; did you mean 'lora_rank'? (--set pet_config.lora_rnk=16)"
    ]
    assert _problems("trainig.learning_rate=1") == [
        prefix + "spec.trainig: unknown field; did you mean 'training'? (--set trainig.learning_rate=1)"
    ]
    assert _problems("training.learning_rate.x=1") == [
        prefix + "spec.training.learning_rate: is a single value, it has no field 'x' "
        "(--set training.learning_rate.x=1)"
    ]
    assert _problems("status.phase=Succeeded") == [
        prefix + "spec.status: unknown field (--set status.phase=Succeeded)"
    ]
    assert _problems("learning_rate") == [
        f"{JOB}: --set learning_rate: expected PATH=VALUE, e.g. training.learning_rate=1e-4"
    ]
    assert _problems("training..x=1") == [
        f"{JOB}: --set training..x=1: 'training..x' is not a dotted field path"
    ]


def test_validate_and_render_take_set(tmp_path: Path) -> None:
    ok = kubetune("validate", "--no-data", str(JOB), "--set", "pet_config.lora_rank=4", env=cli_env(tmp_path))
    assert ok.returncode == 0 and "local-lora: valid" in ok.stdout
    bad = kubetune(
        "validate", "--no-data", str(JOB), "--set", "pet_config.lora_rank=0", env=cli_env(tmp_path)
    )
    assert bad.returncode == 1
    assert "spec.pet_config.lora_rank: must be >= 1, got 0 (--set pet_config.lora_rank=0)" in bad.stderr
    assert "Traceback" not in bad.stderr

    out = kubetune(
        "render", str(REPO / "examples" / "sft-lora.yaml"), "--set", "training.learning_rate=1e-4",
        "--set", "pet_config.lora_rank=16", env=cli_env(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = next(d for d in yaml.safe_load_all(out.stdout) if d["kind"] == "ConfigMap")
    job = yaml.safe_load(config["data"]["job.yaml"])
    assert job["spec"]["training"]["learning_rate"] == 1e-4 and job["spec"]["pet_config"]["lora_rank"] == 16

    refused = kubetune("render", str(JOB), "--set", "pet_config.rank=16", env=cli_env(tmp_path))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "spec.pet_config.rank: unknown field" in refused.stderr


def test_run_trains_the_job_with_the_set_values(tmp_path: Path, train_job: Any) -> None:
    job = train_job(tmp_path / "out", training={"max_steps": 30}, merge_adapter=False)
    path = write_job_file(job, tmp_path / "job.yaml")
    bad = kubetune("run", str(path), "--set", "training.max_stpes=2", cwd=tmp_path, env=cli_env(tmp_path))
    assert (
        bad.returncode == 1
        and "spec.training.max_stpes: unknown field; did you mean 'max_steps'?" in bad.stderr
    )
    assert not (tmp_path / "out").exists()  # refused before anything started

    run = kubetune(
        "run", str(path), "--set", "training.max_steps=2", "--set", f"output.uri={tmp_path / 'out2'}",
        "--set", "pet_config.lora_rank=4", cwd=tmp_path, env=cli_env(tmp_path), timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out2" / "progress.json").read_text())["step"] == 2
    adapter = json.loads((tmp_path / "out2" / "final" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    assert not (tmp_path / "out").exists()
