"""Training metrics in Prometheus: the operator's per-job gauges (from each FineTuneJob's status, with
`namespace` and `job` labels, gone with the job), scraped from the running operator's metrics endpoint
on the API emulator, and the chart's Grafana dashboard of them."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator import metrics
from tests.fixtures_kube import Cluster, OperatorProcess, job_doc
from tests.kubelet import Kubelet, wait_for

STATUS: dict[str, Any] = {
    "phase": "Running",
    "attempt": 2,
    "restarts": 1,
    "preemptions": 3,
    "progress": {
        "step": 120, "total_steps": 300, "percent": 40, "epoch": 0.8, "loss": 1.25,
        "tokens_per_second": 5400.5, "eta_seconds": 610.0, "state": "running",
        "rewards": {"margins": 0.42, "accuracies": 0.75},
    },
    "last_checkpoint": {"uri": "s3://runs/a/checkpoints/step-00000100", "step": 100},
    "evaluation": {
        "passed": False, "reason": "ThresholdFailed", "message": "bleu_4 12.5 < minimum 20",
        "scores": {
            "bleu_4": {"base": 8.0, "trained": 12.5, "threshold": 20.0, "passed": False},
            "perplexity": {"base": 9.5, "trained": 4.25},
        },
    },
}  # fmt: skip


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def of_job(found: dict, namespace: str, job: str) -> dict[str, Any]:
    """The per-job samples of one job: {name: value} ({name{extra labels}: value} when there are more)."""
    out: dict[str, Any] = {}
    for (name, labels), value in found.items():
        d = dict(labels)
        if d.pop("namespace", None) == namespace and d.pop("job", None) == job:
            out[name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(d.items())) + "}" if d else "")] = value
    return out


def test_per_job_gauges_follow_the_status_and_go_with_the_job() -> None:
    collector = metrics.JobStatusCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.observe("team-a", "qwen", STATUS)
    collector.observe("team-b", "qwen", {"phase": "Pending"})  # no progress yet: no samples for it
    got = of_job(samples(generate_latest(registry).decode()), "team-a", "qwen")
    assert got == {
        "kubetune_job_phase{phase=Running}": 1,
        "kubetune_job_step": 120, "kubetune_job_total_steps": 300, "kubetune_job_epoch": 0.8,
        "kubetune_job_loss": 1.25, "kubetune_job_tokens_per_second": 5400.5, "kubetune_job_eta_seconds": 610,
        "kubetune_job_restarts": 1, "kubetune_job_preemptions": 3, "kubetune_job_attempt": 2,
        "kubetune_job_last_checkpoint_step": 100,
        "kubetune_job_reward{reward=margins}": 0.42, "kubetune_job_reward{reward=accuracies}": 0.75,
        "kubetune_job_evaluation_score{metric=bleu_4,model=trained}": 12.5,
        "kubetune_job_evaluation_score{metric=bleu_4,model=base}": 8.0,
        "kubetune_job_evaluation_score{metric=perplexity,model=trained}": 4.25,
        "kubetune_job_evaluation_score{metric=perplexity,model=base}": 9.5,
        "kubetune_job_evaluation_threshold{metric=bleu_4}": 20.0,
        "kubetune_job_evaluation_passed": 0,
    }  # fmt: skip
    assert of_job(samples(generate_latest(registry).decode()), "team-b", "qwen") == {
        "kubetune_job_phase{phase=Pending}": 1
    }
    collector.forget("team-a", "qwen")
    text = generate_latest(registry).decode()
    assert 'namespace="team-a"' not in text and 'namespace="team-b"' in text


def scrape(port: int) -> dict:
    try:
        return samples(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    except OSError:
        return {}


def test_the_running_operator_exports_each_jobs_training_gauges(
    cluster: Cluster, kubelet: Kubelet, operator_process: OperatorProcess, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "behaviour.json").write_text(json.dumps({"fail": {"attempt": 1, "rank": 1, "step": 6, "code": 1}}))
    kubelet.extra_env["FAKE_STEP_SECONDS"] = "0.1"
    cluster.create_job(job_doc("gauged", out, steps=40, every=5))
    port = operator_process.metrics_port

    # while the second attempt runs: the scraped step lies between the status before and after the
    # scrape (the gauges follow the operator's watch, which may be an event behind the API server: a
    # sample is taken once both say attempt 2 is Running)
    def running_sample() -> tuple[dict, dict, dict] | None:
        before = cluster.status("gauged")
        got = of_job(scrape(port), "default", "gauged")
        after = cluster.status("gauged")
        ok = (after.get("phase"), after.get("attempt")) == ("Running", 2) and got.get("kubetune_job_step")
        seen = got.get("kubetune_job_phase{phase=Running}") == 1 and got.get("kubetune_job_attempt") == 2
        return (before, got, after) if ok and seen else None

    before, got, after = wait_for(running_sample, 60, what=lambda: f"gauges of a running job: {scrape(port)}")
    assert (
        (before.get("progress") or {}).get("step", 0) <= got["kubetune_job_step"] <= after["progress"]["step"]
    )
    assert got["kubetune_job_total_steps"] == 40
    assert got["kubetune_job_tokens_per_second"] == 1000.0  # what the trainer reported
    assert got["kubetune_job_restarts"] == 1 and got["kubetune_job_attempt"] == 2  # the failed first attempt
    assert [k for k in got if k.startswith("kubetune_job_phase")] == ["kubetune_job_phase{phase=Running}"]
    assert {"kubetune_job_loss", "kubetune_job_eta_seconds", "kubetune_job_preemptions"} <= set(got)

    status = cluster.wait_phase("gauged", "Succeeded", timeout=90)
    done = wait_for(
        lambda: (
            (g := of_job(scrape(port), "default", "gauged")).get("kubetune_job_phase{phase=Succeeded}") and g
        ),
        30,
        what="the Succeeded phase gauge",
    )
    progress = status["progress"]
    assert done["kubetune_job_step"] == done["kubetune_job_total_steps"] == progress["step"] == 40
    assert done["kubetune_job_loss"] == pytest.approx(progress["loss"])
    assert done["kubetune_job_restarts"] == status["restarts"] == 1
    assert done["kubetune_job_last_checkpoint_step"] == status["last_checkpoint"]["step"] == 40
    assert "kubetune_job_phase{phase=Running}" not in done  # one phase per job

    cluster.delete_job("gauged")
    wait_for(
        lambda: not of_job(scrape(port), "default", "gauged") and scrape(port),
        30,
        what="the deleted job's gauges to go",
    )
    # the operator's own metrics stay
    assert ("kubetune_jobs", (("phase", "Succeeded"),)) in scrape(port)


# ---------------------------------------------------------------- the chart's dashboard


@pytest.fixture(scope="module")
def chart() -> Any:
    import helm_python as helm

    from tests.fixtures_helm import CHART

    with helm.Chart.load(CHART) as ch:
        yield ch


def exported_names() -> set[str]:
    """Every sample name the operator's registry exposes (histograms with _bucket, _sum, _count)."""
    registry = CollectorRegistry()
    collector = metrics.JobStatusCollector()
    registry.register(collector)
    collector.observe("ns", "job", STATUS)
    names = {name for name, _ in samples(generate_latest(registry).decode())}
    return names | {name for name, _ in samples(generate_latest(metrics.REGISTRY).decode())} | {
        "kubetune_restarts_total", "kubetune_reconcile_duration_seconds_bucket"
    }  # fmt: skip


