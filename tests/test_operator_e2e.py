"""The whole product on one machine: FineTuneJob -> operator -> pods running the real trainer (supervise ->
torchrun -> LoRA on a tiny Qwen2 model, gloo) with checkpoints in S3 (SeaweedFS); one pod is killed
mid-training, the gang restarts as attempt 2, resumes from the committed checkpoint and succeeds."""

from __future__ import annotations

import base64
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_kube import Cluster, lora_job
from tests.kubelet import Kubelet, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, num_layers=2)


def test_two_node_lora_job_survives_a_killed_pod(
    cluster: Cluster, s3: Any, tiny_model: Path, real_kubelet: Kubelet, operator: object
) -> None:
    secret = {
        k: base64.b64encode(s3.env[k].encode()).decode()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    cluster.core.create_namespaced_secret("default", {"metadata": {"name": "s3-credentials"}, "data": secret})
    cluster.create_job(lora_job("e2e", tiny_model, s3))

    def logs() -> str:
        return "\n".join(f"--- {p}\n{real_kubelet.log_of(p)[-3000:]}" for p in ("e2e-a1-r0", "e2e-a1-r1"))

    status = wait_for(
        lambda: (
            (s := cluster.status("e2e")).get("phase") == "Running"
            and (s.get("last_checkpoint") or {}).get("step")
            and s
        ),
        240,
        what=lambda: f"a committed checkpoint; status {cluster.status('e2e')}\n{logs()}",
    )
    first_ckpt = status["last_checkpoint"]["step"]
    assert first_ckpt >= 4 and status["progress"]["total_steps"] == 16
    assert real_kubelet.kill("e2e-a1-r1", signal.SIGKILL)  # the whole container of node rank 1 dies
    status = cluster.wait_phase("e2e", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", (status, logs())
    assert (status["attempt"], status["restarts"]) == (2, 1), status
    assert status["last_restart_reason"].startswith("PodFailed: pod e2e-a1-r1 (rank 1) failed (exit code 137")
    assert status["output"] == s3.uri("jobs/e2e/final")
    assert status["last_checkpoint"]["step"] == 16 and status["last_checkpoint"]["uri"].startswith(
        s3.uri("jobs/e2e")
    )
    assert status["progress"]["summary"] == "100% (16/16)" and status["progress"]["state"] == "done"
    progress = json.loads(s3.store("jobs/e2e").get_bytes("progress.json"))
    assert (
        progress["attempt"] == 2 and progress["resumed_from"]["step"] >= first_ckpt
    )  # resumed, not restarted
    adapter = s3.keys("jobs/e2e/final/adapter/")
    assert any(k.endswith("adapter_model.safetensors") for k in adapter), adapter
    r = cluster.kubectl("wait", "--for=condition=Succeeded", "ftj/e2e", "--timeout=10s")
    assert r.returncode == 0, r.stderr
    print(
        f"killed at checkpoint {first_ckpt}; resumed from {progress['resumed_from']}; events "
        f"{[r for _, r in cluster.events('e2e')]}",
        file=sys.__stdout__,
    )
