"""`kubetune plan`: its tensor terms are the bytes a real run holds, its activations are near the
measured peak, and its verdict and suggestions follow from them.

The exact tests train the tiny model one step through `run_training` (the trainer's own loading,
pet_config and Trainer optimizer) and sum, at the optimizer step, the bytes of every parameter,
buffer and bitsandbytes quantization state, every `.grad` and every optimizer-state tensor; the
plan's terms, built on the meta device, must equal them to the byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune import plan as core

pytestmark = pytest.mark.filterwarnings("error:.*autograd kernel was not registered")

# (pet_config, training) per case; fp32 unless the case says otherwise
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "full": ({"pet_type": "full"}, {}),
    "full-bf16-sgd": ({"pet_type": "full"}, {"precision": "bf16", "optimizer": "sgd"}),
    "freeze": ({"pet_type": "freeze", "freeze_trainable_layers": 1}, {}),
    "lora": ({"pet_type": "lora", "lora_rank": 8, "target_modules": "all-linear"}, {}),
    "lora-bf16-adamw8bit": (
        {"pet_type": "lora", "lora_rank": 16, "target_modules": ".*q_proj|.*v_proj|lm_head"},
        {"precision": "bf16", "optimizer": "adamw_8bit"},
    ),
    "qlora-4bit-nf4-dq": (
        {"pet_type": "qlora", "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True}},
        {},
    ),
    "qlora-4bit-fp4-bf16": (
        {"pet_type": "qlora", "quantization": {"bits": 4, "quant_type": "fp4", "double_quant": False}},
        {"precision": "bf16"},
    ),
    "qlora-8bit": ({"pet_type": "qlora", "quantization": {"bits": 8}}, {}),
}
TERMS = ("weights", "adapter", "gradients", "optimizer")


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors` (a tied or shared tensor counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        seen.setdefault(t.untyped_storage().data_ptr(), t.numel() * t.element_size())
    return sum(seen.values())


def _quant_state(p: torch.Tensor) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    qs = getattr(p, "quant_state", None)
    while qs is not None:  # bitsandbytes 4-bit: absmax, code map, offset; nested state for double quant
        out += [t for t in (qs.absmax, qs.code, qs.offset) if t is not None]
        qs = qs.state2
    if getattr(p, "SCB", None) is not None:  # bitsandbytes int8: the row scales
        out.append(p.SCB)
    return out


def real_terms(model: Any, optimizer: Any) -> dict[str, int]:
    named = list(model.named_parameters())
    adapter = [p for n, p in named if ".lora_" in n]
    weights = [p for n, p in named if ".lora_" not in n]
    weights += [t for _, p in named for t in _quant_state(p)] + list(model.buffers())
    for module in model.modules():  # int8 layers move CB and SCB from the weight to their state
        state = getattr(module, "state", None)
        weights += [t for t in (getattr(state, "CB", None), getattr(state, "SCB", None)) if t is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "weights": _nbytes(weights),
        "adapter": _nbytes(adapter),
        "gradients": _nbytes([p.grad for _, p in named if p.grad is not None]),
        "optimizer": sum(t.numel() * t.element_size() for t in state),
    }


@pytest.fixture(scope="module")
def one_step(
    tmp_path_factory: pytest.TempPathFactory, train_job: Callable[..., Any]
) -> Callable[[str], tuple[Any, dict[str, int]]]:
    """`one_step(case)`: (job, bytes per term) measured at the first optimizer step of a real run."""
    from transformers import TrainerCallback

    from kubetune_trainer.train import run_training

    done: dict[str, tuple[Any, dict[str, int]]] = {}

    class Measure(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.terms = real_terms(kw["model"], kw["optimizer"])

    def run(case: str) -> tuple[Any, dict[str, int]]:
        if case not in done:
            pet_config, training = CASES[case]
            base = tmp_path_factory.mktemp(f"plan-{case}")
            job = train_job(
                base / "out",
                pet_config=pet_config,
                training={"max_steps": 1, **training},
                merge_adapter=False,
            )
            measure = Measure()
            run_training(job, workdir=base / "work", callbacks=[measure])
            done[case] = (job, measure.terms)
        return done[case]

    return run


@pytest.fixture(scope="module")
def planned() -> Callable[[Any], core.Measured]:
    from kubetune_trainer.plan import measure, model_config

    def plan(job: Any) -> core.Measured:
        return measure(job.spec, model_config(job.spec), "cpu")

    return plan


def _term(m: core.Measured, term: str) -> int:
    return core.sharded_bytes(getattr(m, term), 1)


@pytest.mark.parametrize("case", list(CASES))
def test_weights_are_the_bytes_a_real_run_holds(one_step: Any, planned: Any, case: str) -> None:
    job, real = one_step(case)
    assert _term(planned(job), "weights") == real["weights"]


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_is_the_bytes_a_real_run_holds(one_step: Any, planned: Any, case: str) -> None:
    job, real = one_step(case)
    assert _term(planned(job), "adapter") == real["adapter"]
    assert (real["adapter"] > 0) == ("lora" in case)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_are_the_bytes_a_real_run_holds(one_step: Any, planned: Any, case: str) -> None:
    job, real = one_step(case)
    assert _term(planned(job), "gradients") == real["gradients"] > 0


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_state_is_the_bytes_a_real_run_holds(one_step: Any, planned: Any, case: str) -> None:
    job, real = one_step(case)
    assert _term(planned(job), "optimizer") == real["optimizer"]
    assert (real["optimizer"] == 0) == ("sgd" in case)  # plain SGD keeps no state


def test_quantization_shrinks_the_weights_as_bitsandbytes_does(planned: Any, one_step: Any) -> None:
    full = _term(planned(one_step("lora")[0]), "weights")
    four = _term(planned(one_step("qlora-4bit-nf4-dq")[0]), "weights")
    eight = _term(planned(one_step("qlora-8bit")[0]), "weights")
    assert four < eight < full


# ---------------------------------------------------------------- activations


class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of tensor storages created while active: every op's outputs are followed
    through weak references to their storages (a view or an in-place result adds nothing) until
    they are freed. `peak(exclude)` leaves out storages that are not activations (weights, .grad)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.ops = 0
        self.live: dict[int, tuple[Any, int, int]] = {}  # storage -> (weak ref, bytes, first op)
        self.spans: list[tuple[int, int, int, int]] = []  # (storage, bytes, first op, freed at op)

    def _sweep(self) -> None:
        for key, (ref, nbytes, born) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.spans.append((key, nbytes, born, self.ops))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self._sweep()
        leaves = torch.utils._pytree.tree_leaves
        inputs = {
            self._ref(t.untyped_storage()).cdata
            for t in leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in leaves(out):
            if isinstance(t, torch.Tensor):
                ref = self._ref(t.untyped_storage())
                if ref.cdata not in inputs:  # a view or an in-place result of an input allocates nothing
                    self.live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes(), self.ops))
        return out

    def peak(self, exclude: list[torch.Tensor]) -> int:
        self._sweep()
        # only storages still alive can be the excluded ones (a freed one's address may be reused)
        skip = {self._ref(t.untyped_storage()).cdata for t in exclude}
        spans = self.spans + [(k, n, b, self.ops + 1) for k, (_, n, b) in self.live.items() if k not in skip]
        delta: dict[int, int] = {}
        for _, nbytes, born, freed in spans:
            delta[born] = delta.get(born, 0) + nbytes
            delta[freed] = delta.get(freed, 0) - nbytes
        now = best = 0
        for op in sorted(delta):
            now += delta[op]
            best = max(best, now)
        return best


ACTIVATION_FACTOR = 1.25  # the formula is within this factor of the measured peak (either way)
ACTIVATION_CASES = {
    "full-fp32": ({"pet_type": "full"}, "fp32"),
    "lora-fp32": ({"pet_type": "lora", "lora_rank": 16, "target_modules": "all-linear"}, "fp32"),
    "lora-bf16": ({"pet_type": "lora", "lora_rank": 16, "target_modules": "all-linear"}, "bf16"),
    "full-bf16": ({"pet_type": "full"}, "bf16"),
}


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 with more layers and width against its vocabulary than the shared one, so the
    decoder layers, not the logits, carry most of the activations."""
    from kubetune_trainer.tiny import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("wide") / "m", hidden_size=256, num_layers=4, vocab_size=1024
    )


