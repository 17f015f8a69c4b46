"""pet_config's LoRA variants reach the peft model: DoRA's magnitude vectors train, rsLoRA scales by
alpha/sqrt(r), init_lora_weights gaussian / pissa / olora start the adapter as peft documents, and a
PiSSA run's final/adapter is a plain LoRA adapter of the unchanged base."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.errors import JobError

LORA = {"pet_type": "lora", "target_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 16}


class Snapshots:
    """A TrainerCallback keeping the model and named parameters at the start and end of training."""

    def __init__(self, names: str) -> None:
        self.names = names
        self.model: Any = None
        self.begin: dict[str, Any] = {}
        self.end: dict[str, Any] = {}

    def _take(self, model: Any) -> dict[str, Any]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if self.names in n}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.model = model
        self.begin = self._take(model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.end = self._take(model)

    def __getattr__(self, name: str) -> Any:  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def _run(tmp: Path, train_job: Any, pet: dict[str, Any], snap: Snapshots, *, merge: bool) -> Any:
    """10 training steps; without `merge` the trained peft model stays as it was (the export merges in place)."""
    from kubetune_trainer.train import run_training

    job = train_job(tmp / "out", pet_config={**LORA, **pet}, training={"max_steps": 10}, merge_adapter=merge)
    return job, run_training(job, workdir=tmp / "work", callbacks=[snap])


@pytest.fixture(scope="module")
def dora_rslora_run(tmp_path_factory: pytest.TempPathFactory, train_job: Any) -> tuple[Any, Snapshots]:
    snap = Snapshots("lora_magnitude_vector")
    job, result = _run(
        tmp_path_factory.mktemp("dora"), train_job, {"use_dora": True, "use_rslora": True}, snap, merge=False
    )
    assert result.completed
    return result, snap


def test_dora_adds_magnitude_vectors_that_train(dora_rslora_run: tuple[Any, Snapshots]) -> None:
    _, snap = dora_rslora_run
    magnitudes = [
        n for n, p in snap.model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad
    ]
    assert len(magnitudes) == 4  # q_proj and v_proj of 2 layers
    assert set(snap.begin) == set(magnitudes)
    for name in magnitudes:
        assert not snap.begin[name].equal(snap.end[name]), f"{name} did not change in 10 steps"


def test_rslora_scales_the_update_by_alpha_over_sqrt_rank(dora_rslora_run: tuple[Any, Snapshots]) -> None:
    _, snap = dora_rslora_run
    from peft.tuners.lora import LoraLayer

    layers = [m for m in snap.model.modules() if isinstance(m, LoraLayer)]
    assert layers and all(m.scaling["default"] == pytest.approx(16 / math.sqrt(4)) for m in layers)


def _fresh_lora(tiny_model_dirs: Any, train_job: Any, tmp: Path, pet: dict[str, Any]) -> tuple[Any, Any]:
    """(base model, peft model) as run_training builds them, without training."""
    from kubetune_trainer import model_loading
    from kubetune_trainer import pet as pet_mod

    job = train_job(tmp / "out", pet_config={**LORA, **pet})
    precision = model_loading.resolve_precision("fp32")
    plan = pet_mod.plan_pet(job.spec, precision)
    base = model_loading.load_model(tiny_model_dirs["qwen2"], job.spec, precision)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    return original, pet_mod.apply_pet(base, job.spec, plan, scratch=tmp / "scratch")


def _lora_tensors(model: Any, which: str) -> list[Any]:
    return [p for n, p in model.named_parameters() if f"{which}.default" in n]


def test_default_init_starts_from_the_base_model(
    tiny_model_dirs: Any, train_job: Any, tmp_path: Path
) -> None:
    original, model = _fresh_lora(tiny_model_dirs, train_job, tmp_path, {})
    assert all(b.abs().max() == 0 for b in _lora_tensors(model, "lora_B"))
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
    }
    assert all(base[n].equal(p) for n, p in original.items())


def test_gaussian_init_draws_a_from_a_normal_of_std_one_over_rank(
    tiny_model_dirs: Any, train_job: Any, tmp_path: Path
) -> None:
    import torch

    _, model = _fresh_lora(tiny_model_dirs, train_job, tmp_path, {"init_lora_weights": "gaussian"})
    a = torch.cat([p.flatten() for p in _lora_tensors(model, "lora_A")])
    assert a.std().item() == pytest.approx(1 / 4, rel=0.1)  # peft: normal(0, 1/r)
    assert all(b.abs().max() == 0 for b in _lora_tensors(model, "lora_B"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_move_the_principal_part_of_each_weight_into_the_adapter(
    init: str, tiny_model_dirs: Any, train_job: Any, tmp_path: Path
) -> None:
    import torch

    original, model = _fresh_lora(tiny_model_dirs, train_job, tmp_path, {"init_lora_weights": init})
    assert all(b.abs().max() > 0 for b in _lora_tensors(model, "lora_B"))  # the adapter starts non-zero
    for layer in (0, 1):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        lora = model.base_model.model.model.layers[layer].self_attn.q_proj
        residual = lora.base_layer.weight
        assert not residual.equal(original[name])  # the base weight changed ...
        delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        torch.testing.assert_close(
            residual + delta, original[name], atol=1e-5, rtol=1e-5
        )  # ... by the adapter


def test_a_pissa_runs_adapter_is_plain_lora_of_the_unchanged_base(
    tiny_model_dirs: Any, train_job: Any, tmp_path: Path
) -> None:
    """final/adapter on the original base computes what final/merged (the trained model) computes."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    snap = Snapshots("lora_B")
    job, result = _run(tmp_path, train_job, {"init_lora_weights": "pissa"}, snap, merge=True)
    adapter, merged = result.exported["adapter"], result.exported["merged"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # rank 2r: trained minus initial
    ids = torch.tensor([[5, 17, 99, 3, 250, 7, 41, 12]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        via_adapter = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=ids).logits
        want = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
    assert not torch.allclose(before, want, atol=1e-3)  # training moved the model
    torch.testing.assert_close(via_adapter, want, atol=1e-4, rtol=1e-4)


def test_an_adapter_continued_keeps_its_own_dora_setting(
    tiny_model_dirs: Any, train_job: Any, tmp_path: Path, dora_rslora_run: tuple[Any, Snapshots]
) -> None:
    from kubetune_trainer import model_loading, pet

    result, _ = dora_rslora_run
    job = train_job(
        tmp_path / "out",
        pet_config={**LORA, "use_rslora": True},
        model_uri=str(tiny_model_dirs["qwen2"]),
    )
    precision = model_loading.resolve_precision("fp32")
    base = model_loading.load_model(tiny_model_dirs["qwen2"], job.spec, precision)
    with pytest.raises(JobError) as e:
        pet.apply_pet(
            base, job.spec, pet.plan_pet(job.spec, precision), adapter_dir=result.exported["adapter"]
        )
    assert str(e.value) == (
        "spec.pet_config.use_dora is false but the adapter at spec.model.adapter_uri was trained with use_dora "
        "true: set use_dora: true"
    )


def test_the_start_up_line_names_the_lora_variant(train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer import model_loading, pet

    job = train_job(
        tmp_path, pet_config={**LORA, "use_dora": True, "use_rslora": True, "init_lora_weights": "olora"}
    )
    plan = pet.plan_pet(job.spec, model_loading.resolve_precision("fp32"))
    assert plan.description == (
        "lora (rank 4, alpha 16, target_modules q_proj,v_proj, DoRA, rsLoRA, init olora)"
    )
