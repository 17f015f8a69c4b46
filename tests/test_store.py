"""ObjectStore: the same behaviour on a local directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kubetune.spec import S3Storage
from kubetune_trainer.store import (
    LocalStore,
    ObjectNotFound,
    StoreError,
    TransientStoreError,
    open_store,
    with_retries,
    worst_case_wait,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "root"))
    return request.getfixturevalue("s3").store("jobs/one")


def test_roundtrip_list_delete(store, tmp_path):
    store.put_bytes("a/b.txt", b"hello")
    store.put_bytes("a/c/d.bin", b"\x00\x01")
    store.put_bytes("ab.txt", b"x")
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    store.put_file(src, "f/src.bin")

    assert store.list() == ["a/b.txt", "a/c/d.bin", "ab.txt", "f/src.bin"]
    assert store.list("a/") == ["a/b.txt", "a/c/d.bin"]
    assert store.list("a") == ["a/b.txt", "a/c/d.bin", "ab.txt"]
    assert store.list("nothing/") == []
    assert store.list_dirs() == ["a", "f"]
    assert store.list_dirs("a") == ["c"]
    assert store.exists("a/b.txt") and not store.exists("a/zzz") and not store.exists("a")
    assert store.get_bytes("a/b.txt") == b"hello"
    assert store.size("f/src.bin") == 1000
    out = store.get_file("f/src.bin", tmp_path / "dl" / "x.bin")
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(ObjectNotFound):
        store.get_bytes("missing")
    with pytest.raises(ObjectNotFound):
        store.get_file("missing", tmp_path / "m")
    assert not (tmp_path / "m").exists()

    sub = store.sub("a")
    assert sub.list() == ["b.txt", "c/d.bin"]
    assert sub.get_bytes("c/d.bin") == b"\x00\x01"
    assert sub.uri.endswith("/a")

    store.delete("a/b.txt")
    store.delete("a/b.txt")  # absent: no error
    assert store.delete_prefix("a/") == 1
    assert store.list() == ["ab.txt", "f/src.bin"]


def test_upload_download_dir(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(300_000))
    (src / "sub" / "rng_state_1.pth").write_bytes(b"rng")
    (src / "MARK").write_bytes(b"m")
    keys = store.upload_dir(src, "ck/step-1", exclude=["MARK"])
    assert sorted(keys) == ["ck/step-1/model.safetensors", "ck/step-1/sub/rng_state_1.pth"]
    dst = store.download_dir("ck/step-1", tmp_path / "back")
    assert (dst / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (dst / "sub" / "rng_state_1.pth").read_bytes() == b"rng"
    assert not (dst / "MARK").exists()


def test_local_store_paths(tmp_path, monkeypatch):
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert open_store(f"file://{tmp_path}/x").root == tmp_path / "x"
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "pvcs"))
    st = open_store("pvc://claim-a/jobs/j1")
    assert st.root == tmp_path / "pvcs" / "claim-a" / "jobs" / "j1"
    assert st.uri == "pvc://claim-a/jobs/j1"
    st.put_bytes("k", b"v")
    assert (tmp_path / "pvcs/claim-a/jobs/j1/k").read_bytes() == b"v"
    with pytest.raises(ValueError, match=r"\.\."):
        st.put_bytes("../escape", b"x")
    with pytest.raises(ValueError, match="hub"):
        open_store("hf://org/name")


def test_multipart_upload_and_download(s3, tmp_path):
    st = s3.store("big", multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    data = os.urandom(17 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    st.put_file(tmp_path / "big.bin", "big.bin")
    assert st.size("big.bin") == len(data)
    # the object really went up in parts: its ETag is "<md5>-<parts>"
    head = s3.server.client().head_object(Bucket=s3.bucket, Key="big/big.bin")
    assert head["ETag"].strip('"').endswith("-4")
    assert st.get_file("big.bin", tmp_path / "back.bin").read_bytes() == data


def test_wrong_secret_is_a_clear_error_without_the_secret(s3, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-shh")
    st = s3.store("x")
    for op in (lambda: st.put_bytes("k", b"1"), st.list, lambda: st.get_bytes("k"), lambda: st.exists("k")):
        with pytest.raises(StoreError) as err:
            op()
        msg = str(err.value)
        assert "access denied" in msg and s3.bucket in msg and s3.endpoint in msg
        assert "not-the-secret-shh" not in msg and "AWS_SECRET_ACCESS_KEY environment" in msg


def test_missing_bucket_is_a_clear_error(s3):
    st = open_store("s3://no-such-bucket-kt/x", s3.settings)
    for op in (lambda: st.put_bytes("k", b"1"), st.list):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-kt' does not exist") as err:
            op()
        assert s3.endpoint in str(err.value)


def test_credentials_from_mounted_secret_files(s3, tmp_path, monkeypatch):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "AWS_ACCESS_KEY_ID").write_text(s3.env["AWS_ACCESS_KEY_ID"])
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text(s3.env["AWS_SECRET_ACCESS_KEY"] + "\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("KUBETUNE_S3_CREDENTIALS_DIR", str(secret_dir))
    st = s3.store("cred")
    st.put_bytes("k", b"v")
    assert st.get_bytes("k") == b"v"
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text("wrong")
    with pytest.raises(StoreError, match="KUBETUNE_S3_CREDENTIALS_DIR"):
        s3.store("cred").get_bytes("k")
    monkeypatch.setenv("KUBETUNE_S3_CREDENTIALS_DIR", str(tmp_path / "empty"))
    with pytest.raises(StoreError, match="holds no AWS_ACCESS_KEY_ID"):
        s3.store("cred")


def test_unreachable_store_is_transient_and_retried(s3):
    st = s3.store("down", max_attempts=1, connect_timeout=1, read_timeout=2)
    st.put_bytes("k", b"before")
    s3.pause()
    try:
        with pytest.raises(TransientStoreError, match="cannot reach"):
            st.put_bytes("k", b"during")
    finally:
        s3.resume()
    # down for 2 s: with_retries rides it out
    s3.outage(2.0)
    t0 = time.monotonic()
    with_retries(
        lambda: st.put_bytes("k", b"after"), what="put", attempts=None, deadline=t0 + 30, base_delay=0.2
    )
    assert time.monotonic() - t0 >= 1.5
    assert st.get_bytes("k") == b"after"


def test_with_retries_gives_up_on_permanent_errors():
    calls = []

    def bad():
        calls.append(1)
        raise StoreError("bucket gone")

    with pytest.raises(StoreError):
        with_retries(bad, what="x", sleep=lambda s: None)
    assert len(calls) == 1

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise TransientStoreError("down")
        return "ok"

    assert with_retries(flaky, what="x", sleep=lambda s: None) == "ok"
    stop = threading.Event()
    stop.set()
    with pytest.raises(TransientStoreError):
        with_retries(
            lambda: (_ for _ in ()).throw(TransientStoreError("down")),
            what="x",
            attempts=None,
            should_stop=stop.is_set,
            sleep=lambda s: None,
        )


def test_with_retries_worst_case_is_what_its_docstring_says():
    """attempts=N: N calls, at most worst_case_wait(N) seconds of sleep (jitter halves it at most);
    with a deadline no sleep reaches past it."""
    calls, slept = [], []

    def down():
        calls.append(1)
        raise TransientStoreError("down")

    with pytest.raises(TransientStoreError):
        with_retries(down, what="x", sleep=slept.append)
    assert len(calls) == 8 and len(slept) == 7
    assert worst_case_wait(8) == 0.5 + 1 + 2 + 4 + 8 + 16 + 30
    assert worst_case_wait(8) / 2 <= sum(slept) <= worst_case_wait(8)
    assert all(s <= 30.0 for s in slept)

    calls.clear()
    slept.clear()
    deadline = time.monotonic() + 1.0
    with pytest.raises(TransientStoreError):
        with_retries(
            down, what="x", attempts=None, deadline=deadline, sleep=lambda s: slept.append(s) or time.sleep(s)
        )
    assert time.monotonic() >= deadline - 0.05 and sum(slept) <= 1.0 + 0.05
    assert len(calls) == len(slept) + 1


def test_s3_settings_are_used(s3):
    st = open_store(s3.uri("p"), S3Storage(endpoint=s3.endpoint, region="eu-west-1", addressing_style="path"))
    assert st.client.meta.region_name == "eu-west-1"
    assert st.client.meta.endpoint_url == s3.endpoint
    st.put_bytes("k", b"1")
    assert Path(st.uri_for("k")).name == "k"
