"""Checkpoint commit protocol, choosing what to resume from, pruning, the background uploader, progress.json.

All against the real S3 server (SeaweedFS) unless a test says otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest

from kubetune.locations import COMPLETE_MARKER
from kubetune_trainer import checkpoints as ck
from kubetune_trainer.progress import (
    ProgressWriter,
    format_progress,
    local_progress_path,
    print_status,
    read_progress,
)
from kubetune_trainer.store import open_store
from kubetune_trainer.uploader import CheckpointUploader
from tests.fixtures_s3 import eventually

HASH = "aaaabbbbccccdddd"


def resume_choice(store, local_root: Path):
    """What a single-process resume ends up with (Resilience does this across the gang): the newest
    candidate that downloads and verifies, a rejected one de-committed; None when there is none."""
    for c in ck.candidates(store, spec_hash=HASH):
        try:
            return c, ck.download(store, c, local_root)
        except ck.CorruptCheckpoint as e:
            logging.getLogger("kubetune.checkpoints").warning("%s; falling back to the previous one", e)
            ck.decommit(store, c, str(e))
    return None


def fake_checkpoint(root: Path, step: int, world_size: int = 2, big: int = 50_000) -> Path:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(os.urandom(big))
    (d / "optimizer.pt").write_bytes(os.urandom(big // 2))
    (d / "scheduler.pt").write_bytes(b"sched" * 10)
    for r in range(world_size):
        (d / f"rng_state_{r}.pth").write_bytes(os.urandom(100))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


@pytest.fixture
def ckstore(s3):
    return s3.store("jobs/j/checkpoints")


def commit_steps(store, tmp_path, steps, spec_hash=HASH, world_size=2):
    out = {}
    for s in steps:
        d = fake_checkpoint(tmp_path / "local", s, world_size)
        out[s] = ck.commit(
            store, d, step=s, world_size=world_size, spec_hash=spec_hash, extra={"strategy": "ddp"}
        )
    return out


def test_commit_layout_and_manifest(ckstore, s3, tmp_path):
    d = fake_checkpoint(tmp_path, 7)
    c = ck.commit(ckstore, d, step=7, world_size=2, spec_hash=HASH, extra={"strategy": "ddp"})
    assert c.name == "step-00000007" and c.uri == s3.uri("jobs/j/checkpoints/step-00000007")
    keys = s3.keys("jobs/j/checkpoints/step-00000007/")
    assert "jobs/j/checkpoints/step-00000007/COMMITTED" in keys
    assert "jobs/j/checkpoints/step-00000007/rng_state_1.pth" in keys
    m = json.loads(ckstore.get_bytes("step-00000007/COMMITTED"))
    assert m["step"] == 7 and m["world_size"] == 2 and m["spec_hash"] == HASH and m["format"] == 1
    assert m["files"]["optimizer.pt"] == {"size": 25_000, "sha256": ck.sha256_file(d / "optimizer.pt")}
    assert "COMMITTED" not in m["files"]
    # committing the same step again is a no-op
    assert (
        ck.commit(ckstore, d, step=7, world_size=2, spec_hash=HASH).manifest.created_at
        == c.manifest.created_at
    )
    # download + verify round trip
    got = ck.download(ckstore, c, tmp_path / "resume")
    assert got == tmp_path / "resume" / "step-00000007"
    assert (got / "adapter_model.safetensors").read_bytes() == (d / "adapter_model.safetensors").read_bytes()
    assert ck.verify_local(got, c.manifest) == []
    # a second download reuses the verified copy
    t = (got / COMPLETE_MARKER).stat().st_mtime_ns
    assert ck.download(ckstore, c, tmp_path / "resume") == got
    assert (got / COMPLETE_MARKER).stat().st_mtime_ns == t


def test_uncommitted_is_never_used(ckstore, tmp_path):
    commit_steps(ckstore, tmp_path, [10])
    # an upload of step 20 that died before COMMITTED
    partial = fake_checkpoint(tmp_path / "p", 20)
    ckstore.upload_dir(partial, "step-00000020")
    committed, other = ck.scan(ckstore)
    assert [c.step for c in committed] == [10] and other == ["step-00000020"]
    got = resume_choice(ckstore, tmp_path / "r")
    assert got is not None and got[0].step == 10


def test_corrupt_newest_falls_back_to_previous(ckstore, tmp_path, caplog):
    commit_steps(ckstore, tmp_path, [10, 20])
    # same size, different bytes: only the sha256 check can see it
    data = bytearray(ckstore.get_bytes("step-00000020/optimizer.pt"))
    data[100] ^= 0xFF
    ckstore.put_bytes("step-00000020/optimizer.pt", bytes(data))
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoints"):
        ckpt, path = resume_choice(ckstore, tmp_path / "r")
    assert ckpt.step == 10 and path.name == "step-00000010"
    assert "fails its sha256 check" in caplog.text and "falling back" in caplog.text
    assert not (tmp_path / "r" / "step-00000020").exists()


def test_a_checkpoint_rejected_on_resume_is_decommitted_and_its_step_commits_again(ckstore, tmp_path, caplog):
    """Resume rejects step 30 (sha256) and falls back to 20: 30 is de-committed, so the retrained
    step 30 commits with its good files and the bad copy never counts toward keep_last."""
    commit_steps(ckstore, tmp_path, [10, 20, 30])
    data = bytearray(ckstore.get_bytes("step-00000030/optimizer.pt"))
    data[7] ^= 0xFF
    ckstore.put_bytes("step-00000030/optimizer.pt", bytes(data))
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoints"):
        ckpt, _ = resume_choice(ckstore, tmp_path / "r")
    assert ckpt.step == 20
    assert "de-committing" in caplog.text and "optimizer.pt fails its sha256 check" in caplog.text
    assert [c.step for c in ck.list_committed(ckstore)] == [10, 20]
    retrained = fake_checkpoint(tmp_path / "again", 30)
    ck.commit(ckstore, retrained, step=30, world_size=2, spec_hash=HASH)
    ck.prune(ckstore, keep_last=2, spec_hash=HASH)
    assert [c.step for c in ck.list_committed(ckstore)] == [20, 30]  # the good step 20 is kept
    got = ck.download(ckstore, ck.latest_committed(ckstore), tmp_path / "r2")
    assert (got / "optimizer.pt").read_bytes() == (retrained / "optimizer.pt").read_bytes()

    # a file missing (seen in the listing, before any download) is de-committed the same way
    ckstore.delete("step-00000030/rng_state_0.pth")
    assert [c.step for c in ck.candidates(ckstore, spec_hash=HASH)] == [20]
    assert [c.step for c in ck.list_committed(ckstore)] == [20]


def test_missing_or_truncated_file_and_bad_manifest_are_skipped(ckstore, tmp_path, caplog):
    commit_steps(ckstore, tmp_path, [10, 20, 30, 40])
    ckstore.delete("step-00000040/rng_state_1.pth")
    ckstore.put_bytes("step-00000030/optimizer.pt", b"short")
    ckstore.put_bytes("step-00000020/COMMITTED", b"{not json")
    with caplog.at_level(logging.WARNING):
        cands = ck.candidates(ckstore, spec_hash=HASH)
    assert [c.step for c in cands] == [10]
    assert "rng_state_1.pth is missing" in caplog.text
    assert "optimizer.pt has 5 bytes" in caplog.text
    assert "not a valid manifest" in caplog.text


def test_spec_change_refused_unless_start_over(ckstore, tmp_path):
    commit_steps(ckstore, tmp_path, [10, 20], spec_hash="0ld0ld0ld0ld0ld0")
    with pytest.raises(ck.SpecMismatch) as e:
        ck.candidates(ckstore, spec_hash=HASH)
    msg = str(e.value)
    assert "step-00000020" in msg and "0ld0ld0ld0ld0ld0" in msg and HASH in msg and "start_over" in msg
    assert ck.candidates(ckstore, spec_hash=HASH, on_spec_change="start_over") == []
    # after starting over, our own checkpoints are chosen even though older-spec ones have higher steps
    commit_steps(ckstore, tmp_path, [5])
    assert [c.step for c in ck.candidates(ckstore, spec_hash=HASH, on_spec_change="start_over")] == [5]
    # and pruning removes the other spec's checkpoints
    deleted = ck.prune(ckstore, keep_last=2, spec_hash=HASH)
    assert sorted(deleted) == ["step-00000010", "step-00000020"]
    assert [c.step for c in ck.list_committed(ckstore)] == [5]


def test_world_size_change(ckstore, tmp_path, caplog):
    commit_steps(ckstore, tmp_path, [10], world_size=2)
    with caplog.at_level(logging.WARNING):
        assert [c.step for c in ck.candidates(ckstore, spec_hash=HASH, world_size=4)] == [10]
    assert "written by 2 processes and this run has 4" in caplog.text


def test_fsdp_checkpoint_reshards_to_another_gang_but_not_to_one_process(s3, tmp_path, caplog):
    store = s3.store("jobs/fsdp/checkpoints")
    d = fake_checkpoint(tmp_path / "local", 10, world_size=2)
    ck.commit(store, d, step=10, world_size=2, spec_hash=HASH, extra={"strategy": "fsdp"})
    with caplog.at_level(logging.WARNING):
        assert [c.step for c in ck.candidates(store, spec_hash=HASH, world_size=3, strategy="fsdp")] == [10]
    assert "written by 2 processes and this run has 3" in caplog.text and "resharded" in caplog.text
    with pytest.raises(ck.CheckpointError, match="resumes only in a sharded gang"):
        ck.candidates(store, spec_hash=HASH, world_size=1, strategy="fsdp")


@pytest.mark.parametrize("backend", ["s3", "local"])
def test_keep_last_pruning(backend, request, tmp_path):
    store = (
        request.getfixturevalue("s3").store("p/checkpoints")
        if backend == "s3"
        else open_store(str(tmp_path / "store" / "checkpoints"))
    )
    commit_steps(store, tmp_path, [10, 20, 30])
    old_partial = fake_checkpoint(tmp_path / "p", 15)
    store.upload_dir(old_partial, "step-00000015")
    new_partial = fake_checkpoint(tmp_path / "p", 40)
    store.upload_dir(new_partial, "step-00000040")  # maybe an upload in flight: kept
    deleted = ck.prune(store, keep_last=2, spec_hash=HASH)
    assert sorted(deleted) == ["step-00000010", "step-00000015"]
    committed, other = ck.scan(store)
    assert [c.step for c in committed] == [20, 30] and other == ["step-00000040"]
    assert not store.list("step-00000010/") and not store.list("step-00000015/")
    # keep_last=1 keeps the newest, never zero
    ck.prune(store, keep_last=0)
    assert [c.step for c in ck.list_committed(store)] == [30]
    assert ck.clean_uncommitted(store) == ["step-00000040"]
    assert store.list_dirs() == ["step-00000030"]


# ---------------------------------------------------------------- uploader


def test_uploader_background_supersede_and_prune(ckstore, tmp_path):
    events = []
    up = CheckpointUploader(
        ckstore,
        spec_hash=HASH,
        world_size=2,
        keep_last=2,
        staging_dir=tmp_path / "staging",
        on_state=lambda what, step: events.append((what, step)),
    )
    try:
        dirs = [fake_checkpoint(tmp_path / "out", s, big=2_000_000) for s in (1, 2, 3, 4)]
        t0 = time.monotonic()
        for s, d in zip((1, 2, 3, 4), dirs, strict=True):
            up.submit(d, s)
        assert time.monotonic() - t0 < 2.0  # submit never waits for the store
        # the trainer may delete its local dirs at once (save_total_limit): staging holds hard links
        for d in dirs:
            for f in d.iterdir():
                f.unlink()
        assert up.wait_idle(60)
    finally:
        up.close()
    uploaded = [s for what, s in events if what == "uploading"]
    superseded = [s for what, s in events if what == "superseded"]
    assert uploaded[0] == 1 and uploaded[-1] == 4 and superseded  # 2 or 3 was replaced while waiting
    assert sorted(uploaded + superseded) == [1, 2, 3, 4]
    assert up.last_committed.step == 4
    assert [c.step for c in ck.list_committed(ckstore)][-1] == 4
    assert len(ck.list_committed(ckstore)) <= 2
    assert not any((tmp_path / "staging").iterdir())


def test_upload_survives_ten_seconds_of_s3_outage(s3, ckstore, tmp_path):
    """S3 down 10 s during an upload: the 'training' thread never waits, the upload is retried and commits."""
    up = CheckpointUploader(ckstore, spec_hash=HASH, world_size=2, keep_last=2, staging_dir=tmp_path / "st")
    try:
        d = fake_checkpoint(tmp_path / "out", 100, big=3_000_000)
        s3.outage(10.0)
        t_outage = time.monotonic()
        up.submit(d, 100)
        steps = 0
        while time.monotonic() - t_outage < 10.0:  # the training loop keeps stepping meanwhile
            time.sleep(0.01)
            steps += 1
        assert steps > 300
        assert ck.list_committed(ckstore) == []  # nothing could be committed while down
        assert up.wait_for_step(100, timeout=60)
    finally:
        up.close()
    committed = ck.list_committed(ckstore)
    assert [c.step for c in committed] == [100]
    got = ck.download(ckstore, committed[0], tmp_path / "dl")
    assert (got / "optimizer.pt").read_bytes() == (d / "optimizer.pt").read_bytes()


def test_a_failing_upload_gives_way_to_a_newer_checkpoint(s3, tmp_path):
    """S3 down: once step 2 is queued, step 1 (in flight, failing) is abandoned, so step 2 is the
    one that gets the store's first good minutes."""
    store = s3.store("jobs/newest/checkpoints", max_attempts=1)
    events: list[tuple[str, int]] = []
    up = CheckpointUploader(
        store, spec_hash=HASH, world_size=1, keep_last=3, staging_dir=tmp_path / "st",
        on_state=lambda what, step: events.append((what, step)),
    )  # fmt: skip
    try:
        s3.pause()
        up.submit(fake_checkpoint(tmp_path / "o", 1, world_size=1), 1)
        eventually(lambda: ("uploading", 1) in events, 10, "the upload of step 1")
        up.submit(fake_checkpoint(tmp_path / "o", 2, world_size=1), 2)
        eventually(lambda: ("uploading", 2) in events, 30, "step 2 to replace step 1 while S3 is down")
        assert ("abandoned", 1) in events
        s3.resume()
        assert up.wait_for_step(2, timeout=60)
    finally:
        s3.resume()
        up.close()
    assert [c.step for c in ck.list_committed(store)] == [2] and up.committed_steps == [2]


