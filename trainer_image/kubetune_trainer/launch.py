"""``kubetune run job.yaml``: run a FineTuneJob on this machine under torchrun, no cluster needed.

:func:`run_local` validates the job, applies the command line's overrides (``--output``,
``--max-steps``, ``--nproc-per-node``, ``--cpu``) to a temporary copy of it, checks that this
machine can run it (GPUs, CPUs, S3 credentials, the method: one line per problem, naming the
override that fixes it, before any process starts), says so and stops when the output already
holds the finished run (``--restart`` trains again from step 0), then starts

    python -m torch.distributed.run --standalone --nproc-per-node N -m kubetune_trainer --config COPY

in the current directory (relative URIs in the job are relative to it). N is ``--nproc-per-node``,
else ``spec.parallel_config.nproc_per_node``, else the number of GPUs, else 1. With N = 1 there is
no torchrun: ``kubetune run`` starts ``python -m kubetune_trainer`` itself with the environment
torchrun's agent would give its one worker (:func:`single_process_env`), which saves the agent's own
Python start and torch import before the trainer's. The GPUs are counted without importing torch
where the machine has no GPU driver's device nodes. The processes talk
over gloo on CPU and NCCL on GPUs (accelerate picks the backend from the device). torchrun's
in-pod restarts are off locally.

Every run has its own work directory, ``$KUBETUNE_CACHE_DIR/work/<job>/<time>-<pid>/`` (local
checkpoint copies, downloads, and ``run.log``: everything torchrun and the trainer printed).
The console gets the trainer's output without torchrun's own report of a failed worker, and the
last line is kubetune's: the reason of a user error, or what failed and where the full log is.

The process tree dies with ``kubetune run``: torchrun's agent and every worker arm a death signal
(:mod:`lifetime`), so a SIGKILL of ``kubetune run`` stops the training too. Ctrl-C is passed to
the trainer once (it saves at the next step boundary and exits; run again to resume); a second
Ctrl-C kills the tree at once. SIGTERM and SIGHUP are passed on like the first Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from kubetune.conventions import ENV_AGENT_PID, ENV_RESTART, EXIT_PREEMPTED, EXIT_USER_ERROR
from kubetune.locations import WORK_DIRS
from kubetune.validate import apply_profile, load_job, load_jobs_text, load_profile
from kubetune_trainer.startup import ENV_LAUNCHED_AT

RUN_LOG = "run.log"
_KEEP_RUNS = 10  # work directories of earlier runs of a job kept (their logs)
_BULKY = WORK_DIRS  # of a finished or dead run


# device nodes of a GPU driver (NVIDIA, and ROCm's for AMD): without them torch sees no GPU either
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def _default_nproc(force_cpu: bool = False) -> tuple[int, str]:
    if force_cpu or os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return 1, "cpu"
    if not any(os.path.exists(p) for p in _GPU_DEVICE_NODES):
        return 1, "cpu"  # no GPU driver here: answered without importing torch (a second or two)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (gpus, "cuda") if gpus else (1, "cpu")


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _method_problem(job: Any) -> str | None:
    """The one-line reason this machine cannot run the job's method or find its model, or None."""
    import logging

    from kubetune_trainer.train import _NOISE

    # before anything imports bitsandbytes: it warns once, at import (quiet_known_noise's other
    # parts would import transformers, a second this process has no use for)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NOISE)
    from kubetune_trainer import model_loading, pet, switches
    from kubetune_trainer.errors import JobError

    spec = job.spec
    try:
        precision = model_loading.resolve_precision(spec.training.precision)
        pet.plan_pet(spec, precision)
        switches.check_switches(spec, precision)
        if spec.model.uri.split("://", 1)[0] not in ("s3", "hf"):
            model_loading.resolve_model_dir(spec.model.uri)
    except JobError as e:
        return str(e)
    return None


def _s3_fields(job: Any) -> list[tuple[str, str]]:
    return [(f, u) for f, u in job.spec.uri_fields() if u.startswith("s3://")]


def _have_s3_credentials() -> bool:
    from kubetune_trainer.store import StoreError, _credentials

    try:
        creds, _ = _credentials()
    except StoreError:
        return False  # $KUBETUNE_S3_CREDENTIALS_DIR names a directory without them
    if creds or os.environ.get("AWS_ACCESS_KEY_ID"):
        return True
    import boto3

    return boto3.session.Session().get_credentials() is not None


