"""Experiment tracking (``spec.tracking``): TensorBoard, MLflow and Weights & Biases through
transformers' own integration callbacks (``report_to`` and the environment variables they read).

    session = tracking.start(job, output_dir, resume_from=resume_from)   # before the Trainer exists
    args = training_arguments(..., report_to=session.report_to, run_name=job.metadata.name)
    trainer = Trainer(...)
    session.attach(trainer)

What kubetune adds is that a job is ONE run however often it restarts:

- **The run ids travel with the output.** Rank 0 records the MLflow run id and the W&B run id in
  ``<output>/tracking.json`` (with the spec's training hash) as soon as the run exists. A later
  attempt reads it and sets ``MLFLOW_RUN_ID`` (MLflowCallback reattaches to that run; the params it
  logged first are not logged again: ``MLFLOW_MAX_LOG_PARAMS=0``) and ``WANDB_RUN_ID`` with
  ``WANDB_RESUME=allow`` before the Trainer starts. A spec whose training hash changed (a checkpoint
  start-over) starts a new run; ``kubetune run --restart`` removes the file.
- **Logged steps are on the tracker before their checkpoint commits.** MLflowCallback logs
  asynchronously; on every save rank 0 flushes MLflow's queue (bounded wait), so a kill -9 after a
  committed checkpoint loses no step the resumed run will not log again. The steps between that
  checkpoint and the kill, which the resumed attempt repeats, are not logged again: on a continued
  run each metric is logged only past the last step the run already holds for it.
- **TensorBoard: one log dir per job**, ``<output>/tensorboard``. A resumed attempt writes a new event
  file whose writer purges from the resume step on (``SummaryWriter(purge_step=)``, TensorBoard's own
  restart marker), so readers see every step once and the step numbers continue. For s3:// outputs
  the event files go to the store with every committed checkpoint and with the output, and a new pod
  fetches them first (:func:`restore_tensorboard`, :func:`upload_logs`).
- W&B offline runs (``mode: offline``) are written under ``<output>/wandb`` (``wandb sync`` them
  later; for s3:// outputs they go up with every commit too, one directory per attempt, all with the
  job's run id); online runs keep their local files in the node's scratch.

Credentials are the pods' environment (``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD`` or ``TOKEN``,
``WANDB_API_KEY``), rendered by the operator from the Secrets the spec names; never in the spec.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from kubetune.conventions import TENSORBOARD_DIR, TRACKING_FILE

WANDB_DIR = "wandb"  # what wandb makes under $WANDB_DIR

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob, FineTuneJobSpec
    from kubetune_trainer.store import ObjectStore

log = logging.getLogger("kubetune.tracking")

# report_to name -> (module transformers imports, the package that provides it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}  # fmt: skip
MLFLOW_FLUSH_SECONDS = (
    10.0  # at most this long per save for MLflow's queue (a slow server never stalls training)
)

# Every variable this module manages: set or removed at each start, so one run never inherits
# another's (in-process runs, tests). WANDB_SERVICE is always removed: a trainer inheriting it from
# the shell that launched it (a notebook, a script using W&B) would register its run in that
# process's W&B service, which outlives a killed trainer and refuses the relaunch ("run ID in use").
MANAGED_ENV = (
    "TENSORBOARD_LOGGING_DIR",
    "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_MAX_LOG_PARAMS", "MLFLOW_TAGS",
    "WANDB_PROJECT", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_SERVICE",
)  # fmt: skip


def report_to(spec: FineTuneJobSpec) -> list[str]:
    """The transformers integrations `spec.tracking` turns on, in a fixed order."""
    t = spec.tracking
    return [
        name for name, on in (("tensorboard", t.tensorboard), ("mlflow", t.mlflow), ("wandb", t.wandb)) if on
    ]


def check_installed(spec: FineTuneJobSpec) -> None:
    """A JobError naming the field when the image lacks a tracker's package (before the model loads)."""
    from kubetune_trainer.errors import JobError

    for name in report_to(spec):
        module, package = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise JobError(
                f"spec.tracking.{name}: the trainer has no {package} package; use an image with the "
                "tracking extra (pip install 'kubetune[trainer,tracking]')"
            )


def read_run_ids(store: ObjectStore, training_hash: str) -> dict[str, Any]:
    """The run ids an earlier attempt of this job recorded ({} for none, or for another spec)."""
    from kubetune_trainer.store import ObjectNotFound, StoreError

    try:
        doc = json.loads(store.get_bytes(TRACKING_FILE))
    except ObjectNotFound:
        return {}
    except (StoreError, ValueError) as e:
        log.warning("could not read %s (%s): the trackers start new runs", store.uri_for(TRACKING_FILE), e)
        return {}
    if not isinstance(doc, dict) or doc.get("training_hash") != training_hash:
        return {}  # the checkpoints started over with another spec: so does the run
    return doc