def test_an_urgent_checkpoint_stops_the_in_flight_upload_part_way(s3, throttled_s3, tmp_path):
    """A slow link: the SIGTERM checkpoint does not wait for an older one's big files to finish."""
    slow = throttled_s3(1_000_000)
    store = open_store(s3.uri("jobs/urgent/checkpoints"), slow.settings)
    events: list[tuple[str, int]] = []
    up = CheckpointUploader(
        store, spec_hash=HASH, world_size=1, keep_last=3, staging_dir=tmp_path / "st",
        on_state=lambda what, step: events.append((what, step)),
    )  # fmt: skip
    try:
        # larger than the client's socket buffers (4 MB): 8 and 16 s at this rate
        up.submit(fake_checkpoint(tmp_path / "o", 1, world_size=1, big=16_000_000), 1)
        eventually(lambda: ("uploading", 1) in events, 10, "the upload of step 1")
        time.sleep(1.0)  # its big files are on their way
        up.submit(fake_checkpoint(tmp_path / "o", 2, world_size=1, big=20_000), 2, urgent=True)
        assert up.wait_for_step(2, timeout=60)
        step1 = s3.keys("jobs/urgent/checkpoints/step-00000001/")
    finally:
        up.close()
    assert ("abandoned", 1) in events and up.committed_steps == [2]
    # step 1's big files never completed: they were cut off for step 2, not uploaded first
    assert not [k for k in step1 if k.endswith(("adapter_model.safetensors", "optimizer.pt"))], step1
    assert [c.step for c in ck.list_committed(store)] == [2]


