"""spec.tracking: the fields and their checks, the pods' tracker credentials (Secret references only),
the run ids a restarted attempt continues, and a resumed in-process run's TensorBoard curve and W&B run.

The kill -9 of a torchrun gang against a real MLflow server is in tests/test_tracking_e2e.py."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.spec import FineTuneJob
from kubetune.validate import SpecError, load_jobs_text
from kubetune_operator.render import render_job

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job", "namespace": "team-a"},
    "spec": {
        "model": {"uri": "s3://models/qwen"},
        "dataset": {"uri": "s3://data/alpaca.json"},
        "output": {"uri": "s3://runs/job"},
    },
}
TRACKED = {
    "tensorboard": True,
    "mlflow": {
        "tracking_uri": "https://mlflow.example.com",
        "experiment": "qwen",
        "credentials_secret": "mlflow",
    },
    "wandb": {"project": "qwen", "api_key_secret": "wandb", "mode": "offline"},
}


def job_with(tracking: dict[str, Any], **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(tracking=tracking, **spec)
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_jobs_text(yaml.safe_dump(doc), "job.yaml")
    return [str(p) for p in e.value.problems]


BAD_TRACKING = [
    ("no-scheme", {"mlflow": {"tracking_uri": "mlflow:5000"}}, "spec.tracking.mlflow.tracking_uri", "http:// or https://"),
    ("credentials-in-uri", {"mlflow": {"tracking_uri": "https://bob:hunter2@mlflow.example.com"}},
     "spec.tracking.mlflow.tracking_uri", "must not hold credentials"),
    ("no-tracking-uri", {"mlflow": {"experiment": "x"}}, "spec.tracking.mlflow.tracking_uri", "required"),
    ("wandb-mode", {"wandb": {"project": "p", "mode": "sometimes"}}, "spec.tracking.wandb.mode", "online"),
    ("wandb-no-project", {"wandb": {"mode": "offline"}}, "spec.tracking.wandb.project", "required"),
    ("inline-api-key", {"wandb": {"project": "p", "api_key": "hunter2"}}, "spec.tracking.wandb.api_key", "did you mean 'api_key_secret'"),
    ("tensorboard-string", {"tensorboard": "yes"}, "spec.tracking.tensorboard", "true or false"),
]  # fmt: skip


@pytest.mark.parametrize("case,tracking,field,words", BAD_TRACKING, ids=[c[0] for c in BAD_TRACKING])
def test_bad_tracking_is_one_line_naming_the_field(case: str, tracking: dict, field: str, words: str) -> None:
    lines = problems(job_with(tracking))
    assert any(line.startswith(f"job.yaml (job): {field}: ") and words in line for line in lines), lines
    assert not any("hunter2" in line for line in lines), lines  # a secret is never echoed


@pytest.mark.parametrize("uri", ["mlflow:5000", "https://bob:hunter2@mlflow.example.com"])
def test_the_api_server_refuses_the_same_tracking_uris(uri: str) -> None:
    from tests.crd_admission import admit

    _, found = admit(job_with({"mlflow": {"tracking_uri": uri}}))
    assert found and all("tracking_uri" in p for p in found), found
    _, found = admit(job_with({"mlflow": {"tracking_uri": "http://mlflow.mlflow.svc:5000"}}))
    assert found == []


def test_tracking_defaults_to_nothing() -> None:
    t = FineTuneJob.model_validate(BASE).spec.tracking
    assert (t.tensorboard, t.mlflow, t.wandb) == (False, None, None)
    from kubetune_trainer.tracking import report_to

    assert report_to(FineTuneJob.model_validate(BASE).spec) == []
    assert report_to(FineTuneJob.model_validate(job_with(TRACKED)).spec) == ["tensorboard", "mlflow", "wandb"]


@pytest.mark.parametrize("tracker,package", [("tensorboard", "tensorboard"), ("mlflow", "mlflow-skinny"),
                                              ("wandb", "wandb")])  # fmt: skip
def test_a_trainer_without_the_trackers_package_refuses_the_job_naming_the_field(
    tracker: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from kubetune_trainer.errors import JobError
    from kubetune_trainer.tracking import check_installed

    spec = FineTuneJob.model_validate(job_with(TRACKED)).spec
    check_installed(spec)  # the dev install has them all
    monkeypatch.setitem(sys.modules, tracker, None)  # how Python marks a module as not importable
    with pytest.raises(JobError) as e:
        check_installed(spec)
    assert str(e.value).startswith(f"spec.tracking.{tracker}: the trainer has no {package} package")
    assert "kubetune[trainer,tracking]" in str(e.value)


def _env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_pods_get_tracker_credentials_as_secret_references_only() -> None:
    job = FineTuneJob.model_validate(job_with(TRACKED, parallel_config={"nnodes": 2}))
    pods = [o for o in render_job(job) if o["kind"] == "Pod"]
    assert len(pods) == 2
    for pod in pods:
        env = _env(pod)
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
            # each optional: the Secret holds a username and password, or a token
            assert env[key] == {
                "name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow", "key": key, "optional": True}}
            }  # fmt: skip
        assert env["WANDB_API_KEY"] == {
            "name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "WANDB_API_KEY"}}
        }  # fmt: skip
    # the ConfigMap's job.yaml names the Secrets, holds no credentials
    config = next(o for o in render_job(job) if o["kind"] == "ConfigMap")["data"]["job.yaml"]
    assert "credentials_secret: mlflow" in config and "api_key_secret: wandb" in config


def test_pods_without_tracker_secrets_get_no_tracker_env() -> None:
    tracked = {
        "tensorboard": True,
        "mlflow": {"tracking_uri": "http://mlflow:5000"},
        "wandb": {"project": "p"},
    }
    for doc in (BASE, job_with(tracked)):
        pod = next(o for o in render_job(FineTuneJob.model_validate(doc)) if o["kind"] == "Pod")
        assert not [k for k in _env(pod) if k.startswith(("MLFLOW_", "WANDB_"))]


def test_a_restarted_attempt_continues_the_recorded_runs(tmp_path: Path) -> None:
    from kubetune.conventions import TRACKING_FILE
    from kubetune_trainer.store import open_store
    from kubetune_trainer.tracking import read_run_ids, tracking_env

    out = tmp_path / "out"
    job = FineTuneJob.model_validate(job_with(TRACKED, output={"uri": str(out)}))
    store = open_store(str(out))
    first = tracking_env(job, out, tmp_path / "work", read_run_ids(store, job.spec.training_hash()))
    assert (
        first["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
        and first["MLFLOW_EXPERIMENT_NAME"] == "qwen"
    )
    assert first["MLFLOW_RUN_ID"] == "" and first["MLFLOW_MAX_LOG_PARAMS"] == ""  # a new run, params logged
    assert json.loads(first["MLFLOW_TAGS"]) == {"kubetune.job": "job", "kubetune.namespace": "team-a"}
    assert first["WANDB_RUN_ID"] and first["WANDB_RESUME"] == "allow" and first["WANDB_MODE"] == "offline"
    assert first["WANDB_DIR"] == str(out)  # offline runs stay with the output
    assert first["TENSORBOARD_LOGGING_DIR"] == str(out / "tensorboard")

    recorded = {"training_hash": job.spec.training_hash(), "mlflow": {"run_id": "0123abcd"},
                "wandb": {"run_id": first["WANDB_RUN_ID"]}}  # fmt: skip
    store.put_bytes(TRACKING_FILE, json.dumps(recorded).encode())
    again = tracking_env(job, out, tmp_path / "work", read_run_ids(store, job.spec.training_hash()))
    assert again["MLFLOW_RUN_ID"] == "0123abcd"
    assert again["MLFLOW_MAX_LOG_PARAMS"] == "0"  # the first attempt logged them; MLflow refuses changes
    assert again["WANDB_RUN_ID"] == first["WANDB_RUN_ID"]

    # checkpoints from another spec are not resumed (on_spec_change: start_over): neither is the run
    changed = job.model_copy(deep=True)
    changed.spec.training.learning_rate = 1e-5
    assert read_run_ids(store, changed.spec.training_hash()) == {}
    online = FineTuneJob.model_validate(job_with({"wandb": {"project": "p"}}, output={"uri": str(out)}))
    assert tracking_env(online, out, tmp_path / "work", {})["WANDB_DIR"] == str(tmp_path / "work")


def test_a_trainer_starts_its_own_wandb_service_not_its_launchers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A W&B service inherited from the launching shell outlives a killed trainer and would still hold
    the run id when the relaunch registers it again."""
    from kubetune_trainer.tracking import apply_env, tracking_env

    monkeypatch.setenv("WANDB_SERVICE", "3-4242-tcp-localhost-45678")  # a notebook's W&B service
    job = FineTuneJob.model_validate(job_with(TRACKED, output={"uri": str(tmp_path / "out")}))
    apply_env(tracking_env(job, tmp_path / "out", tmp_path / "work", {}))
    assert "WANDB_SERVICE" not in os.environ and os.environ["WANDB_PROJECT"]


