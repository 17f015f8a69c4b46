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
from tests.fixtures_resilience import (
    REL_TOL,
    Env,
    committed_steps,
    progress,
    relaunch_gang_until_done,
    relaunch_until_done,
    tail,
    wait,
    wait_until,
    worker_pids,
)
from tests.fixtures_s3 import free_port

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


@pytest.fixture(scope="module")
def fsdp_ref(s3_server, fsdp_model, tmp_path_factory) -> Env:
    """One uninterrupted 2-process FSDP run: what every resumed run must reproduce."""
    ref = Env(s3_server, s3_server.new_bucket(), tmp_path_factory.mktemp("fsdp-ref"), fsdp_model)
    p = relaunch_until_done(ref, fsdp_job(ref, "fsdp-ref"), delay=0)
    assert "sharded over 2 processes (FSDP2 on cpu)" in tail(p, 400)
    assert progress(ref, "fsdp-ref")["resumed_from"] is None
    return ref


def assert_same_run(env: Env, name: str, ref: Env, after_step: int, tmp: Path) -> None:
    """Losses after the resume point and the final weights equal the reference run's; the last
    (sharded) checkpoint reassembles into exactly the exported model."""
    import torch

    restored = assert_sharded_checkpoint(env, name, env.model, tmp)
    got, want = losses(env, name), losses(ref, "fsdp-ref")
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(want)
    assert after_step < STEPS
    for s in range(after_step + 1, STEPS + 1):
        assert abs(got[s] - want[s]) <= REL_TOL * abs(want[s]), (s, got[s], want[s])
    a, b = final_weights(env, name), final_weights(ref, "fsdp-ref")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k
    assert a.keys() <= restored.keys()
    for k in a:
        assert torch.equal(restored[k], a[k]), k


def kill_rank_1_after_step_2(env: Env, config: Path, name: str) -> None:
    """Launch the job at 1 s a step and SIGKILL rank 1 once checkpoint 2 has committed."""
    p = env.launch(config, delay=1.0)
    wait_until(lambda: any(s >= 2 for s in committed_steps(env, name)), 120, "checkpoint step 2", (p,))
    pids = wait_until(lambda: worker_pids(p).get(1) and worker_pids(p), 10, "rank 1's pid")
    os.kill(pids[1], signal.SIGKILL)
    assert wait(p) not in (0, EXIT_PREEMPTED), tail(p)


def test_fsdp_reference_checkpoint_is_sharded(fsdp_ref, tmp_path):
    restored = assert_sharded_checkpoint(fsdp_ref, "fsdp-ref", fsdp_ref.model, tmp_path)
    assert restored


def test_fsdp_full_finetune_kill_9_then_relaunch_resumes_exactly(fsdp_ref, s3_server, tmp_path):
    env = Env(s3_server, fsdp_ref.bucket, tmp_path, fsdp_ref.model)
    config = fsdp_job(env, "fsdp-kill")
    # 1 s a step: after checkpoint 2 commits, the kill lands seconds before the last step
    kill_rank_1_after_step_2(env, config, "fsdp-kill")
    assert max(committed_steps(env, "fsdp-kill")) < STEPS

    p2 = relaunch_until_done(env, config)
    resumed = progress(env, "fsdp-kill")["resumed_from"]
    assert resumed is not None and 2 <= resumed["step"] < STEPS, tail(p2)
    assert f"resuming from {resumed['uri']}" in tail(p2, 400)
    assert_same_run(env, "fsdp-kill", fsdp_ref, resumed["step"], tmp_path / "ckpt")


def test_fsdp_two_nodes_each_uploads_its_shards_and_the_gang_resumes(fsdp_ref, s3_server, tmp_path):
    """Two 'nodes' (two torchrun launches, one process each, separate disks): node 1's weight and
    optimizer shards exist only on node 1, so they reach the checkpoint through node 1's own upload."""
    from kubetune_trainer.fsdp import MODEL_DIR

    env = Env(s3_server, fsdp_ref.bucket, tmp_path, fsdp_ref.model)
    config = fsdp_job(env, "fsdp-nodes")

    def gang(port: int, delay: float) -> list[Any]:
        return [
            env.launch(config, nproc=1, nnodes=2, node_rank=r, rdzv_port=port, cache=f"node{r}-{port}", delay=delay)
            for r in (0, 1)
        ]  # fmt: skip

    nodes = gang(free_port(), 1.0)
    wait_until(
        lambda: any(s >= 2 for s in committed_steps(env, "fsdp-nodes")),
        150,
        "checkpoint step 2",
        tuple(nodes),
    )
    store, last = latest(env, "fsdp-nodes")
    assert {f"{MODEL_DIR}/__0_0.distcp", f"{MODEL_DIR}/__1_0.distcp", "rng_state_1.pth"} <= set(
        last.manifest.files
    )
    part = json.loads(store.get_bytes(f"{last.name}/{ck.PARTS_DIR}/node-1.json"))
    # node 1 uploaded rank 1's files itself; node 0 listed them in COMMITTED
    assert f"{MODEL_DIR}/__1_0.distcp" in part["files"] and "rng_state_1.pth" in part["files"]
    assert all(last.manifest.files[rel] == meta for rel, meta in part["files"].items())

    rank1 = wait_until(lambda: {**worker_pids(nodes[0]), **worker_pids(nodes[1])}.get(1), 10, "rank 1's pid")
    os.kill(rank1, signal.SIGKILL)
    for p in nodes:
        assert wait(p, 120) != 0
    assert max(committed_steps(env, "fsdp-nodes")) < STEPS
    relaunch_gang_until_done(lambda: gang(free_port(), 0.0))
    resumed = progress(env, "fsdp-nodes")["resumed_from"]
    assert resumed is not None and resumed["step"] >= 2
    assert_same_run(env, "fsdp-nodes", fsdp_ref, resumed["step"], tmp_path / "ckpt")


