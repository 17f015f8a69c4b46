"""Full fine-tuning under FSDP (`parallel_config.strategy: fsdp`) survives kill -9 of a rank, end to end.

Same harness as tests/test_resilience_e2e.py: the real pod command (supervise -> torchrun, 2 gloo
processes), checkpoints in SeaweedFS, a relaunch with a fresh cache so it can only resume from S3.

What is true on CPU (this machine): accelerate builds FSDP only on GPUs/accelerators
(AcceleratorState turns the plugin on for MULTI_GPU-like types, never MULTI_CPU), so a
`strategy: fsdp` gang on CPU trains as DDP, each rank holding the whole model; train.py says so in a
warning and leaves FSDP out of the TrainingArguments there. The checkpoint is then the Trainer's
plain layout written by rank 0: ONE full model.safetensors and ONE full optimizer.pt (every
parameter's Adam moments at full shape), scheduler, trainer_state, and every rank's
rng_state_<rank>.pth (gathered by resilience.py). There are no per-rank shard files
(pytorch_model_fsdp_0/, optimizer_0/, *.distcp) to collect; the test asserts exactly this layout, so
a change to sharded saving shows up here and must add those files to the committed checkpoint.
"""

from __future__ import annotations

import io
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


def assert_full_state_checkpoint(env: Env, name: str, base_model: Path) -> None:
    """The committed checkpoint is one full model and optimizer state, with both ranks' RNG."""
    import torch
    from safetensors.torch import load, load_file

    store, last = latest(env, name)
    m = last.manifest
    assert m.world_size == 2 and m.extra["strategy"] == "fsdp" and m.extra["pet_type"] == "full"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(m.files)
    assert {f for f in m.files if f.startswith("rng_state_")} == {"rng_state_0.pth", "rng_state_1.pth"}
    # no sharded layout (torch.distributed.checkpoint *.distcp / pytorch_model_fsdp_0/ / optimizer_0/)
    assert not [f for f in m.files if "/" in f or f.endswith(".distcp") or "fsdp" in f], sorted(m.files)

    args = torch.load(io.BytesIO(store.get_bytes(f"{last.name}/training_args.bin")), weights_only=False)
    assert not args.fsdp and args.use_cpu  # on CPU the gang trains as DDP (module docstring)

    base = load_file(str(next(base_model.glob("*.safetensors"))))
    weights = load(store.get_bytes(f"{last.name}/model.safetensors"))
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in base.items()}
    opt = torch.load(io.BytesIO(store.get_bytes(f"{last.name}/optimizer.pt")), weights_only=False)
    moments = sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values())
    assert moments == sorted(tuple(v.shape) for v in base.values())  # full shapes, not halves


def test_fsdp_full_finetune_kill_9_then_relaunch_resumes_exactly(s3_server, fsdp_model, tmp_path):
    bucket = s3_server.new_bucket()
    ref = Env(s3_server, bucket, tmp_path / "ref", fsdp_model)
    ref.tmp.mkdir()
    p = relaunch_until_done(ref, fsdp_job(ref, "fsdp-ref"), delay=0)
    assert "strategy fsdp: accelerate shards only on GPUs" in tail(p, 400)
    assert progress(ref, "fsdp-ref")["resumed_from"] is None
    assert_full_state_checkpoint(ref, "fsdp-ref", fsdp_model)

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
    assert_full_state_checkpoint(env, "fsdp-kill", fsdp_model)

    got, want = losses(env, "fsdp-kill"), losses(ref, "fsdp-ref")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    for s in range(resumed["step"] + 1, STEPS + 1):
        assert abs(got[s] - want[s]) <= REL_TOL * abs(want[s]), (s, got[s], want[s])
    import torch

    a, b = final_weights(env, "fsdp-kill"), final_weights(ref, "fsdp-ref")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k
