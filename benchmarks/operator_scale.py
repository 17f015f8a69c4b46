"""How the operator copes with many FineTuneJobs at once, against the API emulator (tests/kube_api.py).

    python benchmarks/operator_scale.py [--jobs 500] [--nnodes 2] [--steady 20] [--append benchmarks/RESULTS.md]

The emulator runs in this process; the operator is `kopf run` of kubetune_operator.handlers in its
own process with its production settings (reconcile loop every 5 s, progress every 15 s, 16 workers).
All jobs are created at once (8 client threads); then we measure:

1. time until every job has its whole gang of pods (and its status says attempt 1), and until the
   last pod exists;
2. the operator's resident memory (peak while converging, and after);
3. reconciles per second while converging and in steady state (pods stay Pending: there is no
   kubelet), from the operator's own Prometheus histogram kubetune_reconcile_duration_seconds.

The emulator shares this machine's 2 cores with the operator, so the figures bound the operator
from below; a real API server and a bigger operator pod would do better.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kmock
import kubernetes
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures_kube import CRD, free_port, job_doc  # noqa: E402
from tests.kube_api import RunningAPI  # noqa: E402

PODS = kmock.resource("v1", "pods")


def scrape(port: int) -> tuple[float, float]:
    """(reconciles done, seconds spent in them) from the operator's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    count = sum(
        float(v)
        for v in re.findall(r"^kubetune_reconcile_duration_seconds_count\{[^}]*\} (\S+)$", text, re.M)
    )
    total = sum(
        float(v) for v in re.findall(r"^kubetune_reconcile_duration_seconds_sum\{[^}]*\} (\S+)$", text, re.M)
    )
    return count, total


def run(jobs: int, nnodes: int, steady: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="kt-scale-"))
    load_before = os.getloadavg()[0]
    with RunningAPI() as api:
        api.api.install_crd(CRD)
        kubeconfig = api.kubeconfig(tmp / "kubeconfig")
        metrics_port = free_port()
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBETUNE_METRICS_PORT": str(metrics_port)}
        for key in ("KUBETUNE_RECONCILE_INTERVAL", "KUBETUNE_PROGRESS_INTERVAL"):
            env.pop(key, None)  # production defaults
        log = open(tmp / "operator.log", "wb")  # noqa: SIM115
        op = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "-A", "-m", "kubetune_operator.handlers"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        proc = psutil.Process(op.pid)
        try:
            end = time.monotonic() + 60
            while True:
                try:
                    scrape(metrics_port)
                    break
                except OSError:
                    if time.monotonic() > end or op.poll() is not None:
                        raise RuntimeError(
                            f"the operator did not start; see {tmp / 'operator.log'}"
                        ) from None
                    time.sleep(0.2)
            rss_idle = proc.memory_info().rss
            client = kubernetes.config.new_client_from_config(str(kubeconfig))
            custom = kubernetes.client.CustomObjectsApi(client)

            def create(i: int) -> None:
                doc = job_doc(f"scale-{i:04d}", tmp / "out" / str(i), nnodes=nnodes)
                custom.create_namespaced_custom_object(
                    "kubetune.io", "v1alpha1", "default", "finetunejobs", doc, _preload_content=False
                )

            start = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                list(pool.map(create, range(jobs)))
            created = time.monotonic() - start
            want = jobs * nnodes
            peak = rss_idle
            while True:
                peak = max(peak, proc.memory_info().rss)
                with api.api.mutex:
                    n = len(api.api._store.get(PODS, {}))
                if n >= want:
                    break
                if time.monotonic() - start > 900 or op.poll() is not None:
                    raise RuntimeError(f"only {n}/{want} pods after {time.monotonic() - start:.0f}s")
                time.sleep(0.2)
            all_pods = time.monotonic() - start
            converge_count, converge_sum = scrape(metrics_port)
            time.sleep(steady)
            count, total = scrape(metrics_port)
            peak = max(peak, proc.memory_info().rss)
            after = proc.memory_info().rss
            statuses = [
                o.get("status") or {}
                for o in api.api.objects(kmock.resource("kubetune.io/v1alpha1", "finetunejobs"))
            ]
            pending = sum(1 for s in statuses if s.get("phase") == "Pending" and s.get("attempt") == 1)
        finally:
            op.terminate()
            try:
                op.wait(20)
            except subprocess.TimeoutExpired:
                op.kill()
        return {
            "jobs": jobs, "pods": want, "create_seconds": created, "all_pods_seconds": all_pods,
            "jobs_pending_attempt_1": pending, "rss_idle_mb": rss_idle / 2**20, "rss_peak_mb": peak / 2**20,
            "rss_after_mb": after / 2**20, "converge_reconciles": converge_count,
            "load": max(load_before, os.getloadavg()[0]),
            "converge_reconciles_per_s": converge_count / all_pods,
            "steady_reconciles_per_s": (count - converge_count) / steady,
            "mean_reconcile_ms": 1000 * total / max(count, 1),
            "converge_mean_reconcile_ms": 1000 * converge_sum / max(converge_count, 1),
        }  # fmt: skip


def report(r: dict[str, float]) -> str:
    return "\n".join([
        "## Operator scale (reconcile loop, `benchmarks/operator_scale.py`)",
        "",
        f"{r['jobs']:.0f} FineTuneJobs of {r['pods'] / r['jobs']:.0f} nodes created at once against the API emulator "
        "(tests/kube_api.py, same process as the client), the operator as `kopf run` in its own process with "
        "production settings (reconcile loop every 5 s, progress every 15 s, 16 workers), no kubelet (pods stay Pending), "
        f"2 CPU cores shared with other work (load average up to {r['load']:.1f}), {time.strftime('%Y-%m-%d')}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| creating the {r['jobs']:.0f} jobs (8 client threads) | {r['create_seconds']:.1f} s |",
        f"| until every job has all its pods ({r['pods']:.0f} pods) | {r['all_pods_seconds']:.1f} s |",
        f"| jobs Pending with attempt 1 after that | {r['jobs_pending_attempt_1']:.0f} |",
        f"| operator RSS idle / peak / after | {r['rss_idle_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f} MiB |",
        f"| reconciles while converging | {r['converge_reconciles']:.0f} ({r['converge_reconciles_per_s']:.1f}/s, "
        f"mean {r['converge_mean_reconcile_ms']:.0f} ms) |",
        f"| reconciles in steady state (periodic loop only) | {r['steady_reconciles_per_s']:.1f}/s, mean {r['mean_reconcile_ms']:.0f} ms |",
        "",
    ])  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--nnodes", type=int, default=2)
    ap.add_argument("--steady", type=float, default=20.0, help="seconds of steady state to measure")
    ap.add_argument("--append", type=Path, help="append the table to this markdown file")
    args = ap.parse_args()
    result = run(args.jobs, args.nnodes, args.steady)
    text = report(result)
    print(text)
    if args.append:
        with open(args.append, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
