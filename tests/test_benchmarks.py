"""The benchmark scripts themselves work: their quick / dry-run modes run end to end and print
their tables. Nothing here is timed; the figures are in benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(argv: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )


def test_peers_quick_prints_the_ratio_table() -> None:
    r = _run([sys.executable, "benchmarks/peers.py", "--quick"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [
        line for line in r.stdout.splitlines() if re.match(r"\| (unpacked|packed) \| (trl|kubetune) \|", line)
    ]
    assert len(rows) == 4, r.stdout
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        mode, side, tps, ratio, fill = cells[:5]
        assert float(tps) > 0 and 0 < float(fill) <= 1
        if side == "trl":
            assert ratio == "1.000"  # the baseline of its mode
        assert cells[5].endswith("MiB") and cells[6].endswith(" s") and float(cells[7]) > 0


def test_gpu_check_script_parses_and_its_dry_run_prints_the_table(tmp_path: Path) -> None:
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert _run(["bash", "-n", str(script)], timeout=30).returncode == 0
    out = tmp_path / "check.json"
    r = _run(["bash", str(script), "--dry-run"], timeout=400, PYTHON=sys.executable, GPU_CHECK_JSON=str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table[1:]]  # after the header
    assert names[:3] == ["lora, plain Trainer", "lora, kubetune", "lora, kubetune, packed"]
    assert "full, kubetune, packed" in names
    assert any("skipped: needs liger-kernel and CUDA" in line for line in table)  # no CUDA here
    assert "exact" in table[-1] and table[-1].startswith("| resume:")
    result = json.loads(out.read_text())
    assert result["resume"]["exact"] and len(result["resume"]["straight"]) == result["resume"]["steps"] // 2


def test_gpu_check_refuses_a_missing_wheels_directory(tmp_path: Path) -> None:
    r = _run(["bash", "benchmarks/gpu_check.sh", str(tmp_path / "none")], timeout=30, PYTHON=sys.executable)
    assert r.returncode == 2 and "is not a directory of wheels" in r.stderr