def test_urgent_submit_abandons_inflight_upload(s3, ckstore, tmp_path):
    up = CheckpointUploader(ckstore, spec_hash=HASH, world_size=1, keep_last=3, staging_dir=tmp_path / "st")
    try:
        s3.pause()  # step 1 hangs retrying
        up.submit(fake_checkpoint(tmp_path / "o", 1, world_size=1), 1)
        time.sleep(1.0)
        up.submit(fake_checkpoint(tmp_path / "o", 2, world_size=1), 2, urgent=True)
        time.sleep(0.5)
        s3.resume()
        assert up.wait_for_step(2, timeout=60)
        assert up.wait_idle(30)
    finally:
        up.close()
    assert [c.step for c in ck.list_committed(ckstore)] == [2]
    assert 1 not in up.committed_steps


# ---------------------------------------------------------------- several nodes


def node_dir(root: Path, step: int, ranks: list[int]) -> Path:
    """What one node has on disk after a save: its own ranks' RNG states and FSDP shards."""
    d = root / f"checkpoint-{step}"
    (d / "pytorch_model_fsdp_0").mkdir(parents=True, exist_ok=True)
    for r in ranks:
        (d / f"rng_state_{r}.pth").write_bytes(os.urandom(100))
        (d / "pytorch_model_fsdp_0" / f"__{r}_0.distcp").write_bytes(os.urandom(20_000))
    return d


