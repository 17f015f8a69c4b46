"""`training.precision: auto` trains in bf16 where the hardware runs it natively, and bf16 training
follows the fp32 loss curve.

Tolerance: at every one of 30 steps the bf16 loss is within 0.02 + 2% of the fp32 loss (measured on
this tiny model: at most 0.008 apart, full fine-tuning and LoRA alike).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.model_loading import NATIVE_BF16_CPU_FLAGS, cpu_has_native_bf16, resolve_precision

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert cpu_has_native_bf16(CPUINFO.format(extra="amx_bf16 amx_tile"))
    assert cpu_has_native_bf16(CPUINFO.format(extra="avx512_bf16"))
    assert not cpu_has_native_bf16(CPUINFO.format(extra="avx512_vnni"))
    assert not cpu_has_native_bf16("processor\t: 0\n")


def test_auto_is_bf16_on_this_cpu_exactly_where_it_has_native_bf16(tmp_path: Path) -> None:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.train import training_arguments

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    native = any(f in flags for f in NATIVE_BF16_CPU_FLAGS)
    precision = resolve_precision("auto", "cpu")
    assert precision.name == ("bf16" if native else "fp32")
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": "/m"}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}}
    )
    args = training_arguments(spec, tmp_path, precision=precision, has_eval=False)
    assert args.bf16 is native and args.use_cpu


@pytest.mark.parametrize("pet_type", ["full", "lora"])
def test_bf16_loss_curve_matches_fp32(train_job: Any, tmp_path: Path, pet_type: str) -> None:
    from kubetune_trainer.train import run_training

    lr = 3e-3 if pet_type == "full" else 1e-2
    curves = {}
    for precision in ("fp32", "bf16"):
        job = train_job(
            tmp_path / precision, pet_config={"pet_type": pet_type},
            training={"precision": precision, "learning_rate": lr}, merge_adapter=False,
        )  # fmt: skip
        result = run_training(job, workdir=tmp_path / f"w-{precision}")
        curves[precision] = [h["loss"] for h in result.log_history if "loss" in h]
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 30
    assert fp32[-1] < fp32[0] - 1  # the curve moves
    for step, (a, b) in enumerate(zip(fp32, bf16, strict=True), start=1):
        assert abs(b - a) <= 0.02 + 0.02 * a, (step, a, b)
    assert max(abs(b - a) for a, b in zip(fp32, bf16, strict=True)) > 1e-4  # bf16 really ran
