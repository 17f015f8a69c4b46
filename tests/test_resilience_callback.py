"""Resilience and its Trainer callback in one process, driven event by event (fast; no model).

The multi-process behaviour (agreement, RNG gathering, exact resume) is tested end to end in
test_resilience_e2e.py; here each rule is checked directly against a local or S3 store.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from kubetune.conventions import EXIT_PREEMPTED
from kubetune.spec import FineTuneJob
from kubetune_trainer import checkpoints as ck
from kubetune_trainer.resilience import Resilience
from kubetune_trainer.store import open_store


def make_job(output: str, storage: dict | None = None, **checkpoint) -> FineTuneJob:
    spec = {
        "model": {"uri": "/m"},
        "dataset": {"uri": "/d.json"},
        "output": {"uri": output},
        "checkpoint": {"every_steps": 1000, "keep_last": 2, **checkpoint},
    }
    if storage:
        spec["storage"] = storage
    return FineTuneJob.model_validate(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "cb"},
            "spec": spec,
        }
    )


class Loop:
    """Stands in for the Trainer: state, control, output_dir with checkpoint-N dirs."""

    def __init__(self, tmp: Path, max_steps: int = 100) -> None:
        from transformers import TrainerControl, TrainerState

        self.state = TrainerState(max_steps=max_steps)
        self.control = TrainerControl()
        self.args = type("Args", (), {"output_dir": str(tmp / "checkpoints")})()

    def step(self, cb) -> None:
        self.state.global_step += 1
        self.control.should_save = False
        cb.on_step_end(self.args, self.state, self.control)

    def save(self, cb) -> Path:
        d = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(os.urandom(2000))
        (d / "optimizer.pt").write_bytes(os.urandom(4000))
        (d / "rng_state.pth").write_bytes(os.urandom(100))
        (d / "trainer_state.json").write_text(json.dumps({"global_step": self.state.global_step}))
        cb.on_save(self.args, self.state, self.control)
        return d


@pytest.fixture
def single_process(monkeypatch, tmp_path):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(k, raising=False)
    marker = tmp_path / "marker"
    monkeypatch.setenv("KUBETUNE_PREEMPT_MARKER", str(marker))
    return marker


def test_saves_are_committed_in_the_background_and_progress_follows(single_process, tmp_path):
    job = make_job(str(tmp_path / "out"), every_minutes=0.04)  # a timed save every 2.4 s
    loop = Loop(tmp_path, max_steps=5)
    with Resilience(job, workdir=tmp_path / "work") as res:
        assert res.resume_from is None
        (cb,) = res.callbacks()
        cb.on_train_begin(loop.args, loop.state, loop.control)
        loop.step(cb)
        assert not loop.control.should_save
        time.sleep(2.5)
        loop.step(cb)
        assert loop.control.should_save  # every_minutes elapsed
        loop.save(cb)
        assert res.uploader.wait_for_step(2, 30)  # (a newer save would supersede it while still queued)
        loop.step(cb)
        assert not loop.control.should_save
        loop.state.global_step = 4
        loop.step(cb)  # the last step always saves
        assert loop.control.should_save
        loop.save(cb)
        cb.on_train_end(loop.args, loop.state, loop.control)
        res.finish(type("R", (), {"completed": True, "global_step": 5})())
    store = open_store(str(tmp_path / "out" / "checkpoints"))
    assert [c.step for c in ck.list_committed(store)] == [2, 5]
    p = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert p["state"] == "done" and p["last_checkpoint"]["step"] == 5 and p["total_steps"] == 5
    assert not single_process.exists()


def test_sigterm_mid_step_saves_commits_and_marks(single_process, s3, tmp_path):
    job = make_job(s3.uri("jobs/cb"), {"s3": {"endpoint": s3.endpoint}}, sigterm_grace_seconds=10)
    loop = Loop(tmp_path)
    with Resilience(job, workdir=tmp_path / "work") as res:
        (cb,) = res.callbacks()
        cb.on_train_begin(loop.args, loop.state, loop.control)
        loop.step(cb)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: only a flag
        assert res.sigterm_at is not None and not loop.control.should_training_stop
        loop.step(cb)  # the next step boundary
        assert loop.control.should_save and loop.control.should_training_stop
        t0 = time.monotonic()
        loop.save(cb)  # returns once COMMITTED is written
        assert time.monotonic() - t0 < 10
        assert res.preempt_committed is True
        cb.on_train_end(loop.args, loop.state, loop.control)
        res.finish(type("R", (), {"completed": False, "global_step": 2})())
    assert single_process.exists()
    assert [c.step for c in ck.list_committed(s3.store("jobs/cb/checkpoints"))] == [2]
    p = json.loads(s3.store("jobs/cb").get_bytes("progress.json"))
    assert p["state"] == "preempted" and "checkpoint step 2 committed" in p["reason"]


def test_sigterm_with_s3_down_is_not_reported_as_committed(single_process, s3, tmp_path):
    from kubetune_trainer.store import TransientStoreError

    job = make_job(s3.uri("jobs/down"), {"s3": {"endpoint": s3.endpoint}}, sigterm_grace_seconds=5)
    loop = Loop(tmp_path)
    with pytest.raises(
        TransientStoreError, match="not be committed within checkpoint.sigterm_grace_seconds=5"
    ):
        with Resilience(job, workdir=tmp_path / "work") as res:
            (cb,) = res.callbacks()
            cb.on_train_begin(loop.args, loop.state, loop.control)
            s3.pause()
            os.kill(os.getpid(), signal.SIGTERM)
            loop.step(cb)
            t0 = time.monotonic()
            loop.save(cb)
            assert 2 < time.monotonic() - t0 < 5  # gave up inside the grace budget
            assert res.preempt_committed is False
            res.finish(type("R", (), {"completed": False, "global_step": 1})())
    s3.resume()
    assert not single_process.exists()


def test_ctrl_c_saves_commits_at_the_next_step_and_says_so(single_process, s3, tmp_path, capsys):
    job = make_job(s3.uri("jobs/int"), {"s3": {"endpoint": s3.endpoint}}, sigterm_grace_seconds=10)
    loop = Loop(tmp_path)
    with pytest.raises(SystemExit) as e:
        with Resilience(job, workdir=tmp_path / "work") as res:
            (cb,) = res.callbacks()
            cb.on_train_begin(loop.args, loop.state, loop.control)
            loop.step(cb)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C mid-step: only a flag, no KeyboardInterrupt
            loop.step(cb)
            assert loop.control.should_save and loop.control.should_training_stop
            loop.save(cb)  # returns once COMMITTED is written
            assert res.preempt_committed is True
            cb.on_train_end(loop.args, loop.state, loop.control)
            res.finish(type("R", (), {"completed": False, "global_step": 2})())
    assert e.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "kubetune: interrupted: at step 2; checkpoint 2 committed; run again to resume"
    )
    assert [c.step for c in ck.list_committed(s3.store("jobs/int/checkpoints"))] == [2]
    p = json.loads(s3.store("jobs/int").get_bytes("progress.json"))
    assert p["state"] == "preempted" and p["reason"] == "SIGINT; checkpoint step 2 committed"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_second_ctrl_c_stops_at_once(single_process, s3, tmp_path):
    job = make_job(s3.uri("jobs/int2"), {"s3": {"endpoint": s3.endpoint}}, sigterm_grace_seconds=30)
    loop = Loop(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with Resilience(job, workdir=tmp_path / "work") as res:
            (cb,) = res.callbacks()
            cb.on_train_begin(loop.args, loop.state, loop.control)
            s3.pause()  # the save below could never commit
            os.kill(os.getpid(), signal.SIGINT)
            loop.step(cb)
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()  # impatient user
            t0 = time.monotonic()
            loop.save(cb)  # waits for the commit until the second Ctrl-C
    assert time.monotonic() - t0 < 6  # not the 27 s left of the grace, nor the uploader's 20 s
    s3.resume()


def test_sigterm_before_training_exits_preempted_at_once(single_process, tmp_path):
    job = make_job(str(tmp_path / "out"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        with Resilience(job, workdir=tmp_path / "work"):
            os.kill(os.getpid(), signal.SIGTERM)  # e.g. while the model loads
            time.sleep(5)
    assert e.value.code == EXIT_PREEMPTED and single_process.exists()
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["state"] == "preempted"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_start_resumes_from_the_newest_valid_checkpoint(single_process, s3, tmp_path):
    job = make_job(s3.uri("jobs/res"), {"s3": {"endpoint": s3.endpoint}})
    store = s3.store("jobs/res/checkpoints")
    for step in (10, 20):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "optimizer.pt").write_bytes(os.urandom(3000))
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        ck.commit(store, d, step=step, world_size=1, spec_hash=job.spec.training_hash())
    store.upload_dir(tmp_path / "c20", "step-00000030")  # a partial upload: never used, cleaned
    bad = bytearray(store.get_bytes("step-00000020/optimizer.pt"))
    bad[0] ^= 1
    store.put_bytes("step-00000020/optimizer.pt", bytes(bad))
    with Resilience(job, workdir=tmp_path / "work") as res:
        assert res.resumed is not None and res.resumed.step == 10
        assert res.resume_from == tmp_path / "work" / "resume" / "step-00000010"
        assert json.loads((res.resume_from / "trainer_state.json").read_text())["global_step"] == 10
    assert "step-00000030" not in store.list_dirs()
    # the rejected step 20 is no longer committed: its retrained successor will commit normally
    assert [c.step for c in ck.list_committed(store)] == [10]
    p = json.loads(s3.store("jobs/res").get_bytes("progress.json"))
    assert p["resumed_from"]["step"] == 10


def test_bad_credentials_fail_at_start_naming_bucket_and_endpoint(single_process, s3, tmp_path, monkeypatch):
    from kubetune_trainer.errors import JobError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    job = make_job(s3.uri("jobs/creds"), {"s3": {"endpoint": s3.endpoint}})
    with pytest.raises(JobError) as e:
        with Resilience(job, workdir=tmp_path / "work"):
            pass
    assert str(e.value).startswith(f"spec.output.uri: cannot write to {s3.uri('jobs/creds')}: ")
    assert "access denied" in str(e.value) and s3.bucket in str(e.value) and s3.endpoint in str(e.value)
    assert "wrong-secret-value" not in str(e.value)


def test_unreachable_store_at_resume_fails_the_attempt_instead_of_falling_back(
    single_process, tmp_path, monkeypatch
):
    from kubetune_trainer import resilience
    from kubetune_trainer.store import StoreError, TransientStoreError

    job = make_job(str(tmp_path / "out"))
    store = open_store(str(tmp_path / "out" / "checkpoints"))
    for step in (10, 20):
        d = tmp_path / f"c{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        ck.commit(store, d, step=step, world_size=1, spec_hash=job.spec.training_hash())

    def unreachable(store, c, root, **kw):
        raise TransientStoreError(f"{c.uri}: cannot reach the store")

    monkeypatch.setattr(resilience.ck, "download", unreachable)
    with pytest.raises(StoreError, match="could not download checkpoint .*step-00000020"):
        with Resilience(job, workdir=tmp_path / "work"):
            pass


def test_write_denied_credentials_fail_before_anything_loads(single_process, s3, tmp_path, monkeypatch):
    """A read-only identity: one line naming the field, the URI and where the credentials came from."""
    from kubetune_trainer.errors import JobError

    storage = {"s3": {"endpoint": s3.endpoint}}
    for k, v in s3.server.readonly_env.items():
        monkeypatch.setenv(k, v)
    job = make_job(s3.uri("jobs/ro"), storage)
    with pytest.raises(JobError) as e:
        with Resilience(job, workdir=tmp_path / "work"):
            pytest.fail("started with credentials that may not write")
    msg = str(e.value)
    assert msg.startswith(f"spec.output.uri: cannot write to {s3.uri('jobs/ro')}: ") and "\n" not in msg
    assert (
        "access denied (AccessDenied)" in msg and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY environment" in msg
    )
    assert not s3.keys()  # nothing written, not even progress.json

    # the output may be written (a local path), the checkpoints may not; credentials from a Secret's files
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text(s3.server.readonly_env["AWS_ACCESS_KEY_ID"])
    (secret / "AWS_SECRET_ACCESS_KEY").write_text(s3.server.readonly_env["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("KUBETUNE_S3_CREDENTIALS_DIR", str(secret))
    job = make_job(str(tmp_path / "out"), storage, uri=s3.uri("ckpt"))
    with pytest.raises(JobError) as e:
        with Resilience(job, workdir=tmp_path / "work"):
            pytest.fail("started with credentials that may not write the checkpoints")
    msg = str(e.value)
    assert msg.startswith(f"spec.checkpoint.uri: cannot write to {s3.uri('ckpt')}: ")
    assert f"files in $KUBETUNE_S3_CREDENTIALS_DIR ({secret})" in msg
    p = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert p["state"] == "failed" and "spec.checkpoint.uri: cannot write" in p["reason"]


def test_an_upload_that_can_never_succeed_stops_training_at_the_next_step(single_process, s3, tmp_path):
    """The checkpoint bucket disappears mid-run (NoSuchBucket, like AccessDenied, is not transient):
    the run fails at the next step boundary instead of training on to an end it cannot save."""
    from kubetune_trainer.errors import JobError

    bucket = s3.server.new_bucket()
    job = make_job(str(tmp_path / "out"), {"s3": {"endpoint": s3.endpoint}}, uri=f"s3://{bucket}/ckpt")
    loop = Loop(tmp_path)
    with pytest.raises(JobError) as e:
        with Resilience(job, workdir=tmp_path / "work") as res:
            (cb,) = res.callbacks()
            cb.on_train_begin(loop.args, loop.state, loop.control)
            s3.server.client().delete_bucket(Bucket=bucket)  # empty: the write probe cleaned up
            loop.step(cb)
            loop.save(cb)
            assert res.uploader.wait_idle(30)  # not retried until the end of training
            loop.step(cb)
            pytest.fail("training went on although no checkpoint can ever be committed")
    msg = str(e.value)
    assert msg.startswith("spec.checkpoint.uri: ") and f"bucket '{bucket}' does not exist" in msg
    assert msg.endswith("stopped at step 2")
    p = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert p["state"] == "failed" and f"bucket '{bucket}' does not exist" in p["checkpoint_error"]


def test_a_store_down_at_the_end_fails_once_within_upload_timeout_seconds(
    single_process, s3, tmp_path, capsys, monkeypatch
):
    """One budget for the last checkpoint and the output, not one after the other; the failure says
    since when the store is unreachable, and so does the local progress copy `kubetune status` reads."""
    from kubetune_trainer.progress import local_progress_path, print_status
    from kubetune_trainer.store import TransientStoreError

    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    budget = 6
    job = make_job(s3.uri("jobs/end"), {"s3": {"endpoint": s3.endpoint}}, upload_timeout_seconds=budget)
    loop = Loop(tmp_path, max_steps=2)
    with pytest.raises(TransientStoreError) as e:
        with Resilience(job, workdir=tmp_path / "work") as res:
            (cb,) = res.callbacks()
            cb.on_train_begin(loop.args, loop.state, loop.control)
            loop.step(cb)
            loop.save(cb)
            assert res.uploader.wait_for_step(1, 30)
            s3.pause()
            loop.step(cb)
            loop.save(cb)
            cb.on_train_end(loop.args, loop.state, loop.control)
            (res.output_dir / "final").mkdir(parents=True)
            (res.output_dir / "final" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
            t0 = time.monotonic()
            res.finish(type("R", (), {"completed": True, "global_step": 2})())
    elapsed = time.monotonic() - t0
    assert budget - 1 < elapsed < budget + 4, elapsed  # two waits back to back would take 2 x budget
    msg = str(e.value)
    assert msg.startswith(
        "the last checkpoint (step 2) was not committed within checkpoint.upload_timeout_seconds=6"
    )
    assert "store unreachable since " in msg and "failed attempts)" in msg
    assert "last committed checkpoint: 1" in msg and "the output was not uploaded" in msg
    local = json.loads(local_progress_path("cb", s3.uri("jobs/end")).read_text())
    assert local["state"] == "failed" and local["store_unreachable"]["failed_attempts"] >= 1
    assert print_status(job) == 0
    assert f"store unreachable since {local['store_unreachable']['since']}" in capsys.readouterr().out
    s3.resume()