def node_uploaders(ckstore, tmp_path, nodes: int, token: str = "gang-a") -> list[CheckpointUploader]:
    return [
        CheckpointUploader(
            ckstore,
            spec_hash=HASH,
            world_size=2 * nodes,
            keep_last=2,
            staging_dir=tmp_path / f"st{n}",
            node=n,
            nodes=nodes,
            token=token,
        )  # fmt: skip
        for n in range(nodes)
    ]


def test_nodes_upload_their_own_parts_and_node_0_commits_all(ckstore, tmp_path):
    ups = node_uploaders(ckstore, tmp_path, nodes=3)
    try:
        dirs = [node_dir(tmp_path / f"node{n}", 4, [2 * n, 2 * n + 1]) for n in range(3)]
        (dirs[0] / "trainer_state.json").write_text("{}")  # only rank 0 writes the Trainer's own files
        ups[0].submit(dirs[0], 4)
        time.sleep(1.5)
        assert ck.list_committed(ckstore) == []  # node 0 waits for nodes 1 and 2
        ups[2].submit(dirs[2], 4)
        ups[1].submit(dirs[1], 4)
        assert ups[0].wait_for_step(4, timeout=60)
        assert ups[1].wait_for_step(4, timeout=10) and ups[2].wait_for_step(4, timeout=10)
    finally:
        for up in ups:
            up.close()
    assert ups[1].last_committed is None and ups[1].committed_steps == []  # only node 0 commits
    (c,) = ck.list_committed(ckstore)
    want = {"trainer_state.json"} | {
        f for r in range(6) for f in (f"rng_state_{r}.pth", f"pytorch_model_fsdp_0/__{r}_0.distcp")
    }
    assert set(c.manifest.files) == want
    got = ck.download(ckstore, c, tmp_path / "dl")  # every file, verified against the merged manifest
    assert (got / "pytorch_model_fsdp_0/__5_0.distcp").read_bytes() == (
        dirs[2] / "pytorch_model_fsdp_0/__5_0.distcp"
    ).read_bytes()