def preflight(job: Any, *, nproc: int, device: str, gpus_here: int, explicit_nproc: bool) -> list[str]:
    """What keeps this machine from running the job, one line each with the fix; [] when it can."""
    spec = job.spec
    problems = []
    wanted = spec.resources.gpus
    if wanted and gpus_here == 0:
        problems.append(
            f"spec.resources.gpus is {wanted} but this machine has no GPU; to train on the CPU "
            f"instead: kubetune run --cpu"
        )
    limit, unit = (gpus_here, "GPU") if device == "cuda" else (_cpu_count(), "CPU")
    if nproc > limit:
        what = "--nproc-per-node" if explicit_nproc else "spec.parallel_config.nproc_per_node"
        problems.append(
            f"{what} is {nproc} but this machine has {limit} {unit}{'s' if limit != 1 else ''} "
            f"(one process each); override: --nproc-per-node {max(1, limit)}"
        )
    s3 = _s3_fields(job)
    if s3 and not _have_s3_credentials():
        names = ", ".join(f for f, _ in s3)
        fix = "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or $KUBETUNE_S3_CREDENTIALS_DIR)"
        if any(f == "spec.output.uri" for f, _ in s3):
            fix += f"; for the output alone: --output ./runs/{job.metadata.name}"
        problems.append(f"{names}: s3:// and no S3 credentials here; {fix}")
    if not problems:
        method = _method_problem(job)
        if method:
            problems.append(method)
    return problems


# ---------------------------------------------------------------- run directories


