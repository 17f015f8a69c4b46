"""Helpers for the Helm chart tests (tests/test_helm.py, tests/test_metrics_operator.py): the chart's
path and `render(chart, values)`, its manifests as installed (release `RELEASE` in `NAMESPACE`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import helm_python as helm

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kubetune"
RELEASE, NAMESPACE = "kubetune", "kubetune-system"


def render(chart: helm.Chart, values: dict | None = None) -> list[dict[str, Any]]:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objs += [d for d in yaml.safe_load_all(text) if d]
    return objs