def _measured_activations(job: Any, model_dir: Path, batch: int, seq: int, checkpointing: bool) -> int:
    """Peak activation bytes of one forward and backward of the model loaded as the trainer loads it."""
    from kubetune_trainer import model_loading, pet

    precision = model_loading.resolve_precision(job.spec.training.precision, "cpu")
    plan = pet.plan_pet(job.spec, precision)
    model = model_loading.load_model(model_dir, job.spec, precision)
    model = pet.apply_pet(model, job.spec, plan)
    if checkpointing:  # what the Trainer does for training.gradient_checkpointing
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=precision.dtype, enabled=precision.name == "bf16"):
        with LiveTensorBytes() as live:
            out = model(input_ids=ids, labels=ids)
            loss = out.loss
            del out
            loss.backward()
    kept = [
        *model.parameters(),
        *model.buffers(),
        *(p.grad for p in model.parameters() if p.grad is not None),
    ]
    return live.peak(exclude=kept)


@pytest.mark.parametrize("case", list(ACTIVATION_CASES))
def test_activation_estimate_is_near_the_measured_peak_and_checkpointing_lowers_both(
    wider_model: Path, train_job: Callable[..., Any], tmp_path: Path, case: str
) -> None:
    from kubetune_trainer.plan import measure, model_config

    pet_config, precision = ACTIVATION_CASES[case]
    batch, seq = 2, 128
    results = {}
    for checkpointing in (False, True):
        job = train_job(
            tmp_path / "o", pet_config=pet_config, model_uri=str(wider_model),
            training={"precision": precision, "gradient_checkpointing": checkpointing},
        )  # fmt: skip
        m = measure(job.spec, model_config(job.spec), "cpu")
        estimate = (
            core.activation_bytes(m.shape, batch, seq, m.compute_bytes, checkpointing) + m.autocast_copies
        )
        measured = _measured_activations(job, wider_model, batch, seq, checkpointing)
        results[checkpointing] = (estimate, measured)
        assert 1 / ACTIVATION_FACTOR <= estimate / measured <= ACTIVATION_FACTOR, (
            checkpointing,
            estimate,
            measured,
        )
    (est_off, real_off), (est_on, real_on) = results[False], results[True]
    assert est_on < est_off and real_on < real_off, results


