"""Packaging promises: the trainer imports without kopf, the CLI's core without either, CI runs README's command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _import_without(blocked: list[str], module: str) -> subprocess.CompletedProcess[str]:
    # A None entry in sys.modules makes `import name` raise ImportError, as if it were not installed.
    code = "import sys\n" + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked) + f"import {module}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")


def test_trainer_imports_without_kopf_or_kubernetes() -> None:
    for module in ["kubetune_trainer", "kubetune_trainer.tiny"]:
        run = _import_without(["kopf", "kubernetes"], module)
        assert run.returncode == 0, run.stderr


def test_core_imports_without_torch_kopf_or_boto3() -> None:
    for module in ["kubetune.spec", "kubetune.validate", "kubetune.crd", "kubetune.cli"]:
        run = _import_without(["torch", "kopf", "kubernetes", "boto3", "transformers"], module)
        assert run.returncode == 0, run.stderr


def test_blocking_really_blocks() -> None:
    # Guards the two tests above against passing vacuously.
    assert _import_without(["torch"], "torch").returncode != 0


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    command = ci[ci.index("# --- README: test command ---") + 1]
    assert f"```bash\n{command}\n```" in readme


def test_no_importable_package_named_operator() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter")  # still the standard library's