def test_fsdp_checkpoint_of_two_ranks_resumes_on_three(fsdp_ref, s3_server, tmp_path):
    """torch.distributed.checkpoint reshards: the 2-rank checkpoint loads into a 3-process gang with
    exactly the weights it saved, and that gang trains on and writes 3 shards. With an lr schedule
    that keeps lr > 0 at the end, an extra step after the resume would change the weights."""
    import torch

    from kubetune_trainer.fsdp import MODEL_DIR

    env = Env(s3_server, fsdp_ref.bucket, tmp_path, fsdp_ref.model)
    config = fsdp_job(env, "fsdp-reshard")
    doc = yaml.safe_load(config.read_text())
    doc["spec"]["training"]["max_steps"] = 4
    doc["spec"]["training"]["lr_scheduler_type"] = "constant"
    config.write_text(yaml.safe_dump(doc))
    relaunch_until_done(env, config, delay=0)
    saved = final_weights(env, "fsdp-reshard")

    # the same checkpoint (step 4 = max_steps) on 3 processes: nothing to train, the export is the load
    p = relaunch_until_done(env, config, delay=0, nproc=3)
    assert "written by 2 processes and this run has 3" in tail(p, 400) and "resharded" in tail(p, 400)
    loaded = final_weights(env, "fsdp-reshard")
    # resumed at its last step: nothing more is trained (the Trainer alone would take a step 5)
    assert committed_steps(env, "fsdp-reshard")[-1] == 4 and "step 5/" not in tail(p, 400)
    assert saved.keys() == loaded.keys() and saved
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k

    doc["spec"]["training"]["max_steps"] = 6
    config.write_text(yaml.safe_dump(doc))
    relaunch_until_done(env, config, delay=0, nproc=3)
    assert progress(env, "fsdp-reshard")["resumed_from"]["step"] == 4
    _, last = latest(env, "fsdp-reshard")
    assert last.step == 6 and last.manifest.world_size == 3
    assert {f"{MODEL_DIR}/__{r}_0.distcp" for r in range(3)} <= set(last.manifest.files)
    assert sorted(losses(env, "fsdp-reshard")) == list(range(1, 7))


# logged with every loss by the preference methods below, and equal after the resume
PAIR_METRICS = {"reward": ["accuracy", "margin"], "simpo": ["rewards/margins", "rewards/accuracies"]}


@pytest.mark.parametrize("method", sorted(PAIR_METRICS))
def test_fsdp_preference_methods_resume_exactly_after_kill_9(method, s3_server, fsdp_model, tmp_path):
    """A reward model (its new score head in the shards) and SimPO (no reference model), trained in
    full under FSDP: rank 1 killed after a commit, the relaunch continues the uninterrupted run."""
    import torch

    from tests.fixtures_preference import write_preferences

    prefs = write_preferences(tmp_path / "prefs.jsonl", 32)

    def job(env: Env, name: str) -> Path:
        path = fsdp_job(env, name)
        doc = yaml.safe_load(path.read_text())
        doc["spec"]["method"] = method
        doc["spec"]["dataset"] = {"uri": str(prefs)}
        doc["spec"]["training"].update(max_steps=6, seq_length=64)
        path.write_text(yaml.safe_dump(doc))
        return path

    def logged(env: Env, name: str) -> dict[int, dict[str, float]]:
        store, last = latest(env, name)
        history = json.loads(store.get_bytes(f"{last.name}/trainer_state.json"))["log_history"]
        return {h["step"]: h for h in history if "loss" in h}

    (tmp_path / "ref").mkdir(), (tmp_path / "kill").mkdir()
    ref = Env(s3_server, s3_server.new_bucket(), tmp_path / "ref", fsdp_model)
    relaunch_until_done(ref, job(ref, "ref"), delay=0)
    env = Env(s3_server, ref.bucket, tmp_path / "kill", fsdp_model)
    config = job(env, "kill")
    kill_rank_1_after_step_2(env, config, "kill")
    p2 = relaunch_until_done(env, config)
    resumed = progress(env, "kill")["resumed_from"]
    assert resumed is not None and 2 <= resumed["step"] < 6, tail(p2)

    got, want = logged(env, "kill"), logged(ref, "ref")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for s in range(resumed["step"] + 1, 7):
        for key in ["loss", *PAIR_METRICS[method]]:
            assert got[s][key] == pytest.approx(want[s][key], rel=REL_TOL, abs=1e-6), (s, key)
    a, b = final_weights(env, "kill"), final_weights(ref, "ref")
    assert a.keys() == b.keys() and ("score.weight" in a) == (method == "reward")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=REL_TOL, atol=1e-6), k