def test_restart_starts_new_tracker_runs(tmp_path: Path) -> None:
    from kubetune.conventions import TRACKING_FILE
    from kubetune_trainer.rerun import supersede
    from kubetune_trainer.store import open_store

    out = tmp_path / "out"
    job = FineTuneJob.model_validate(job_with(TRACKED, output={"uri": str(out)}))
    store = open_store(str(out))
    store.put_bytes(TRACKING_FILE, b"{}")
    store.put_bytes("tensorboard/events.out.tfevents.1.host.1.0", b"x")
    supersede(job)
    assert not store.exists(TRACKING_FILE) and store.list("tensorboard/") == []


class StopWithoutSaving:
    """Stop after `step` without a checkpoint there, as a killed run does: the steps after the last
    checkpoint were logged and will be trained (and logged) again by the resumed run."""

    def __new__(cls, step: int) -> Any:
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
                if state.global_step == step:
                    control.should_training_stop = True
                    control.should_save = False
                return control

        return _Stop()


@pytest.fixture
def clean_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer.tracking import MANAGED_ENV

    for key in (*MANAGED_ENV, "WANDB_CONSOLE"):
        # recorded even when unset, so what the run sets (W&B sets WANDB_SERVICE) is undone after it
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def test_resumed_run_is_one_tensorboard_curve_and_one_wandb_run(
    train_job: Any, tmp_path: Path, clean_tracking_env: None
) -> None:
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kubetune_trainer.train import run_training

    out, work = tmp_path / "out", tmp_path / "work"
    base = train_job(out, training={"max_steps": 10}, merge_adapter=False)
    doc = base.model_dump(mode="json", exclude_none=True)
    doc["spec"].update(
        checkpoint={"every_steps": 4},
        tracking={"tensorboard": True, "wandb": {"project": "t", "mode": "offline"}},
    )
    job = FineTuneJob.model_validate(doc)
    first = run_training(job, workdir=work, callbacks=[StopWithoutSaving(7)])
    assert first.global_step == 7 and not first.completed
    wandb.finish()  # the process of the first attempt ends
    ids = json.loads((out / "tracking.json").read_text())
    second = run_training(job, workdir=work, resume_from=work / "checkpoints" / "checkpoint-4")
    wandb.finish()
    wandb.teardown()  # this process's W&B service ends with the test
    assert second.completed and second.global_step == 10

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 11))  # 5..7 of the first attempt are purged, not shown twice
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one log dir, two writers
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    logged = {h["step"]: h["loss"] for h in second.log_history if "loss" in h}
    assert all(loss[s] == pytest.approx(logged[s], rel=1e-5) for s in range(1, 11))
    # kubetune's throughput reaches the trackers too
    assert len(acc.Scalars("train/tokens_per_second")) >= 8

    # W&B: both attempts wrote an offline run dir, with the same run id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {ids["wandb"]["run_id"]}, runs
    assert all(any(r.glob("run-*.wandb")) for r in runs)
    assert json.loads((out / "tracking.json").read_text())["wandb"] == ids["wandb"]


def test_a_continued_mlflow_run_says_the_last_step_it_holds_per_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed attempt logs each metric only past these steps (the killed attempt logged the rest)."""
    import mlflow

    from kubetune_trainer.tracking import last_logged_steps

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("e"))
    for step in (1, 2, 3):
        client.log_metric(run.info.run_id, "loss", 1.0 / step, step=step)
    client.log_metric(run.info.run_id, "eval_loss", 0.5, step=2)
    assert last_logged_steps(run.info.run_id) == {"loss": 3, "eval_loss": 2}
    assert last_logged_steps("no-such-run") == {}  # it cannot say: the steps are logged again