def test_the_chart_ships_a_grafana_dashboard_of_the_gauges(chart: Any) -> None:
    from tests.fixtures_helm import render

    assert not [o for o in render(chart) if o["kind"] == "ConfigMap"]  # off by default
    values = {
        "metrics": {
            "grafanaDashboard": {
                "enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "ML"},
            },
            "serviceMonitor": {"enabled": True},
        }
    }  # fmt: skip
    objs = render(chart, values)
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    (text,) = cm["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] == "kubetune-jobs" and dashboard["panels"]

    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\bkubetune_[a-z_]+", e)}
    assert used <= exported_names(), used - exported_names()  # no panel queries a metric that is not there
    wanted = {"step", "total_steps", "loss", "tokens_per_second", "eta_seconds", "restarts", "preemptions",
              "evaluation_score"}  # fmt: skip
    assert {f"kubetune_job_{w}" for w in wanted} <= used
    # every per-job panel follows the namespace and job variables
    per_job = [e for e in exprs if "kubetune_job_" in e and "label_values" not in e]
    assert all('namespace=~"$namespace"' in e and 'job=~"$job"' in e for e in per_job), per_job

    (sm,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # keeps the gauges' job and namespace labels


def test_a_misspelt_dashboard_value_fails_at_install(chart: Any) -> None:
    from tests.fixtures_helm import render

    with pytest.raises(Exception, match="grafanaDashboard"):
        render(chart, {"metrics": {"grafanaDashboard": {"enabled": "yes"}}})
