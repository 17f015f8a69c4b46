"""DPO and continued pre-training through the operator, like SFT (tests/test_operator_e2e.py):
FineTuneJob -> operator -> pods running the real trainer (supervise -> torchrun) -> S3 (SeaweedFS).

- dpo: one node, LoRA; the job Succeeds, the adapter lands in S3, progress.json and the status
  progress carry the rewards.
- kto: one node, LoRA, on unpaired rows (prompt, completion, label); the job Succeeds and the status
  progress carries the rewards and KTO's kl (its `metrics`).
- pretrain (streaming, full fine-tuning): the pod is killed after a committed checkpoint; the gang
  restarts as attempt 2, resumes from that checkpoint and Succeeds with the model in S3.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_kube import Cluster, lora_job, s3_secret
from tests.fixtures_preference import write_preferences, write_unpaired
from tests.kubelet import Kubelet, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dirs: dict) -> Path:
    return tiny_model_dirs["qwen2"]


def stage_job(name: str, model: Path, s3: Any, stage: str, data: Path) -> dict:
    doc = lora_job(name, model, s3)  # the SFT e2e job, with the stage's method, data and weights
    spec = doc["spec"]
    spec["parallel_config"] = {"nnodes": 1}
    spec["training"].update(max_steps=12, seq_length=64)
    if stage in ("dpo", "kto"):
        spec["method"] = stage
        spec["dataset"] = {"uri": str(data)}
    else:
        spec["method"] = "pretrain"
        spec["dataset"] = {"uri": str(data), "streaming": True}
        spec["pet_config"] = {"pet_type": "full"}
        spec["training"].update(learning_rate=1e-3, packing=True)
    return doc


def test_dpo_job_succeeds_through_the_operator(
    cluster: Cluster,
    s3: Any,
    tiny_model: Path,
    real_kubelet: Kubelet,  # noqa: F811
    operator: object,
    tmp_path: Path,
) -> None:
    s3_secret(cluster, s3)
    cluster.create_job(
        stage_job("dpo", tiny_model, s3, "dpo", write_preferences(tmp_path / "prefs.jsonl", 32))
    )
    status = cluster.wait_phase("dpo", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", (status, real_kubelet.log_of("dpo-a1-r0")[-3000:])
    assert status["attempt"] == 1 and status["output"] == s3.uri("jobs/dpo/final")
    assert status["progress"]["summary"] == "100% (12/12)"
    assert set(status["progress"]["rewards"]) == {"chosen", "rejected", "margins", "accuracies"}, status
    progress = json.loads(s3.store("jobs/dpo").get_bytes("progress.json"))
    assert progress["state"] == "done" and progress["rewards"]["margins"] > 0, progress
    keys = s3.keys("jobs/dpo/final/adapter/")
    assert any(k.endswith("adapter_model.safetensors") for k in keys) and not any("/ref/" in k for k in keys)
    metrics = s3.store("jobs/dpo").get_bytes("metrics.jsonl").decode().splitlines()
    assert sum("rewards/margins" in line for line in metrics) == 12


def test_kto_job_on_unpaired_rows_succeeds_through_the_operator(
    cluster: Cluster,
    s3: Any,
    tiny_model: Path,
    real_kubelet: Kubelet,  # noqa: F811
    operator: object,
    tmp_path: Path,
) -> None:
    s3_secret(cluster, s3)
    job = stage_job("kto", tiny_model, s3, "kto", write_unpaired(tmp_path / "unpaired.jsonl", 32))
    job["spec"]["training"]["per_device_train_batch_size"] = 4  # both kinds of reply in (nearly) every batch
    cluster.create_job(job)
    status = cluster.wait_phase("kto", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", (status, real_kubelet.log_of("kto-a1-r0")[-3000:])
    assert status["progress"]["summary"] == "100% (12/12)"
    assert set(status["progress"]["rewards"]) >= {"chosen", "rejected"}, status
    assert set(status["progress"]["metrics"]) == {"kl"}, status
    progress = json.loads(s3.store("jobs/kto").get_bytes("progress.json"))
    assert progress["state"] == "done" and progress["metrics"]["kl"] >= 0, progress
    keys = s3.keys("jobs/kto/final/adapter/")
    assert any(k.endswith("adapter_model.safetensors") for k in keys) and not any("/ref/" in k for k in keys)
    metrics = s3.store("jobs/kto").get_bytes("metrics.jsonl").decode().splitlines()
    assert sum('"kl"' in line for line in metrics) == 12


def test_streaming_pretrain_job_survives_a_killed_pod(
    cluster: Cluster,
    s3: Any,
    tiny_model: Path,
    real_kubelet: Kubelet,  # noqa: F811
    operator: object,
) -> None:
    s3_secret(cluster, s3)
    cluster.create_job(stage_job("pt", tiny_model, s3, "pretrain", ROOT / "examples/data/c4_118.jsonl"))
    status = wait_for(
        lambda: (
            (s := cluster.status("pt")).get("phase") == "Running"
            and (s.get("last_checkpoint") or {}).get("step")
            and s
        ),
        240,
        what=lambda: (
            f"a committed checkpoint; status {cluster.status('pt')}\n{real_kubelet.log_of('pt-a1-r0')[-3000:]}"
        ),
    )
    first_ckpt = status["last_checkpoint"]["step"]
    assert real_kubelet.kill("pt-a1-r0", signal.SIGKILL)
    status = cluster.wait_phase("pt", "Succeeded", "Failed", timeout=300)
    assert status["phase"] == "Succeeded", status
    assert (status["attempt"], status["restarts"]) == (2, 1), status
    progress = json.loads(s3.store("jobs/pt").get_bytes("progress.json"))
    assert progress["attempt"] == 2 and progress["resumed_from"]["step"] >= first_ckpt
    assert any(k.endswith("model.safetensors") for k in s3.keys("jobs/pt/final/merged/"))