def test_node_0_ignores_parts_of_another_gang_and_conflicting_files_fail(ckstore, tmp_path):
    # a part left by an earlier attempt's node 1 (another token) does not count
    stale = node_dir(tmp_path / "stale", 2, [1])
    ck.upload_part(ckstore, stale, step=2, node=1, token="old-gang")
    ups = node_uploaders(ckstore, tmp_path, nodes=2, token="new-gang")
    try:
        ups[0].submit(node_dir(tmp_path / "n0", 2, [0]), 2)
        time.sleep(1.5)
        assert ck.list_committed(ckstore) == []
        fresh = node_dir(tmp_path / "n1", 2, [1])
        ups[1].submit(fresh, 2)
        assert ups[0].wait_for_step(2, timeout=60)
    finally:
        for up in ups:
            up.close()
    (c,) = ck.list_committed(ckstore)
    assert c.manifest.files["rng_state_1.pth"]["sha256"] == ck.sha256_file(fresh / "rng_state_1.pth")

    # two nodes that wrote different contents under one name: never committed
    a, b = node_dir(tmp_path / "a", 3, [0]), node_dir(tmp_path / "b", 3, [1])
    (b / "rng_state_0.pth").write_bytes(b"not node 0's")
    ck.upload_part(ckstore, b, step=3, node=1, token="t")
    parts = lambda: ck.collect_parts(ckstore, 3, nodes=2, token="t")  # noqa: E731
    with pytest.raises(ck.CheckpointError, match="two nodes wrote different versions of rng_state_0.pth"):
        ck.commit(ckstore, a, step=3, world_size=2, spec_hash=HASH, other_nodes=parts)
    assert [x.step for x in ck.list_committed(ckstore)] == [2]


