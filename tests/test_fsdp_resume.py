"""Full fine-tuning under FSDP (`parallel_config.strategy: fsdp`) survives kill -9 of a rank, end to end.

Same harness as tests/test_resilience_e2e.py: the real pod command (supervise -> torchrun, 2 gloo
processes), checkpoints in SeaweedFS, a relaunch with a fresh cache so it can only resume from S3.

The gang really shards (FSDP2 over gloo, see kubetune_trainer/fsdp.py): each committed checkpoint
is torch.distributed.checkpoint's sharded layout, one weight shard and one optimizer shard per rank
plus the .metadata that maps them, and nobody wrote a full model.safetensors or optimizer.pt.
The resumed run must load those shards and continue exactly.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.conventions import EXIT_PREEMPTED
from kubetune_trainer import checkpoints as ck
from tests.test_resilience_e2e import (
    REL_TOL,
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

STEPS = 8
EVERY = 2


@pytest.fixture(scope="module")
def fsdp_model(tmp_path_factory) -> Path:
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", hidden_size=64, num_layers=2)


def fsdp_job(env: Env, name: str) -> Path:
    """A full fine-tune sharded by FSDP over the gang, checkpointed every EVERY steps."""
    path = env.job(name, max_steps=STEPS)
    doc = yaml.safe_load(path.read_text())
    spec = doc["spec"]
    spec["pet_config"] = {"pet_type": "full"}
    spec["parallel_config"] = {"strategy": "fsdp"}
    spec["training"]["learning_rate"] = 1e-3
    spec["checkpoint"]["every_steps"] = EVERY
    path.write_text(yaml.safe_dump(doc))
    return path


def latest(env: Env, name: str) -> tuple[Any, ck.Checkpoint]:
    store = env.store(f"jobs/{name}/checkpoints")
    last = ck.latest_committed(store)
    assert last is not None
    return store, last


def losses(env: Env, name: str) -> dict[int, float]:
    store, last = latest(env, name)
    state = json.loads(store.get_bytes(f"{last.name}/trainer_state.json"))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def final_weights(env: Env, name: str) -> dict[str, Any]:
    from safetensors.torch import load

    return load(env.store(f"jobs/{name}").get_bytes("final/merged/model.safetensors"))


def assert_sharded_checkpoint(env: Env, name: str, base_model: Path, tmp: Path) -> dict[str, Any]:
    """The committed checkpoint holds each rank's shard of the weights and optimizer state (halves that
    together make the full state, and no full copy), both ranks' RNG; returns the weights it restores."""
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from kubetune_trainer.fsdp import MODEL_DIR, OPTIMIZER_DIR

    store, last = latest(env, name)
    m = last.manifest
    assert m.world_size == 2 and m.extra["strategy"] == "fsdp" and m.extra["pet_type"] == "full"
    shards = {
        f"{d}/{f}" for d in (MODEL_DIR, OPTIMIZER_DIR) for f in ("__0_0.distcp", "__1_0.distcp", ".metadata")
    }
    assert shards <= set(m.files), sorted(m.files)
    assert {"scheduler.pt", "trainer_state.json"} <= set(m.files)
    assert {f for f in m.files if f.startswith("rng_state_")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not {"model.safetensors", "optimizer.pt", "pytorch_model.bin"} & set(m.files), sorted(m.files)

    base = load_file(str(next(base_model.glob("*.safetensors"))))
    full_bytes = sum(v.numel() * v.element_size() for v in base.values())
    w0, w1 = (m.files[f"{MODEL_DIR}/__{r}_0.distcp"]["size"] for r in (0, 1))
    # each rank stores about half of the weights, not a copy of all of them
    assert 0.35 * full_bytes < w0 < 0.75 * full_bytes and 0.35 * full_bytes < w1 < 0.75 * full_bytes, (
        w0, w1, full_bytes,
    )  # fmt: skip

    # the shards put back together are a full model of the base's shapes
    local = tmp / "ckpt"
    for rel in m.files:
        store.get_file(f"{last.name}/{rel}", local / rel)
    dcp_to_torch_save(local / MODEL_DIR, local / "full.pt")
    restored = torch.load(local / "full.pt", weights_only=True)
    restored = restored.get("model", restored)
    assert {k: v.shape for k, v in restored.items() if k in base} == {k: v.shape for k, v in base.items()}
    return restored


def test_fsdp_full_finetune_kill_9_then_relaunch_resumes_exactly(s3_server, fsdp_model, tmp_path):
    bucket = s3_server.new_bucket()
    ref = Env(s3_server, bucket, tmp_path / "ref", fsdp_model)
    ref.tmp.mkdir()
    p = relaunch_until_done(ref, fsdp_job(ref, "fsdp-ref"), delay=0)
    assert "sharded over 2 processes (FSDP2 on cpu)" in tail(p, 400)
    assert progress(ref, "fsdp-ref")["resumed_from"] is None
    assert_sharded_checkpoint(ref, "fsdp-ref", fsdp_model, tmp_path / "ref-ckpt")

    env = Env(s3_server, bucket, tmp_path / "kill", fsdp_model)
    env.tmp.mkdir()
    config = fsdp_job(env, "fsdp-kill")
    # 1 s a step: after checkpoint 2 commits, the kill lands seconds before the last step
    p = env.launch(config, delay=1.0)
    wait_until(lambda: any(s >= 2 for s in committed_steps(env, "fsdp-kill")), 120, "checkpoint step 2", (p,))
    pids = wait_until(lambda: worker_pids(p).get(1) and worker_pids(p), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    assert wait(p) not in (0, EXIT_PREEMPTED), tail(p)
    assert max(committed_steps(env, "fsdp-kill")) < STEPS

    p2 = relaunch_until_done(env, config)
    resumed = progress(env, "fsdp-kill")["resumed_from"]
    assert resumed is not None and 2 <= resumed["step"] < STEPS, tail(p2)
    assert f"resuming from {resumed['uri']}" in tail(p2, 400)
    restored = assert_sharded_checkpoint(env, "fsdp-kill", fsdp_model, tmp_path / "kill-ckpt")

    got, want = losses(env, "fsdp-kill"), losses(ref, "fsdp-ref")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for s in range(resumed["step"] + 1, STEPS + 1):
        assert abs(got[s] - want[s]) <= REL_TOL * abs(want[s]), (s, got[s], want[s])
    import torch

    a, b = final_weights(env, "fsdp-kill"), final_weights(ref, "fsdp-ref")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k
    # the last checkpoint (step STEPS) is the exported model, shard for shard
    assert a.keys() <= restored.keys()
    for k in a:
        assert torch.equal(restored[k], a[k]), k
