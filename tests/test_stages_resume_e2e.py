"""DPO, SimPO, KTO, ORPO, reward models and pre-training survive a kill like SFT: the resilience harness
(tests/test_resilience_e2e.py) with a job of each preference method and a streaming pre-training job.

Each stage runs once uninterrupted (2 processes, gloo, checkpoints and output in SeaweedFS), then
once with rank 1 killed by SIGKILL after a committed checkpoint and relaunched in a fresh "pod"
(empty local cache: it can only resume from S3). The relaunch must reproduce the uninterrupted
run's per-step losses (and the method's rewards or accuracy) and its final weights.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_trainer import checkpoints as ck
from tests.fixtures_preference import write_preferences
from tests.fixtures_resilience import (
    Env,
    committed_steps,
    progress,
    relaunch_until_done,
    tail,
    wait,
    wait_until,
    worker_pids,
)

pytestmark = pytest.mark.slow

STEPS = 12
REL_TOL = 1e-4
C4 = Path(__file__).resolve().parents[1] / "examples/data/c4_118.jsonl"
# preference methods (LoRA on 32 pairs) and the logged values that must match after the resume
PREFERENCE = {
    "dpo": ["rewards/margins", "rewards/accuracies"],
    "simpo": ["rewards/margins", "rewards/accuracies"],
    "reward": ["accuracy", "margin"],
    "kto": ["kl"],  # pairs split into desirable and undesirable rows; a batch of 2 may hold one kind only
    "orpo": ["rewards/margins", "rewards/accuracies", "log_odds_ratio"],
}


class StageEnv(Env):
    """The harness's Env with the job's method, data and weights replaced."""

    def stage_job(self, name: str, stage: str) -> Path:
        path = self.job(name, max_steps=STEPS)
        doc = yaml.safe_load(path.read_text())
        spec = doc["spec"]
        if stage in PREFERENCE:
            spec["method"] = stage
            spec["dataset"] = {"uri": str(write_preferences(self.tmp / "prefs.jsonl", 32))}
            spec["pet_config"]["lora_dropout"] = 0.0
            spec["training"].update(learning_rate=2e-3, seq_length=64)
        else:  # streaming pre-training, full fine-tuning
            spec["method"] = "pretrain"
            spec["dataset"] = {"uri": str(C4), "streaming": True}
            spec["pet_config"] = {"pet_type": "full"}
            spec["training"].update(learning_rate=1e-3, seq_length=64, packing=True)
        path.write_text(yaml.safe_dump(doc))
        return path


def step_logs(env: Env, name: str) -> dict[int, dict]:
    """Per-step training logs of a finished job, from its last committed checkpoint's trainer_state."""
    import json

    store = env.store(f"jobs/{name}/checkpoints")
    last = ck.latest_committed(store)
    assert last is not None
    state = json.loads(store.get_bytes(f"{last.name}/trainer_state.json"))
    return {h["step"]: h for h in state["log_history"] if "loss" in h}


def final_weights(env: Env, name: str, stage: str) -> dict[str, Any]:
    from safetensors.torch import load

    key = (
        "final/adapter/adapter_model.safetensors" if stage in PREFERENCE else "final/merged/model.safetensors"
    )
    return load(env.store(f"jobs/{name}").get_bytes(key))


@pytest.fixture(scope="module")
def stage_model(tiny_model_dirs: dict) -> Path:
    return tiny_model_dirs["qwen2"]


@pytest.mark.parametrize("stage", [*PREFERENCE, "pretrain"])
def test_kill_9_and_relaunch_gives_the_uninterrupted_run(
    stage: str, s3_server: Any, stage_model: Path, tmp_path: Path
) -> None:
    import torch

    env = StageEnv(s3_server, s3_server.new_bucket(), tmp_path, stage_model)
    relaunch_until_done(env, env.stage_job("ref", stage), delay=0)

    config = env.stage_job("kill", stage)
    p = env.launch(config)
    wait_until(lambda: any(s >= 4 for s in committed_steps(env, "kill")), 180, "checkpoint step 4", (p,))
    pids = wait_until(lambda: worker_pids(p).get(1) and worker_pids(p), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    assert wait(p) != 0
    assert max(committed_steps(env, "kill")) < STEPS
    p2 = relaunch_until_done(env, config)
    pr = progress(env, "kill")
    resumed = pr["resumed_from"]
    assert resumed is not None and resumed["step"] >= 4, tail(p2)
    assert pr["state"] == "done" and pr["step"] == STEPS

    got, want = step_logs(env, "kill"), step_logs(env, "ref")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    keys = ["loss", *PREFERENCE.get(stage, [])]
    for s in range(resumed["step"] + 1, STEPS + 1):
        for k in keys:
            assert got[s][k] == pytest.approx(want[s][k], rel=REL_TOL, abs=1e-6), (
                s,
                k,
                got[s][k],
                want[s][k],
            )
    a, b = final_weights(env, "kill", stage), final_weights(env, "ref", stage)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k

    if stage in ("dpo", "simpo", "orpo"):
        # progress.json carries the rewards next to the loss; training raised the margin
        rewards = pr.get("rewards") or {}
        assert set(rewards) >= {"chosen", "rejected", "margins", "accuracies"}, pr
        assert want[STEPS]["rewards/margins"] > want[1]["rewards/margins"]
    if stage == "dpo":
        assert want[1]["rewards/margins"] == 0  # the policy starts as its reference
    if stage in ("kto", "orpo"):
        # the method's other logged values reach progress.json's (and so status.progress's) metrics
        want_metrics = {"kto": {"kl"}, "orpo": {"log_odds_ratio", "log_odds_chosen", "nll_loss"}}[stage]
        assert set(pr.get("metrics") or {}) == want_metrics and pr.get("rewards"), pr
    if stage == "reward":
        # progress.json (and so status.progress) carries the preference accuracy and margin
        metrics = pr.get("metrics") or {}
        assert set(metrics) >= {"accuracy", "margin"}, pr
        assert want[STEPS]["margin"] > want[1]["margin"]
