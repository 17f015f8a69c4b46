"""training's kernel and memory switches reach the model and the Trainer: NEFTune noises the embeddings
in training steps only, attn_implementation is what the loaded model attends with, optimizer auto is
fused AdamW on CUDA; flash and flex attention, Liger and activation offloading are refused in one line
on a machine without what they need (this one: no CUDA, no flash-attn, no liger-kernel) and reach the
TrainingArguments where they can run; packed rows train padding-free under flash attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.conventions import EXIT_USER_ERROR
from kubetune_trainer.model_loading import Precision
from tests.fixtures_cli import cli_env, kubetune
from tests.fixtures_train import write_job_file

CUDA_FP32 = Precision("fp32", torch.float32, "cuda")  # what a GPU machine resolves, for the arguments alone


def test_optimizer_auto_is_fused_adamw_on_cuda_and_plain_adamw_on_cpu() -> None:
    from kubetune_trainer.train import optimizer_name

    assert optimizer_name("auto", "cuda") == "adamw_torch_fused"
    assert optimizer_name("auto", "cpu") == "adamw_torch"
    assert optimizer_name("adamw_torch", "cuda") == "adamw_torch"  # a named optimizer is kept
    assert optimizer_name("adamw_8bit", "cpu") == "adamw_bnb_8bit"


def test_optimizer_auto_reaches_the_training_arguments(train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer.model_loading import resolve_precision
    from kubetune_trainer.train import training_arguments

    job = train_job(tmp_path)
    assert job.spec.training.optimizer == "auto"
    on_gpu = training_arguments(job.spec, tmp_path / "c", precision=CUDA_FP32, has_eval=False)
    here = training_arguments(job.spec, tmp_path / "c", precision=resolve_precision("fp32"), has_eval=False)
    assert (on_gpu.optim.value, here.optim.value) == ("adamw_torch_fused", "adamw_torch")


class EmbeddingProbe:
    """A TrainerCallback that feeds the model's input embeddings one input in training and in eval mode
    after a training step."""

    ids = torch.tensor([[5, 17, 99, 3, 250, 7, 41, 12]])

    def __init__(self) -> None:
        self.model: Any = None
        self.train_a = self.train_b = self.evaluated = self.clean = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        if state.global_step != 2:
            return
        self.model = model
        emb = model.get_input_embeddings()
        with torch.no_grad():
            assert emb.training  # a training step just ran
            self.train_a, self.train_b = emb(self.ids), emb(self.ids)
            emb.eval()
            self.evaluated = emb(self.ids)
            emb.train()
            self.clean = torch.nn.functional.embedding(self.ids, emb.weight)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_neftune_noises_the_embeddings_in_training_steps_only(train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer.train import run_training

    alpha = 5.0
    job = train_job(
        tmp_path / "out", training={"max_steps": 3, "neftune_noise_alpha": alpha}, merge_adapter=False
    )
    probe = EmbeddingProbe()
    result = run_training(job, workdir=tmp_path / "work", callbacks=[probe])
    assert result.completed
    bound = (
        alpha / (probe.ids.shape[1] * probe.clean.shape[-1]) ** 0.5
    )  # NEFTune: uniform(-a/sqrt(Ld), a/sqrt(Ld))
    for noisy in (probe.train_a, probe.train_b):
        noise = noisy - probe.clean
        assert noise.abs().max() > bound / 2 and noise.abs().max() <= bound + 1e-6
    assert not probe.train_a.equal(probe.train_b)  # fresh noise every forward
    assert probe.evaluated.equal(probe.clean)  # eval mode: none
    emb = probe.model.get_input_embeddings().train()
    with torch.no_grad():  # the Trainer removes its hook when training ends: the model is exported clean
        assert emb(probe.ids).equal(torch.nn.functional.embedding(probe.ids, emb.weight))


def test_without_neftune_training_embeddings_are_clean(train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer.train import training_arguments

    job = train_job(tmp_path)
    args = training_arguments(job.spec, tmp_path / "c", precision=CUDA_FP32, has_eval=False)
    assert args.neftune_noise_alpha is None


@pytest.mark.parametrize(
    "name,loaded",
    [("auto", "sdpa"), ("sdpa", "sdpa"), ("eager", "eager"), ("flex_attention", "flex_attention")],
)
def test_attn_implementation_is_what_the_loaded_model_attends_with(
    name: str, loaded: str, tiny_model_dirs: Any, train_job: Any, tmp_path: Path
) -> None:
    from kubetune_trainer import model_loading

    job = train_job(tmp_path, training={"attn_implementation": name})
    model = model_loading.load_model(
        tiny_model_dirs["qwen2"], job.spec, model_loading.resolve_precision("fp32")
    )
    assert model.config._attn_implementation == loaded


@pytest.mark.parametrize("name", ["auto", "sdpa", "eager"])
def test_this_machine_trains_with_sdpa_and_eager(name: str, train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer import model_loading, switches

    job = train_job(tmp_path, training={"attn_implementation": name})
    switches.check_switches(job.spec, model_loading.resolve_precision("fp32"))


# (training fields, the one line kubetune run prints on this machine)
REFUSED_HERE = [
    (
        {"attn_implementation": "flash_attention_2", "precision": "bf16"},
        "training.attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package: this machine "
        "has no CUDA GPU (it trains on cpu); the flash-attn package is not installed (pip install flash-attn); "
        "use sdpa",
    ),
    (
        {"attn_implementation": "flex_attention"},
        "training.attn_implementation flex_attention trains on CUDA GPUs only (torch's FlexAttention has no "
        "backward pass on cpu); use sdpa",
    ),
    (
        {"liger_kernel": True},
        "training.liger_kernel needs a CUDA GPU and the liger-kernel package: this machine has no CUDA GPU for "
        "its Triton kernels (it trains on cpu); the liger-kernel package is not installed (pip install "
        "liger-kernel); set it to false",
    ),
    (
        {"gradient_checkpointing": "offload"},
        "training.gradient_checkpointing offload moves saved activations from the GPU to host memory; this "
        "machine trains on cpu, where they are in host memory already: use true",
    ),
]


@pytest.mark.parametrize(
    "training,line", REFUSED_HERE, ids=["flash-attention", "flex-attention", "liger", "offload"]
)
def test_kubetune_run_refuses_what_this_machine_cannot_run_in_one_line(
    training: dict[str, Any], line: str, train_job: Any, tmp_path: Path
) -> None:
    job = train_job(tmp_path / "out", training=training)
    path = write_job_file(job, tmp_path / "job.yaml")
    proc = kubetune("run", str(path), cwd=tmp_path, env=cli_env(tmp_path, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"kubetune run: error: {line}"]
    assert not (tmp_path / "out" / "final").exists()


def test_the_trainer_refuses_them_too_before_loading_anything(train_job: Any, tmp_path: Path) -> None:
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.train import run_training

    job = train_job(tmp_path / "out", training=REFUSED_HERE[2][0])
    with pytest.raises(JobError) as e:
        run_training(job, workdir=tmp_path / "work")
    assert str(e.value) == REFUSED_HERE[2][1]


def test_flash_attention_in_fp32_is_refused_where_it_could_run(
    train_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils

    from kubetune_trainer import switches
    from kubetune_trainer.errors import JobError

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    job = train_job(tmp_path, training={"attn_implementation": "flash_attention_2"})
    with pytest.raises(
        JobError, match=r"^training.attn_implementation flash_attention_2 runs in bf16 or fp16 only"
    ):
        switches.check_switches(job.spec, CUDA_FP32)


def test_liger_offload_and_neftune_reach_the_training_arguments_where_they_can_run(
    train_job: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils

    from kubetune_trainer import switches
    from kubetune_trainer.train import training_arguments

    # a GPU machine with liger-kernel: only the availability is stood in, to see what the Trainer is given
    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: True)
    job = train_job(
        tmp_path,
        training={"liger_kernel": True, "gradient_checkpointing": "offload", "neftune_noise_alpha": 8.0},
    )
    switches.check_switches(job.spec, CUDA_FP32)
    args = training_arguments(job.spec, tmp_path / "c", precision=CUDA_FP32, has_eval=False)
    assert args.use_liger_kernel is True
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False, "offload": True}
    assert args.neftune_noise_alpha == 8.0
    plain = training_arguments(train_job(tmp_path).spec, tmp_path / "c", precision=CUDA_FP32, has_eval=False)
    assert (plain.use_liger_kernel, plain.activation_checkpointing) == (False, False)


@pytest.fixture(scope="module")
def packed(tiny_model_dirs: Any, train_job: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(job, tokenized packed data) of the memo rows, with flash attention asked for."""
    from kubetune_trainer import model_loading, recipes

    tmp = tmp_path_factory.mktemp("packed")
    job = train_job(
        tmp, training={"packing": True, "attn_implementation": "flash_attention_2", "seq_length": 64}
    )
    tok = model_loading.load_tokenizer(job.spec, tiny_model_dirs["qwen2"])
    data = recipes.get("sft").build_data(job, tok, seed=job.spec.training.seed)
    assert data.packed and len(data.train_dataset) >= 2
    return job, data


