"""The `kubetune` command's own surface, as a new user meets it: help, version, arguments."""

from __future__ import annotations

import re

import pytest

from tests.fixtures_cli import kubetune

SUBCOMMANDS = ["validate", "crd", "render", "run", "inspect-data", "status", "chat", "export", "examples"]


def test_no_arguments_prints_the_help_not_an_error() -> None:
    proc = kubetune()
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("usage: kubetune")
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), f"{command} is not listed with its help"


def test_version() -> None:
    from importlib.metadata import version

    proc = kubetune("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"kubetune {version('kubetune')}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_argument_has_help_text_and_n_always_means_namespace(command: str) -> None:
    proc = kubetune(command, "--help")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("positional arguments:", 1)[-1].splitlines()
    # argparse puts an argument's help after its name, or on the next, deeper-indented line
    bare = [
        line.strip()
        for line, after in zip(lines, [*lines[1:], ""], strict=True)
        if re.fullmatch(r"  \S.*", line)
        and not line.endswith(":")
        and not re.search(r"\S\s{2,}\S", line.strip())
        and not re.match(r"\s{6,}\S", after)
    ]
    assert bare == [], f"{command}: arguments without help: {bare}"
    for line in proc.stdout.splitlines():
        if re.match(r"\s+-n\b", line):
            assert "--namespace" in line, f"{command}: -n is {line.strip()!r}, not the namespace"