# ---------------------------------------------------------------- arithmetic (no torch)


def _measured(**kw: Any) -> core.Measured:
    fields: dict[str, Any] = dict(
        weights=[(1000, 2_000_000)],  # 2 GB of weights
        adapter=[],
        gradients=[(1000, 2_000_000)],
        optimizer=[(1000, 4_000_000), (1, 4)],
        layer_weights=100_000_000,
        layer_gradients=100_000_000,
        reference=0,
        autocast_copies=0,
        shape=core.ModelShape(hidden=1024, layers=20, intermediate=4096, vocab=32000),
        total_params=1_000_000_000,
        trainable_params=1_000_000_000,
        compute_bytes=2,
    )
    return core.Measured(**{**fields, **kw})


def _setup(**kw: Any) -> core.Setup:
    fields: dict[str, Any] = dict(
        batch=8, accumulation=1, seq_length=2048, gradient_checkpointing=False, nnodes=1, nproc_per_node=1,
        strategy="ddp",
    )  # fmt: skip
    return core.Setup(**{**fields, **kw})


def test_fsdp_shards_every_tensor_on_dim0_with_padding() -> None:
    assert core.sharded_bytes([(10, 4), (1, 4)], 1) == 44
    assert core.sharded_bytes([(10, 4), (1, 4)], 4) == 3 * 4 + 4  # ceil(10/4) rows; a scalar stays whole
    est = core.estimate(_measured(), _setup(nnodes=2, nproc_per_node=4, strategy="fsdp"))
    assert est.terms["weights"] == 2_000_000_000 // 8
    assert est.terms["fsdp buffers"] == 300_000_000
    ddp = core.estimate(_measured(), _setup(nnodes=2, nproc_per_node=4))
    assert ddp.terms["weights"] == 2_000_000_000 and ddp.terms["ddp buckets"] == 2_000_000_000


def test_activations_scale_with_batch_and_checkpointing_keeps_one_layer() -> None:
    shape = core.ModelShape(hidden=1024, layers=20, intermediate=4096, vocab=32000)
    one = core.activation_bytes(shape, 1, 1024, 2, False)
    assert core.activation_bytes(shape, 4, 1024, 2, False) == 4 * one
    logits = 1024 * 32000 * 4 * 2
    layer = 1024 * (1024 * (10 + 3 * 4) * 2 + 1024 * 16)
    assert one == 20 * layer + logits
    assert core.activation_bytes(shape, 1, 1024, 2, True) == 1024 * 1024 * 20 * 2 + layer + logits
    dpo = core.estimate(_measured(), _setup(batch=1, seq_length=1024, method="dpo"))
    assert dpo.terms["activations"] == 2 * one