def test_flash_attention_with_packing_trains_padding_free(
    packed: tuple[Any, Any], train_job: Any, tmp_path: Path
) -> None:
    from kubetune_trainer.packing import DataCollator, PaddingFreeCollator
    from kubetune_trainer.train import padding_free

    job, data = packed
    chosen = padding_free(data, job.spec).data_collator
    assert isinstance(chosen, PaddingFreeCollator)
    sdpa = train_job(tmp_path, training={"packing": True, "attn_implementation": "sdpa"})
    assert isinstance(padding_free(data, sdpa.spec).data_collator, DataCollator)  # padded, as before

    rows = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    batch = chosen(rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (1, tokens) and "attention_mask" not in batch  # no padding at all
    assert batch["input_ids"][0].tolist() == [t for r in rows for t in r["input_ids"]]
    assert batch["labels"][0].tolist() == [t for r in rows for t in r["labels"]]
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in r["position_ids"]]  # per sample


def test_the_padding_free_batch_has_the_loss_of_the_padded_one(
    packed: tuple[Any, Any], tiny_model_dirs: Any
) -> None:
    """Under sdpa (which reads the same position ids) the flattened batch computes exactly what the padded
    batch computes: no sample sees another."""
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.packing import DataCollator, PaddingFreeCollator

    _, data = packed
    rows = [data.train_dataset[i] for i in range(len(data.train_dataset))]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["qwen2"], dtype=torch.float32).eval()
    padded = DataCollator(pad_token_id=0, pad_to_multiple_of=8)(rows)
    with torch.no_grad():
        want = model(
            **padded, use_cache=False
        ).loss  # no cache: as in training, the position ids set the mask
        got = model(**PaddingFreeCollator()(rows), use_cache=False).loss
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
