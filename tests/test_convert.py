"""`kubetune export SOURCE DEST`: an adapter merged onto its base, any committed checkpoint (FSDP
shards included) or a job output written as a Hugging Face model in safetensors.

A real tiny LoRA run (shared with tests/test_train_methods.py) gives the adapter: merged by
export, it must compute what the run's own final/merged computes. A real 2-process FSDP run
(kubetune run, gloo) gives sharded checkpoints: exported, they load with from_pretrained, and the
last one is exactly the run's final model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.convert import export, locate
from kubetune_trainer.errors import JobError
from tests.fixtures_cli import cli_env, kubetune
from tests.fixtures_train import write_job_file

SYSTEM = "You are a terse assistant."


def logits(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2, 64, 99]])
    with torch.no_grad():
        return model(ids).logits


def weights(model_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory, train_job: Any) -> Path:
    """A full fine-tune sharded by FSDP over 2 CPU processes, committed every 2 of 4 steps."""
    cwd = tmp_path_factory.mktemp("fsdp-export")
    job = train_job(
        cwd / "out", pet_config={"pet_type": "full"}, dataset={"system_prompt": SYSTEM},
        training={"max_steps": 4, "learning_rate": 1e-3}, name="fsdp-export",
    )  # fmt: skip
    path = write_job_file(
        job, cwd / "job.yaml", parallel_config={"strategy": "fsdp"}, checkpoint={"every_steps": 2}
    )
    run = kubetune("run", str(path), "--nproc-per-node", "2", "--cpu", cwd=cwd, env=cli_env(cwd), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FSDP" in run.stderr
    return cwd / "out"


def test_an_exported_adapter_computes_what_the_runs_own_merged_model_computes(
    trained: Any, tmp_path: Path
) -> None:
    job, result = trained("lora-all-linear")
    out = Path(job.spec.output.uri)
    done = kubetune("export", str(out / "final" / "adapter"), str(tmp_path / "merged"), env=cli_env(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wrote" in done.stderr and done.stdout == ""
    got, want = logits(tmp_path / "merged"), logits(out / "final" / "merged")
    assert (got - want).abs().max().item() < 1e-5
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # a plain model
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_dtype_and_shard_size_and_an_adapter_alone(trained: Any, tmp_path: Path) -> None:
    import torch

    job, _ = trained("lora-all-linear")
    adapter = Path(job.spec.output.uri) / "final" / "adapter"
    export(str(adapter), str(tmp_path / "bf16"), dtype="bf16", max_shard_size="200KB")
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {v.dtype for v in weights(tmp_path / "bf16").values()} == {torch.bfloat16}

    export(str(Path(job.spec.output.uri)), str(tmp_path / "adapter"), adapter_only=True)  # the job output
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert weights(tmp_path / "adapter").keys() == weights(adapter).keys()


def test_bad_sources_and_destinations_are_one_line_errors(trained: Any, tmp_path: Path) -> None:
    job, _ = trained("lora-all-linear")
    out = Path(job.spec.output.uri)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(JobError, match="exists and is not an empty directory"):
        export(str(out / "final" / "adapter"), str(tmp_path / "full"))
    with pytest.raises(JobError, match="no such directory"):
        export(str(tmp_path / "nothing"), str(tmp_path / "a"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(JobError, match="neither a model, an adapter, a checkpoint nor a job output"):
        export(str(tmp_path / "junk"), str(tmp_path / "b"))
    with pytest.raises(JobError, match="holds no LoRA adapter"):
        export(str(out / "final" / "merged"), str(tmp_path / "c"), adapter_only=True)
    cli = kubetune("export", str(tmp_path / "junk"), str(tmp_path / "d"), env=cli_env(tmp_path))
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and cli.stderr.startswith("kubetune: ")


def test_fsdp_checkpoints_export_to_models_that_load(fsdp_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpts = fsdp_run / "checkpoints"
    assert (ckpts / "step-00000002" / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert not list((ckpts / "step-00000002").glob("*.safetensors"))  # shards only
    for step in ("step-00000002", "step-00000004"):
        export(str(ckpts / step), str(tmp_path / step))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / step)
        assert sum(p.numel() for p in model.parameters()) > 0
    # the newest checkpoint is the finished model, weight for weight
    last, final = weights(tmp_path / "step-00000004"), weights(fsdp_run / "final" / "merged")
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in last)
    first = weights(tmp_path / "step-00000002")
    assert any(not (first[k] == last[k]).all() for k in last)  # step 2 is step 2, not the end
    # the tokenizer prompts as the job trained: ChatML with the job's system prompt
    tok = AutoTokenizer.from_pretrained(tmp_path / "step-00000002")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt
        == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_job_output_without_final_exports_its_newest_committed_checkpoint(
    fsdp_run: Path, tmp_path: Path
) -> None:
    unfinished = tmp_path / "out"
    shutil.copytree(fsdp_run, unfinished, ignore=shutil.ignore_patterns("final", "LEASE", ".LEASE.lock"))
    source = locate(str(unfinished))
    assert source.kind == "checkpoint" and source.uri.endswith("checkpoints/step-00000004")
    export(str(unfinished), str(tmp_path / "model"))
    final = weights(fsdp_run / "final" / "merged")
    assert all((weights(tmp_path / "model")[k] == final[k]).all() for k in final)


def test_a_checkpoint_in_s3_exports_into_s3(
    fsdp_run: Path, s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    s3.store("jobs/fsdp/checkpoints/step-00000004").upload_dir(fsdp_run / "checkpoints" / "step-00000004", "")
    export(s3.uri("jobs/fsdp/checkpoints/step-00000004"), s3.uri("exports/fsdp"))
    keys = s3.store("exports/fsdp").list("")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(keys)
    s3.store("exports/fsdp").download_dir("", tmp_path / "back")
    final = weights(fsdp_run / "final" / "merged")
    assert all((weights(tmp_path / "back")[k] == final[k]).all() for k in final)
    with pytest.raises(JobError, match="is not empty"):
        export(s3.uri("jobs/fsdp/checkpoints/step-00000004"), s3.uri("exports/fsdp"))