def test_node_0_stops_waiting_for_a_step_a_newer_checkpoint_replaced(ckstore, tmp_path):
    """A slow node may drop step 2 for step 4 (its pending slot holds one); node 0 then moves on too."""
    ups = node_uploaders(ckstore, tmp_path, nodes=2)
    try:
        ups[0].submit(node_dir(tmp_path / "n0", 2, [0]), 2)
        time.sleep(1.0)  # node 0 is waiting for node 1's part of step 2, which never comes
        ups[0].submit(node_dir(tmp_path / "n0", 4, [0]), 4)
        ups[1].submit(node_dir(tmp_path / "n1", 4, [1]), 4)
        assert ups[0].wait_for_step(4, timeout=60)
    finally:
        for up in ups:
            up.close()
    assert ups[0].committed_steps == [4]
    assert [c.step for c in ck.list_committed(ckstore)] == [4]


# ---------------------------------------------------------------- progress


def test_progress_writer_and_status(s3, tmp_path, capsys):
    from kubetune.spec import FineTuneJob

    out = s3.store("jobs/demo")
    w = ProgressWriter(out, job="demo", attempt=2, world_size=4, interval=0.2)
    try:
        w.update(step=120, total_steps=300, epoch=1.2, loss=2.3456, tokens_per_second=5120.0, eta_seconds=310)
        w.set_state("running", wait=10)
        p = read_progress(out)
        assert p.step == 120 and p.percent == 40 and p.state == "running" and p.attempt == 2
        for i in range(50):  # many updates coalesce into few writes
            w.update(step=121 + i)
        w.update(last_checkpoint={"uri": s3.uri("jobs/demo/checkpoints/step-00000150"), "step": 150})
        w.set_state("done", wait=10)
        p = read_progress(out)
        assert p.step == 170 and p.state == "done" and p.last_checkpoint.step == 150
        # the store going away never raises into training
        s3.pause()
        w.update(step=171)
        time.sleep(0.5)
        s3.resume()
        assert w.flush(20)
    finally:
        w.close()
    text = format_progress(read_progress(out))
    assert "demo: done" in text and "step 171/300 (57%)" in text and "step-00000150 (step 150)" in text

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "demo"},
            "spec": {
                "model": {"uri": "file:///m"},
                "dataset": {"uri": "file:///d.json"},
                "output": {"uri": s3.uri("jobs/demo")},
                "storage": {"s3": {"endpoint": s3.endpoint}},
            },
        }
    )
    assert print_status(job) == 0
    assert "demo: done, attempt 2, 4 processes" in capsys.readouterr().out
    job.spec.output.uri = s3.uri("jobs/none")
    assert print_status(job) == 1
    assert "no progress.json" in capsys.readouterr().err