def new_run_dir(job: Any) -> Path:
    """A fresh work directory for this run; earlier runs' bulky leftovers are removed."""
    from kubetune.locations import work_dir

    parent = work_dir(job.metadata.name)
    parent.mkdir(parents=True, exist_ok=True)
    _prune_runs(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = parent / f"{stamp}-{os.getpid()}"
    run.mkdir()
    return run


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune_runs(parent: Path) -> None:
    runs = sorted(d for d in parent.iterdir() if d.is_dir() and re.fullmatch(r"\d{8}-\d{6}-\d+", d.name))
    for i, d in enumerate(runs):
        if _pid_alive(int(d.name.rsplit("-", 1)[1])):
            continue  # another run of this job (the lease decides which one may write)
        if i < len(runs) - _KEEP_RUNS:
            shutil.rmtree(d, ignore_errors=True)
        else:
            _drop_bulky(d)


def _drop_bulky(run: Path) -> None:
    for name in _BULKY:
        shutil.rmtree(run / name, ignore_errors=True)


# ---------------------------------------------------------------- output


# torchrun's own lines: its glog-style log records and the report of a failed worker
_AGENT_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
_TRAINER_ERROR = re.compile(r"^(\[rank \d+\] )?kubetune: error\b")


class _Console:
    """Copies the workers' output to the console and run.log, torchrun's to run.log only."""

    def __init__(self, log: IO[bytes]) -> None:
        self.log = log
        self.lock = threading.Lock()
        self.held: list[str] = []  # the trainer's error lines: printed at the end, once
        self.worker_failures: list[tuple[int, int]] = []  # (local rank, exit code) torchrun saw

    def _write_log(self, data: bytes) -> None:
        with self.lock:
            self.log.write(data)
            self.log.flush()

    def pump_workers(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._write_log(raw)
            line = raw.decode(errors="replace")
            if _TRAINER_ERROR.match(line):
                self.held.append(line.rstrip("\n"))
                continue
            sys.stderr.write(line)
            sys.stderr.flush()

    def pump_agent(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            self._write_log(b"[torchrun] " + raw)
            m = _AGENT_FAILED.search(raw.decode(errors="replace"))
            if m:
                self.worker_failures.append((int(m.group(2)), int(m.group(1))))


def _describe_failure(status: int, failures: list[tuple[int, int]]) -> str:
    for rank, code in failures:
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"local rank {rank} was killed by {name}{hint}"
    for rank, code in failures:
        return f"local rank {rank} exited {code}"
    return f"torchrun exited {status}"


# ---------------------------------------------------------------- the run


def run_local(
    path: str | os.PathLike,
    nproc_per_node: int | None = None,
    output: str | None = None,
    max_steps: int | None = None,
    *,
    cpu: bool = False,
    restart: bool = False,
    profile: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
) -> int:
    """Run the job in `path` locally, with the ``--set PATH=VALUE`` `overrides` and the FineTuneProfile
    file `profile` applied if given; returns the exit status (0: trained and exported, or already finished; 65: a problem with the job or this
    machine; 75: interrupted, resumable)."""
    launched_at = time.time()
    job = apply_profile(load_job(path, overrides), load_profile(profile) if profile else None, str(path))
    doc = job.model_dump(mode="json", exclude_none=True)
    if output is not None:
        doc["spec"]["output"]["uri"] = output
    if max_steps is not None:
        doc["spec"]["training"]["max_steps"] = max_steps
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    if output is not None or max_steps is not None:
        job = load_jobs_text(text, str(path))[0]  # the overrides are validated like the file

    gpus_here, device = _default_nproc(force_cpu=cpu)
    gpus_here = gpus_here if device == "cuda" else 0
    nproc = nproc_per_node or job.spec.parallel_config.nproc_per_node or (gpus_here or 1)
    problems = preflight(
        job, nproc=nproc, device=device, gpus_here=gpus_here, explicit_nproc=nproc_per_node is not None
    )
    if cpu and device == "cpu":
        problems = [p for p in problems if not p.startswith("spec.resources.gpus")]
    for problem in problems:
        print(f"kubetune run: error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_USER_ERROR

    from kubetune_trainer import rerun

    finished = rerun.finished_run(job)
    if finished is not None and not restart:
        print(f"kubetune run: {job.metadata.name}: {finished.describe()}", file=sys.stderr)
        return 0
    if restart and not rerun.confirm_restart(job, finished):
        print("kubetune run: not restarted", file=sys.stderr)
        return 1

    backend = "nccl" if device == "cuda" else "gloo"
    run_dir = new_run_dir(job)
    print(
        f"kubetune run: {job.metadata.name}: {job.spec.method} {job.spec.pet_config.pet_type} "
        f"on {nproc} process{'es' if nproc > 1 else ''} ({device}, {backend}); output {job.spec.output.uri}"
        + ("; restarting from step 0" if restart else ""),
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-run-") as tmp:
        config = Path(tmp) / "job.yaml"
        config.write_text(text, encoding="utf-8")
        torchrun = [
            "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
            "-m", "kubetune_trainer", "--config", str(config), "--workdir", str(run_dir),
        ]  # fmt: skip
        env = dict(os.environ)
        if device == "cpu" and "OMP_NUM_THREADS" not in env:  # else accelerate warns and picks its own
            env["OMP_NUM_THREADS"] = str(max(1, _cpu_count() // nproc))
        if cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        if restart:
            env[ENV_RESTART] = "1"
        env.setdefault(ENV_LAUNCHED_AT, f"{launched_at:.3f}")  # for the trainer's startup line
        if nproc == 1:  # torchrun's agent would only start this one process (and import torch again)
            code = _run_single(job, torchrun[torchrun.index("-m") :], env, run_dir)
        else:
            code = _run_torchrun(job, torchrun, env, run_dir)
    if code == 0:
        _drop_bulky(run_dir)
    return code


def _run_torchrun(job: Any, torchrun_args: list[str], env: dict[str, str], run_dir: Path) -> int:
    from kubetune_trainer.supervise import Markers, exit_status

    markers = Markers()
    env = markers.child_env(["--config", torchrun_args[torchrun_args.index("--config") + 1]], env)
    agent_r, agent_w = os.pipe()
    cmd = [
        sys.executable, "-m", "kubetune_trainer.launch", "--agent", str(os.getpid()), str(agent_w), "--",
        *torchrun_args,
    ]  # fmt: skip
    log_path = run_dir / RUN_LOG
    with open(log_path, "ab") as log:
        console = _Console(log)
        # its own session: the terminal's Ctrl-C reaches only us, and we pass it on exactly once
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(agent_w,), start_new_session=True,
        )  # fmt: skip
        os.close(agent_w)
        assert proc.stdout is not None
        pumps = [
            threading.Thread(target=console.pump_workers, args=(proc.stdout,), daemon=True),
            threading.Thread(target=console.pump_agent, args=(os.fdopen(agent_r, "rb"),), daemon=True),
        ]
        for t in pumps:
            t.start()
        interrupted = _wait_forwarding_signals(proc)
        for t in pumps:
            t.join(timeout=10)
    return _report(job, proc.returncode, interrupted, console, markers, log_path, exit_status)


def _report(
    job: Any,
    status: int,
    interrupted: str | None,
    console: _Console,
    markers: Any,
    log_path: Path,
    exit_status: Any,
) -> int:
    """The exit status of `kubetune run` and its last line, from how the gang ended."""
    preempted, reason = markers.read()
    if interrupted == "killed":
        print(f"kubetune run: stopped at once (second Ctrl-C); log: {log_path}", file=sys.stderr)
        return 130
    code = exit_status(status, preempted, reason is not None)
    if code == 0:
        return 0
    if reason is not None:
        print(f"kubetune run: error: {reason} (full log: {log_path})", file=sys.stderr)
        return EXIT_USER_ERROR
    for line in console.held:  # errors without a marker: print them as the trainer said them
        print(line, file=sys.stderr)
    if code == EXIT_PREEMPTED or interrupted:
        print(
            f"kubetune run: {job.metadata.name} stopped before the end; run the same command again to "
            f"resume from its last committed checkpoint (log: {log_path})",
            file=sys.stderr,
        )
        return code
    print(
        f"kubetune run: {job.metadata.name} failed: {_describe_failure(status, console.worker_failures)}; "
        f"full log: {log_path}",
        file=sys.stderr,
    )
    return code


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env(env: dict[str, str], launcher_pid: int) -> dict[str, str]:
    """What torchrun --standalone --nproc-per-node 1 gives its one worker, for a worker `kubetune run`
    starts itself: the same rank variables (so accelerate sets up the same one-process gloo/NCCL group
    and checkpoints are the same), the worker hosting its own store, and dying with the launcher."""
    return {
        **env,
        "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "ROLE_RANK": "0", "ROLE_NAME": "default",
        "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": f"kubetune-run-{launcher_pid}", "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        ENV_AGENT_PID: str(launcher_pid),  # lifetime.die_with_parent: the worker dies with us
    }  # fmt: skip


def _run_single(job: Any, worker_args: list[str], env: dict[str, str], run_dir: Path) -> int:
    """One worker, started here as torchrun would start it; its exit status and console as
    :func:`_run_torchrun` reports them."""
    from kubetune_trainer.supervise import Markers, exit_status

    markers = Markers()
    env = single_process_env(markers.child_env(worker_args, env), os.getpid())
    log_path = run_dir / RUN_LOG
    with open(log_path, "ab") as log:
        console = _Console(log)
        proc = subprocess.Popen(
            [sys.executable, *worker_args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        pump = threading.Thread(target=console.pump_workers, args=(proc.stdout,), daemon=True)
        pump.start()
        # as torchrun does: a worker that has not exited this long after the signal is killed
        grace = float(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30"))
        interrupted = _wait_forwarding_signals(proc, kill_after=grace)
        pump.join(timeout=10)
    status = proc.returncode
    if status != 0:
        console.worker_failures.append((0, status))
        status = 1  # what torchrun exits with when its worker failed
    return _report(job, status, interrupted, console, markers, log_path, exit_status)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_forwarding_signals(proc: subprocess.Popen, kill_after: float | None = None) -> str | None:
    """Wait for torchrun (or the one worker); pass the first SIGINT/SIGTERM/SIGHUP on, kill everything on
    a second SIGINT, or `kill_after` seconds after the first. Returns None, "forwarded" or "killed"."""
    state: list[str] = []

    def on_signal(signum: int, frame: Any) -> None:
        if state and signum == signal.SIGINT:
            state.append("killed")
            # torchrun's workers die with it (lifetime.die_with_parent)
            os.killpg(proc.pid, signal.SIGKILL)
            return
        if not state:
            state.append("forwarded")
            if signum == signal.SIGINT:
                print(
                    "\nkubetune run: Ctrl-C: saving at the next step boundary, then stopping "
                    "(Ctrl-C again to stop at once, without saving)",
                    file=sys.stderr,
                    flush=True,
                )
            try:
                proc.send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
            except ProcessLookupError:
                pass
            if kill_after is not None:
                timer = threading.Timer(kill_after, _kill_group, args=(proc,))
                timer.daemon = True
                timer.start()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - the handler above replaces it
                continue
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return "killed" if "killed" in state else state[0] if state else None


def _agent_main(argv: list[str]) -> int:
    """torchrun's agent as `kubetune run` starts it: it dies with `kubetune run`, and its own
    messages (Python logging, its report of a failed worker) go to a separate pipe while the
    workers it starts keep its stdout/stderr."""
    parent, fd = int(argv[0]), int(argv[1])
    args = argv[argv.index("--") + 1 :]
    from kubetune_trainer.lifetime import die_with_parent

    die_with_parent(signal.SIGKILL, expected_parent=parent)
    os.environ[ENV_AGENT_PID] = str(os.getpid())
    agent_out = os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")
    sys.stdout = sys.stderr = agent_out
    import runpy

    sys.argv = ["torchrun", *args]
    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--agent"]:
    sys.exit(_agent_main(sys.argv[2:]))