def tracking_env(
    job: FineTuneJob, output_dir: Path, workdir: Path, previous: dict[str, Any]
) -> dict[str, str]:
    """The environment transformers' callbacks read for `spec.tracking` ('' = unset), continuing the
    runs in `previous` (what :func:`read_run_ids` returned)."""
    t = job.spec.tracking
    env = dict.fromkeys(MANAGED_ENV, "")
    if t.tensorboard:
        env["TENSORBOARD_LOGGING_DIR"] = str(output_dir / TENSORBOARD_DIR)
    if t.mlflow is not None:
        env["MLFLOW_TRACKING_URI"] = t.mlflow.tracking_uri
        env["MLFLOW_EXPERIMENT_NAME"] = t.mlflow.experiment or ""
        env["MLFLOW_TAGS"] = json.dumps(
            {"kubetune.job": job.metadata.name, "kubetune.namespace": job.namespace}
        )
        run_id = (previous.get("mlflow") or {}).get("run_id")
        if run_id:
            env["MLFLOW_RUN_ID"] = run_id
            env["MLFLOW_MAX_LOG_PARAMS"] = "0"  # logged by the first attempt; MLflow refuses changed params
    if t.wandb is not None:
        env["WANDB_PROJECT"] = t.wandb.project
        env["WANDB_MODE"] = t.wandb.mode
        # offline runs are the result (wandb sync them later): they go with the output
        env["WANDB_DIR"] = str(output_dir if t.wandb.mode == "offline" else workdir)
        env["WANDB_RUN_ID"] = (previous.get("wandb") or {}).get("run_id") or uuid.uuid4().hex[:12]
        env["WANDB_RESUME"] = "allow"
    return env