def test_offloaded_checkpointing_keeps_two_layer_inputs_on_the_gpu_and_says_what_goes_to_the_host() -> None:
    shape = core.ModelShape(hidden=1024, layers=20, intermediate=4096, vocab=32000)
    logits = 1024 * 32000 * 4 * 2
    layer = 1024 * (1024 * (10 + 3 * 4) * 2 + 1024 * 16)
    assert (
        core.activation_bytes(shape, 1, 1024, 2, True, offload=True) == 1024 * 1024 * 2 * 2 + layer + logits
    )
    m = _measured()
    plain = core.estimate(m, _setup(gradient_checkpointing=True))
    off = core.estimate(m, _setup(gradient_checkpointing=True, offload=True))
    hidden, layers, d = m.shape.hidden, m.shape.layers, m.compute_bytes
    inputs = 8 * 2048 * hidden * d  # one layer's input at batch 8, seq 2048
    assert plain.terms["activations"] - off.terms["activations"] == (layers - 2) * inputs
    assert f"layer inputs offloaded ({core.show(layers * inputs)} of host memory)" in off.notes["activations"]
    # a job already offloading is not told to; a CPU job (nothing to offload to) neither
    told = lambda s: [x.change for x in core.suggestions(m, s, 1) if "offload" in x.change]  # noqa: E731
    assert told(_setup()) == ["gradient_checkpointing: offload"]
    assert told(_setup(gradient_checkpointing=True, offload=True)) == told(_setup(device="cpu")) == []

    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.plan import setup_of

    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "s3://models/tiny"}, "dataset": {"uri": "s3://data/a.json"}, "output": {"uri": "s3://runs/j"},
        "training": {"gradient_checkpointing": "offload"},
    })  # fmt: skip
    planned = setup_of(spec, "cuda")
    assert planned.gradient_checkpointing and planned.offload


def test_suggestions_each_make_it_fit_or_say_they_do_not() -> None:
    m, s = _measured(), _setup()
    total = core.estimate(m, s).total
    budget = total - 1
    lines = core.suggestions(m, s, budget)
    changes = {x.change.split(",")[0]: x for x in lines}
    batch = changes["per_device_train_batch_size: 7"]
    assert batch.fits and "per_device_train_batch_size: 7, gradient_accumulation_steps: 2" == batch.change
    assert changes["gradient_checkpointing: true"].fits and changes["gradient_checkpointing: offload"].fits
    nodes = changes["strategy: fsdp"]
    assert nodes.change == "strategy: fsdp, nnodes: 2 (2 processes)" and nodes.fits
    lighter = replace_measured(m, weights=[(1000, 1_000_000)])
    with_alt = core.suggestions(m, s, budget, alternatives={"pet_type: qlora (4-bit nf4, rank 8)": lighter})
    assert any(x.change.startswith("pet_type: qlora") and x.fits for x in with_alt)
    # far too small: no batch fits, and the line says so
    tiny = core.suggestions(m, s, 10**9)
    assert not [x for x in tiny if x.change.startswith("per_device")][0].fits


def replace_measured(m: core.Measured, **kw: Any) -> core.Measured:
    from dataclasses import replace

    return replace(m, **kw)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("80GiB", 80 * 2**30),
        ("80Gi", 80 * 2**30),
        ("24GB", 24 * 10**9),
        ("81559Mi", 81559 * 2**20),
        ("1e9", 10**9),
    ],
)
def test_memory_sizes(text: str, expected: int) -> None:
    assert core.parse_memory(text) == expected


def test_memory_size_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="not a memory size"):
        core.parse_memory("lots")


