"""Each fine-tuning method trains the tiny model for real, and every export loads and generates.

The runs (30 steps on 4 memorisable rows, tests.fixtures_train) are shared between the loss tests
and the export tests of the same case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.errors import JobError
from tests.fixtures_train import MEMO_ROWS, METHOD_CASES

# bitsandbytes' CPU inference kernel has no autograd: seeing this warning means a 4-bit layer ran
# training steps through it and the loss is wrong (ENVIRONMENT.md). Any test here fails on it.
pytestmark = pytest.mark.filterwarnings("error:.*autograd kernel was not registered")


def _prompt_ids(tokenizer: Any, row: dict[str, str]) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": row["instruction"]}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_loss_falls(trained: Any, case: str) -> None:
    job, result = trained(case)
    assert result.completed and result.global_step == 30
    assert result.last_loss < 0.95 * result.first_loss, (result.first_loss, result.last_loss)
    if case == "full":
        assert result.trainable_params == result.total_params
        assert result.last_loss < 2.0  # memorised
    else:
        assert 0 < result.trainable_params < result.total_params
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_logs] == list(range(1, 31))
    assert all(m["tokens_per_second"] > 0 for m in train_logs[1:])
    if case.startswith("qlora"):
        assert [m["step"] for m in metrics if "eval_loss" in m] == [10, 20, 30]
    assert (result.output_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qlora_4bit_counts_the_parameters_its_weights_stand_for(trained: Any) -> None:
    _, lora = trained("lora-all-linear")
    _, qlora = trained("qlora-4bit-nf4")
    assert qlora.total_params == lora.total_params
    assert qlora.trainable_params == lora.trainable_params


@pytest.mark.parametrize("case", ["lora-all-linear", "qlora-4bit-nf4", "qlora-8bit"])
def test_adapter_and_merged_exports_agree_and_generate(trained: Any, case: str, tiny_model_dirs: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.pet import keep_4bit_layers_trainable, quantization_config

    job, result = trained(case)
    adapter, merged_dir = result.exported["adapter"], result.exported["merged"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert "model.safetensors" in {p.name for p in merged_dir.iterdir()}
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())

    base_dir = tiny_model_dirs["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = _prompt_ids(tokenizer, MEMO_ROWS[0])
    qconfig = None
    if case.startswith("qlora"):  # base + adapter as trained: the base quantized the same way
        qconfig = quantization_config(job.spec, resolve_precision("fp32"))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=qconfig)
    keep_4bit_layers_trainable(base)  # the same 4-bit kernels as in training
    base_logits = _logits(base, ids)
    with_adapter = _logits(PeftModel.from_pretrained(base, str(adapter)).eval(), ids)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_logits = _logits(merged, ids)

    assert (with_adapter - base_logits).abs().max() > 0.05  # the adapter learned something
    tol = 1e-4 if case.startswith("lora") else 2e-2  # 8-bit matmuls round activations
    assert torch.allclose(merged_logits, with_adapter, atol=tol), (merged_logits - with_adapter).abs().max()

    out = merged.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_full_fine_tune_exports_a_model_that_answers_from_memory(trained: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = trained("full")
    assert "adapter" not in result.exported
    merged = result.exported["merged"]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = _prompt_ids(tokenizer, MEMO_ROWS[0])
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip().startswith("Paris"), answer
    # generation stops at the reply's end token (<|im_end|>) instead of running to max_new_tokens
    assert out[0, -1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_freeze_changes_only_the_last_layers(trained: Any, tiny_model_dirs: Any) -> None:
    from safetensors.torch import load_file

    _, result = trained("freeze")
    before = load_file(Path(tiny_model_dirs["qwen2"]) / "model.safetensors")
    after = load_file(result.exported["merged"] / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), sorted(changed)
    assert result.trainable_params == sum(
        v.numel() for k, v in before.items() if k.startswith("model.layers.1.")
    )


def test_freeze_named_modules(train_job: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.pet import PetPlan, apply_pet

    job = train_job(
        tmp_path,
        pet_config={"pet_type": "freeze", "freeze_trainable_modules": ["lm_head", r"model\.layers\.0\.mlp"]},
    )
    model = AutoModelForCausalLM.from_pretrained(job.spec.model.uri)
    apply_pet(model, job.spec, PetPlan("freeze", ""))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "lm_head.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    bad = train_job(
        tmp_path, pet_config={"pet_type": "freeze", "freeze_trainable_modules": ["no_such_module"]}
    )
    with pytest.raises(JobError, match=r"freeze_trainable_modules: 'no_such_module' match no module"):
        apply_pet(model, bad.spec, PetPlan("freeze", ""))


def test_lora_target_modules_that_match_nothing_name_the_field(train_job: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.pet import PetPlan, apply_pet

    job = train_job(tmp_path, pet_config={"pet_type": "lora", "target_modules": ".*wq|.*wv"})
    model = AutoModelForCausalLM.from_pretrained(job.spec.model.uri)
    with pytest.raises(JobError, match=r"spec.pet_config.target_modules '\.\*wq\|\.\*wv'.*q_proj"):
        apply_pet(model, job.spec, PetPlan("lora", ""))


# target_modules regexes, hostile ones included: (case id, regex, module suffixes that get adapters or
# the error). Python's backtracking re (what peft uses) never returns on the nested-star patterns.
TARGET_REGEXES = [
    ("the-readme-regex", ".*q_proj|.*v_proj", {"q_proj", "v_proj"}),
    ("nested-stars-that-match", "(.*.*)*q_proj", {"q_proj"}),
    ("nested-stars-that-match-nothing", "(.*.*)*q_projX", "matches no module of this model"),
    ("doubled-dot-alternation", "(.|.)*_projX", "matches no module of this model"),
]


@pytest.mark.parametrize("case,regex,expected", TARGET_REGEXES, ids=[c[0] for c in TARGET_REGEXES])
def test_lora_target_regexes_match_in_linear_time(
    train_job: Any, tmp_path: Path, case: str, regex: str, expected: Any
) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.pet import PetPlan, apply_pet

    job = train_job(tmp_path, pet_config={"pet_type": "lora", "target_modules": regex})
    model = AutoModelForCausalLM.from_pretrained(job.spec.model.uri)
    if isinstance(expected, str):
        with pytest.raises(
            JobError, match=rf"^spec.pet_config.target_modules '{re.escape(regex)}': {expected}"
        ):
            apply_pet(model, job.spec, PetPlan("lora", ""))
        return
    peft_model = apply_pet(model, job.spec, PetPlan("lora", ""))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == expected


def test_a_target_name_that_is_also_a_suffix_stays_exact() -> None:
    import torch

    from kubetune_trainer.pet import resolve_target_modules

    model = torch.nn.Module()
    model.proj = torch.nn.Linear(2, 2)
    model.block = torch.nn.Module()
    model.block.proj = torch.nn.Linear(2, 2)
    # peft would read a list entry "proj" as "any module ending in proj": block.proj too
    assert resolve_target_modules(model, "proj") == "proj"
    assert resolve_target_modules(model, ".*proj") == ["proj", "block.proj"]
    assert resolve_target_modules(model, ["proj"]) == ["proj"]


def test_freeze_patterns_match_in_linear_time(train_job: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.pet import PetPlan, apply_pet

    job = train_job(tmp_path, pet_config={"pet_type": "freeze", "freeze_trainable_modules": ["(.*.*)*normX"]})
    model = AutoModelForCausalLM.from_pretrained(job.spec.model.uri)
    with pytest.raises(JobError, match=r"freeze_trainable_modules: '\(\.\*\.\*\)\*normX' match no module"):
        apply_pet(model, job.spec, PetPlan("freeze", ""))


def test_qlora_without_a_working_bitsandbytes_backend_stops_with_one_line(
    train_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes as bnb

    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.pet import plan_pet

    def no_backend(self: Any, x: Any) -> Any:
        raise NotImplementedError("no kernel for device cpu\nregistered: cuda")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_backend)
    job = train_job(tmp_path, pet_config=METHOD_CASES["qlora-4bit-nf4"])
    with pytest.raises(JobError) as err:
        plan_pet(job.spec, resolve_precision("fp32"))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(
        "spec.pet_config.pet_type qlora (4-bit nf4, double quant) cannot run on this machine (cpu)"
    )
    assert "no kernel for device cpu" in msg and "use pet_type lora" in msg