def test_progress_says_since_when_the_store_is_unreachable(s3, tmp_path, capsys, monkeypatch):
    """While S3 is down the local copy is current and says so; `kubetune status` shows it."""
    from kubetune.spec import FineTuneJob

    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "down"},
            "spec": {
                "model": {"uri": "file:///m"}, "dataset": {"uri": "file:///d.json"},
                "output": {"uri": s3.uri("jobs/down")}, "storage": {"s3": {"endpoint": s3.endpoint}},
            },
        }
    )  # fmt: skip
    local = local_progress_path("down", s3.uri("jobs/down"))
    w = ProgressWriter(s3.store("jobs/down", max_attempts=1), job="down", interval=0.2, local_copy=local)
    try:
        w.update(step=5, total_steps=10)
        w.set_state("running", wait=10)
        s3.pause()
        w.update(step=6)
        down = eventually(lambda: (w.outage() or {}).get("failed_attempts", 0) >= 2, 30, "two failed writes")
        assert down
        doc = json.loads(local.read_text())
        assert doc["step"] == 6 and doc["store_unreachable"]["failed_attempts"] >= 2
        assert print_status(job) == 0  # the store does not answer: the local copy
        out = capsys.readouterr().out
        assert f"store unreachable since {doc['store_unreachable']['since']} (" in out
        assert "failed attempts)" in out and "step 6/10" in out and "the local copy" in out
        s3.resume()
        assert w.flush(30)
    finally:
        s3.resume()
        w.close()
    assert w.outage() is None and json.loads(local.read_text())["store_unreachable"] is None
    assert read_progress(s3.store("jobs/down")).store_unreachable is None
    assert print_status(job) == 0 and "unreachable" not in capsys.readouterr().out


def test_progress_writer_coalesces(tmp_path):
    class Counting:
        def __init__(self):
            self.n = 0
            self.store = open_store(str(tmp_path))

        def put_bytes(self, k, b):
            self.n += 1
            self.store.put_bytes(k, b)

        def uri_for(self, k):
            return k

    st = Counting()
    w = ProgressWriter(st, interval=0.5)  # type: ignore[arg-type]
    stop = time.monotonic() + 1.2
    while time.monotonic() < stop:
        w.update(step=int(time.monotonic() * 1000))
        time.sleep(0.001)
    w.close()
    assert 2 <= st.n <= 6
    assert threading.active_count() < 50


# a progress.json as the trainer wrote it before the document had a type (kept: old files must parse)
OLD_PROGRESS = {
    "job": "demo", "attempt": 2, "state": "running", "reason": None, "step": 120, "total_steps": 300,
    "percent": 40, "epoch": 1.2, "loss": 2.31, "tokens_per_second": 5120.0, "eta_seconds": 310.0,
    "rewards": {"chosen": 0.4, "rejected": -0.9, "margins": 1.3, "accuracies": 0.95},
    "last_checkpoint": {"uri": "s3://b/jobs/demo/checkpoints/step-00000100", "step": 100},
    "checkpoint_error": None, "resumed_from": None, "store_unreachable": None, "world_size": 4,
    "started_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:05:00Z",
}  # fmt: skip


def test_progress_json_keeps_its_format_and_older_files_parse(tmp_path):
    from kubetune.progress import TrainerProgress

    p = TrainerProgress.from_json(json.dumps(OLD_PROGRESS))
    assert p.last_checkpoint.step == 100 and p.rewards["margins"] == 1.3 and p.state == "running"
    assert json.loads(p.to_json()) == OLD_PROGRESS
    # an older trainer's file without the later keys, and a newer one's with keys this one lacks
    bare = TrainerProgress.from_json('{"job": "x", "state": "done", "step": 3, "future_key": [1]}')
    assert bare.step == 3 and bare.last_checkpoint is None and bare.store_unreachable is None
    assert bare.model_extra == {"future_key": [1]}
    with pytest.raises(ValueError):
        TrainerProgress.from_json('{"state": "exploded"}')

    w = ProgressWriter(open_store(str(tmp_path / "out")), job="demo", interval=0.1)
    w.update(step=1, total_steps=4)
    w.close()
    written = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert set(written) == set(OLD_PROGRESS) - {"rewards"}  # rewards: preference methods only
    assert written["percent"] == 25 and written["state"] == "starting"