@pytest.mark.parametrize(
    "selector, expected",
    [
        ({"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, 80 * 2**30),
        ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"}, 40 * 2**30),
        ({"nvidia.com/gpu.product": "NVIDIA-H200"}, 141 * 10**9),
        ({"nvidia.com/gpu.product": "NVIDIA-L4"}, 24 * 2**30),
        ({"nvidia.com/gpu.memory": "81559"}, 81559 * 2**20),
        ({"nvidia.com/gpu.product": "Some-Future-GPU"}, None),
        ({}, None),
    ],
)
def test_gpu_memory_from_node_selector(selector: dict[str, str], expected: int | None) -> None:
    assert core.gpu_memory_from_selector(selector) == expected


# ---------------------------------------------------------------- the command


def _kubetune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`kubetune ARGS` in this process (the console script's main): exit status, stdout, stderr."""
    from kubetune.cli import main

    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _job_file(job: Any, path: Path, **spec: Any) -> Path:
    from tests.fixtures_train import write_job_file

    return write_job_file(job, path, **spec)


def test_plan_of_a_cpu_job_fits_in_its_pod_memory(train_job: Any, tmp_path: Path, capsys: Any) -> None:
    job = _job_file(train_job(tmp_path / "o"), tmp_path / "job.yaml")
    rc, out, err = _kubetune(capsys, "plan", str(job))
    assert rc == 0, err
    for term in (
        "| weights |",
        "| adapter |",
        "| gradients |",
        "| optimizer |",
        "| activations |",
        "| total |",
    ):
        assert term in out
    assert "fits: " in out and "resources.memory 16Gi / 1 process(es)" in out


def test_plan_that_does_not_fit_exits_1_with_one_line_per_change(
    train_job: Any, tmp_path: Path, capsys: Any
) -> None:
    job = _job_file(
        train_job(tmp_path / "o", pet_config={"pet_type": "full"}, training={"seq_length": 2048}),
        tmp_path / "job.yaml",
    )
    rc, out, err = _kubetune(capsys, "plan", str(job), "--gpu-memory", "1.1GiB", "--json", "--tflops", "100")
    assert rc == 1, err
    plan = json.loads(out)
    assert plan["fits"] is False and plan["device"] == "cuda" and plan["budget"] == int(1.1 * 2**30)
    assert plan["total"] == sum(plan["terms"].values()) > plan["budget"]
    changes = [s["change"] for s in plan["suggestions"]]
    assert any(c.startswith("per_device_train_batch_size: ") for c in changes)
    assert "gradient_checkpointing: true" in changes
    assert any(c.startswith("pet_type: lora") for c in changes)
    assert any(c.startswith("pet_type: qlora") for c in changes)
    assert plan["step_seconds"] > 0
    text = core.render(plan)
    assert "does not fit" in text and "to make it fit, one change each:" in text
    assert len([line for line in text.splitlines() if line.startswith("  ")]) == len(changes)


def test_plan_reads_the_gpu_from_the_profile_node_selector(
    train_job: Any, tmp_path: Path, capsys: Any
) -> None:
    import yaml

    profile = tmp_path / "profile.yaml"
    gpu = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    profile.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubetune.io/v1alpha1",
                "kind": "FineTuneProfile",
                "metadata": {"name": "h100"},
                "spec": {"defaults": {"resources": {"gpus": 8, "node_selector": gpu}}},
            }
        )
    )
    job = _job_file(train_job(tmp_path / "o"), tmp_path / "job.yaml")
    rc, out, err = _kubetune(capsys, "plan", str(job), "--profile", str(profile), "--json")
    assert rc == 0, err
    plan = json.loads(out)
    assert (
        plan["budget"] == 80 * 2**30
        and "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in plan["budget_source"]
    )
    assert plan["setup"]["nproc_per_node"] == 8 and plan["device"] == "cuda"


@pytest.mark.parametrize(
    "uri, spec, says",
    [
        ("hf://Qwen/Qwen2.5-7B-Instruct", {}, "hf://Qwen/Qwen2.5-7B-Instruct: cannot read its config.json"),
        (
            "s3://models/qwen",
            {"storage": {"s3": {"endpoint": "http://127.0.0.1:9"}}},
            "s3://models/qwen: cannot read",
        ),
        ("/nonexistent/model", {}, "/nonexistent/model: no config.json there"),
    ],
)
def test_a_model_plan_cannot_see_is_one_line(
    train_job: Any, tmp_path: Path, capsys: Any, monkeypatch: Any, uri: str, spec: dict[str, Any], says: str
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)  # no credentials
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    job = _job_file(train_job(tmp_path / "o", model_uri=uri), tmp_path / "job.yaml", **spec)
    rc, out, err = _kubetune(capsys, "plan", str(job))
    lines = err.strip().splitlines()
    assert rc == 1 and not out
    assert len(lines) == 1 and lines[0].startswith("kubetune: spec.model.uri: ") and says in lines[0], err