def apply_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    if env.get("WANDB_DIR"):
        Path(env["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    if env.get("WANDB_MODE"):
        os.environ.setdefault("WANDB_CONSOLE", "off")  # no wrapping of the trainer's stdout/stderr


def resume_step(resume_from: Path | None) -> int:
    """The global step a resumed Trainer starts from (0 for a fresh run)."""
    if resume_from is None:
        return 0
    try:
        return int(json.loads((Path(resume_from) / "trainer_state.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        return 0


@dataclass
class Session:
    """Tracking for one `run_training` call (see the module docstring)."""

    job: Any
    output_dir: Path
    report_to: list[str]
    start_step: int = 0
    is_main: bool = True
    recorded: dict[str, Any] = field(default_factory=dict)

    def attach(self, trainer: Any) -> None:
        """Give TensorBoardCallback a writer that purges what an earlier attempt logged past the resume
        step, and add the callback that records the run ids (rank 0)."""
        if not self.report_to:
            return
        from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

        integrations = [
            cb
            for cb in trainer.callback_handler.callbacks
            if isinstance(cb, (TensorBoardCallback, MLflowCallback, WandbCallback))
        ]
        if "tensorboard" in self.report_to and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            logdir = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
            if logdir.is_dir() and any(logdir.glob("events.out.tfevents.*")):
                for cb in integrations:
                    if isinstance(cb, TensorBoardCallback):
                        cb.tb_writer = SummaryWriter(log_dir=str(logdir), purge_step=self.start_step + 1)
        continued = self.start_step > 0 and bool(os.environ.get("MLFLOW_RUN_ID"))
        for cb in integrations:
            # after kubetune's ReportingCallback, so tokens_per_second and eta_seconds reach the trackers
            trainer.remove_callback(cb)
            trainer.add_callback(_continued_mlflow() if continued and isinstance(cb, MLflowCallback) else cb)
        trainer.add_callback(TrackingCallback(self))

    def record(self, ids: dict[str, Any]) -> None:
        """Rank 0: keep the run ids in <output>/tracking.json (a failed write only costs continuity)."""
        from kubetune_trainer.store import StoreError, open_store

        doc = {"training_hash": self.job.spec.training_hash(), **ids}
        if doc == self.recorded:
            return
        spec = self.job.spec
        try:
            store = open_store(spec.output.uri, spec.storage.s3, max_attempts=2)
            store.put_bytes(TRACKING_FILE, json.dumps(doc, indent=1).encode())
            self.recorded = doc
        except StoreError as e:
            log.warning("could not write %s (%s): a restarted attempt starts new runs", TRACKING_FILE, e)


class TrackingCallback(TrainerCallback):
    """Records the runs transformers' callbacks opened, and flushes MLflow's queue at every save."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if not state.is_world_process_zero:
            return control
        ids: dict[str, Any] = {}
        if "mlflow" in self.session.report_to:
            import mlflow

            run = mlflow.active_run()  # MLflowCallback.on_train_begin ran before this callback
            if run is not None:
                ids["mlflow"] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                 "tracking_uri": mlflow.get_tracking_uri()}  # fmt: skip
        if "wandb" in self.session.report_to:
            import wandb

            if wandb.run is not None:
                ids["wandb"] = {"run_id": wandb.run.id, "project": wandb.run.project}
        before = self.session.recorded
        for k, v in ids.items():
            again = (before.get(k) or {}).get("run_id") == v["run_id"]
            log.info("tracking: %s run %s%s", k, v["run_id"], " (continued)" if again else "")
        if ids:
            self.session.record(ids)
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.is_world_process_zero and "mlflow" in self.session.report_to:
            _flush_mlflow(MLFLOW_FLUSH_SECONDS)
        return control


def _continued_mlflow() -> Any:
    """An MLflowCallback for a continued run that skips, per metric, the steps the run already holds."""
    from transformers.integrations import MLflowCallback

    class ContinuedMLflowCallback(MLflowCallback):
        logged: dict[str, int] | None = None

        def on_log(self, args: Any, state: Any, control: Any, logs: Any, model: Any = None, **kw: Any) -> Any:
            if state.is_world_process_zero:
                if self.logged is None:
                    import mlflow

                    run = mlflow.active_run()  # set up by on_train_begin
                    self.logged = last_logged_steps(run.info.run_id) if run is not None else {}
                logs = {
                    k: v for k, v in logs.items() if state.global_step > self.logged.get(_metric_name(k), -1)
                }
                if not logs:
                    return control
            return super().on_log(args, state, control, logs, model=model, **kw)

    return ContinuedMLflowCallback()


def _metric_name(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)  # as MLflowCallback names a logged key


def last_logged_steps(run_id: str) -> dict[str, int]:
    """Metric name -> the last step MLflow holds for it in the run ({} when it cannot say)."""
    import mlflow

    try:
        client = mlflow.MlflowClient()
        keys = client.get_run(run_id).data.metrics
        return {k: max((m.step for m in client.get_metric_history(run_id, k)), default=-1) for k in keys}
    except Exception as e:  # noqa: BLE001 - any tracker failure: log the repeated steps again
        log.warning(
            "could not read MLflow run %s's logged steps (%s): resumed steps are logged again", run_id, e
        )
        return {}


def _flush_mlflow(timeout: float) -> None:
    import mlflow

    t = threading.Thread(target=mlflow.flush_async_logging, name="kubetune-mlflow-flush", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("MLflow did not take the logged metrics within %.0fs; training goes on", timeout)


def start(
    job: FineTuneJob, output_dir: Path, *, workdir: Path, resume_from: Path | None, is_main: bool
) -> Session:
    """Set up this process's environment for `spec.tracking` (every rank; rank 0 reads tracking.json)."""
    spec = job.spec
    names = report_to(spec)
    session = Session(job, Path(output_dir), names, start_step=resume_step(resume_from), is_main=is_main)
    previous: dict[str, Any] = {}
    if is_main and (spec.tracking.mlflow is not None or spec.tracking.wandb is not None):
        from kubetune_trainer.store import open_store

        previous = read_run_ids(open_store(spec.output.uri, spec.storage.s3), spec.training_hash())
        session.recorded = previous
    apply_env(tracking_env(job, session.output_dir, Path(workdir), previous))
    return session


# ---------------------------------------------------------------- s3:// outputs


def upload_logs(store: ObjectStore, output_dir: Path, spec: FineTuneJobSpec) -> None:
    """On every commit: the TensorBoard event files and W&B offline runs as far as they are written, to
    <output>/tensorboard/ and <output>/wandb/, so a killed pod's part of the curve is not lost."""
    t = spec.tracking
    if t.tensorboard:
        _upload_grown(store, Path(output_dir), TENSORBOARD_DIR)
    if t.wandb is not None and t.wandb.mode == "offline":
        _upload_grown(store, Path(output_dir), WANDB_DIR)


def _upload_grown(store: ObjectStore, output_dir: Path, sub: str) -> None:
    """The files under output_dir/sub whose size differs from the store's copy (the ones written to)."""
    from kubetune_trainer.store import StoreError

    local = output_dir / sub
    if not local.is_dir():
        return
    try:
        there = store.sizes(f"{sub}/")
        unchanged = [
            rel for p in local.rglob("*") if p.is_file()
            and there.get(f"{sub}/{(rel := p.relative_to(local).as_posix())}") == p.stat().st_size
        ]  # fmt: skip
        store.upload_dir(local, sub, exclude=unchanged)
    except (StoreError, OSError) as e:
        log.warning("could not upload %s: %s", store.uri_for(sub), e)


def restore_tensorboard(store: ObjectStore, output_dir: Path) -> None:
    """A new pod fetches the event files earlier attempts uploaded, so the job keeps one log dir."""
    from kubetune_trainer.store import StoreError

    local = Path(output_dir) / TENSORBOARD_DIR
    try:
        for key in store.list(f"{TENSORBOARD_DIR}/"):
            target = Path(output_dir) / key
            if not target.exists():
                store.get_file(key, target)
    except StoreError as e:
        log.warning("could not fetch %s into %s: %s", store.uri_for(TENSORBOARD_DIR), local, e)


__all__ = [
    "MANAGED_ENV", "Session", "TrackingCallback", "check_installed", "read_run_ids", "report_to",
    "restore_tensorboard", "start", "tracking_env", "upload_logs",
]  # fmt: skip
