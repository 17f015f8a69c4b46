"""`kubetune examples`: the shipped jobs, one line each, filtered by a pattern, one printed to copy,
from the source tree and from an installed wheel alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune.catalog import DESCRIPTION_ANNOTATION, list_examples
from tests.fixtures_cli import cli_env, kubetune
from tests.fixtures_data import REPO

FILES = sorted([*(REPO / "examples").glob("*.yaml"), *(REPO / "examples").glob("*/*.yaml")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(REPO / "examples").as_posix())
def test_every_example_describes_itself_in_one_line(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    description = doc["metadata"]["annotations"][DESCRIPTION_ANNOTATION]
    assert isinstance(description, str) and 20 <= len(description) <= 120 and "\n" not in description


def test_the_list_names_every_example_with_its_description(tmp_path: Path) -> None:
    run = kubetune("examples", env=cli_env(tmp_path))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == len(FILES) == len(list_examples())
    by_name = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert set(by_name) >= {"sft-lora", "local-lora", "dpo", "platform/job", "platform/profile"}
    assert by_name["sft-qlora-4bit"].startswith("QLoRA 4-bit NF4")


def test_a_pattern_filters_by_name_or_description(tmp_path: Path) -> None:
    lora = kubetune("examples", "-p", "lora", env=cli_env(tmp_path)).stdout.split("\n")
    names = {line.split()[0] for line in lora if line}
    assert {"sft-lora", "local-lora", "sft-qlora-4bit", "multi-node", "minimal"} <= names
    assert "pretrain" not in names and "sft-full" not in names
    assert [
        line.split()[0]
        for line in kubetune("examples", "-p", "FSDP", env=cli_env(tmp_path)).stdout.splitlines()
    ] == ["sft-full"]  # case-insensitive, and a description counts
    none = kubetune("examples", "-p", "no-such-thing", env=cli_env(tmp_path))
    assert none.returncode == 1 and none.stdout == "" and "none matches 'no-such-thing'" in none.stderr


def test_naming_one_prints_it_to_copy(tmp_path: Path) -> None:
    run = kubetune("examples", "sft-lora", env=cli_env(tmp_path))
    assert run.returncode == 0 and run.stdout == (REPO / "examples" / "sft-lora.yaml").read_text()
    (tmp_path / "job.yaml").write_text(
        kubetune("examples", "platform/job.yaml", env=cli_env(tmp_path)).stdout
    )
    check = kubetune(
        "validate", "--no-data", str(tmp_path / "job.yaml"), "--profile", str(REPO / "examples/platform/profile.yaml"),
        env=cli_env(tmp_path),
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    missing = kubetune("examples", "sft-lroa", env=cli_env(tmp_path))
    assert missing.returncode == 1 and "no example named 'sft-lroa'; there are: dpo, " in missing.stderr


def test_an_installed_wheel_carries_the_examples(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"), str(REPO)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "w").glob("kubetune-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    assert (site / "kubetune" / "examples" / "platform" / "profile.yaml").is_file()
    # outside the checkout, the installed copy first on the path (ahead of the editable install)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import sys, kubetune.cli; assert kubetune.cli.__file__.startswith(sys.path[1]); sys.exit(kubetune.cli.main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, "examples", "-p", "lora"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "sft-lora" in run.stdout and "local-lora" in run.stdout
    shown = subprocess.run(
        [sys.executable, "-c", code, "examples", "minimal"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert shown.stdout == (REPO / "examples" / "minimal.yaml").read_text()
