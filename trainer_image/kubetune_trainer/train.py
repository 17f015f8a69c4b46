"""One training run of a FineTuneJob, the same for every method: what differs by ``spec.method``
(the data, the TrainingArguments class, the trainer, what is exported) is asked of the method's
recipe (:mod:`kubetune_trainer.recipes`: transformers' `Trainer` for sft and pretrain, TRL's
`DPOTrainer` for dpo).

    from kubetune_trainer.train import run_training
    result = run_training(job, workdir=Path("/scratch/job"), callbacks=[MyCallback()], resume_from=None)

``run_training(job, *, workdir, callbacks=(), resume_from=None, output_dir=None, max_steps=None)``
runs in every torchrun process (rank, world size and local rank come from the environment; a plain
``python`` call is one process):

1. checks the pet_config can run here (:func:`pet.plan_pet`; a `JobError` otherwise), resolves
   and loads model + tokenizer (:mod:`model_loading`), builds the data (the recipe's
   ``build_data``), applies the pet_config (:func:`pet.apply_pet`) and logs trainable vs total
   parameters;
2. builds the recipe's `TrainingArguments` from ``spec.training`` (:func:`training_arguments`), the
   recipe's trainer, and runs ``Trainer.train(resume_from_checkpoint=resume_from)``;
3. on global rank 0, when training reached its last step, exports ``final/`` (:mod:`export`) from
   the recipe's ``model_to_export``.

Directories:

- ``workdir``: node-local scratch. The Trainer's ``output_dir`` is ``workdir/checkpoints``; it
  saves one directory per save, ``workdir/checkpoints/checkpoint-<global step>`` (model or adapter,
  optimizer, scheduler, RNG states per rank, trainer_state.json) every ``checkpoint.every_steps``
  steps, keeping the newest ``checkpoint.keep_last``. A run without ``resume_from`` starts by
  removing ``workdir/checkpoints`` (an earlier run's directories would confuse the rotation).
- output directory (:func:`local_output_dir`): ``final/``, ``metrics.jsonl``, ``loss.png``. It
  is ``output.uri`` itself for a path / ``file://`` / ``pvc://`` URI, else ``workdir/output``, which
  the caller uploads (s3://) once `run_training` returns.

Hooks for checkpoint sync, SIGTERM saves and progress.json are plain transformers
``TrainerCallback``\\s passed in ``callbacks``; they run after kubetune's own
:class:`reporting.ReportingCallback`, so in ``on_log`` the ``logs`` dict already holds
``tokens_per_second`` and ``eta_seconds``. Useful events: ``on_save`` (all ranks, right after
``args.output_dir/checkpoint-{state.global_step}`` is written), ``on_log``, ``on_step_end`` (set
``control.should_save = True`` and ``control.should_training_stop = True`` there to save and stop,
e.g. on SIGTERM), ``on_train_end``. ``resume_from`` is a local ``checkpoint-N`` directory to
continue from (the Trainer restores weights, optimizer, scheduler, RNG and the data position).

A run that stops before its last step (a callback stopped it) returns ``completed=False`` and
exports nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.conventions import CHECKPOINTS_DIR

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob, FineTuneJobSpec

log = logging.getLogger("kubetune.train")

_OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch_fused",
    "adamw_8bit": "adamw_bnb_8bit",
    "sgd": "sgd",
}


def optimizer_name(optimizer: str, device_type: str) -> str:
    """TrainingArguments.optim for `training.optimizer` on `device_type` ("cuda" | "cpu"): ``auto`` is
    torch's fused AdamW on CUDA (one kernel per step for all parameters instead of a loop of small
    ones) and the plain one on CPU, where fusing buys little."""
    if optimizer == "auto":
        optimizer = "adamw_torch_fused" if device_type == "cuda" else "adamw_torch"
    return _OPTIMIZERS[optimizer]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the torchrun gang (from RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistEnv:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    """What one `run_training` call did."""

    output_dir: Path  # final/, metrics.jsonl, loss.png (local)
    checkpoint_dir: Path  # the Trainer's output_dir: checkpoint-N/ per save
    completed: bool  # reached the last step (False: a callback stopped it early)
    global_step: int
    max_steps: int
    train_loss: float | None  # mean training loss of this session (Trainer's train_loss)
    first_loss: float | None  # first and last logged training loss (the whole curve: a resumed
    #                           Trainer restores the earlier log history from the checkpoint)
    last_loss: float | None
    eval_loss: float | None
    trainable_params: int
    total_params: int
    tokens_seen: int
    runtime_seconds: float
    exported: dict[str, Path] = field(default_factory=dict)  # {"adapter": ..., "merged": ...} (rank 0)
    log_history: list[dict] = field(default_factory=list)


def local_output_dir(spec: FineTuneJobSpec, workdir: Path) -> Path:
    """Where final/, metrics.jsonl and loss.png are written on this machine (see module docstring)."""
    from kubetune.locations import WORK_OUTPUT_DIR, local_path

    path = local_path(spec.output.uri)
    return path if path is not None else Path(workdir) / WORK_OUTPUT_DIR


def training_arguments(
    spec: FineTuneJobSpec,
    checkpoint_dir: Path,
    *,
    precision: Any,
    has_eval: bool,
    max_steps: int | None = None,
    **overrides: Any,
) -> Any:
    """The method's `TrainingArguments` (a TRL config for TRL trainers), built by its recipe from
    :func:`training_kwargs`."""
    from kubetune_trainer import recipes

    kwargs = training_kwargs(
        spec, checkpoint_dir, precision=precision, has_eval=has_eval, max_steps=max_steps, **overrides
    )
    return recipes.get(spec.method).training_arguments(spec, kwargs)


def training_kwargs(
    spec: FineTuneJobSpec,
    checkpoint_dir: Path,
    *,
    precision: Any,
    has_eval: bool,
    max_steps: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """transformers `TrainingArguments` keyword arguments for `spec.training` (+ checkpoint cadence and
    parallelism): what every method shares."""
    from kubetune_trainer.tracking import report_to

    t = spec.training
    steps = max_steps or t.max_steps
    kwargs: dict[str, Any] = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=steps if steps else -1,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(t.optimizer, precision.device_type),
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=precision.name == "bf16",
        fp16=precision.name == "fp16",
        use_cpu=precision.device_type == "cpu",
        activation_checkpointing=bool(t.gradient_checkpointing),
        # offload: transformers keeps the checkpointed layers' saved inputs in pinned host memory (save_on_cpu)
        activation_checkpointing_kwargs=(
            {"use_reentrant": False, **({"offload": True} if t.gradient_checkpointing == "offload" else {})}
            if t.gradient_checkpointing
            else None
        ),
        neftune_noise_alpha=t.neftune_noise_alpha,
        use_liger_kernel=t.liger_kernel,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        eval_strategy=("steps" if t.eval_steps else "epoch") if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=spec.checkpoint.every_steps,
        save_total_limit=spec.checkpoint.keep_last,
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,  # rows hold exactly what the collator needs
        label_names=["labels"],  # peft models hide `labels` from the Trainer's signature check
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        report_to=report_to(spec),  # spec.tracking: transformers' own callbacks (tracking.py)
        disable_tqdm=True,  # reporting.ReportingCallback draws the bar
        log_level="warning",
        log_level_replica="error",
    )
    if spec.parallel_config.strategy == "fsdp":
        # FSDP2 with sharded checkpoints, on GPUs and CPU gangs alike (see fsdp.py)
        from kubetune_trainer.fsdp import fsdp_config

        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config(activation_checkpointing=bool(t.gradient_checkpointing))
        kwargs["activation_checkpointing"] = False  # FSDP's own, without a second all-gather
    kwargs.update(overrides)
    return kwargs


def padding_free(data: Any, spec: FineTuneJobSpec) -> Any:
    """`data` with the padding-free collator where flash attention trains packed rows (its varlen kernels
    take one row of all samples); other data as it is. Streamed rows keep their fixed width: accelerate
    concatenates one batch per rank when it dispatches them."""
    if spec.training.attn_implementation != "flash_attention_2" or not data.packed or data.streaming:
        return data
    import dataclasses

    from kubetune_trainer.packing import PaddingFreeCollator

    return dataclasses.replace(data, data_collator=PaddingFreeCollator())


def run_training(
    job: FineTuneJob,
    *,
    workdir: Path,
    callbacks: Sequence[Any] = (),
    resume_from: Path | None = None,
    output_dir: Path | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train `job` in this process (see the module docstring); raises JobError / DataError for
    problems the user fixes."""
    quiet_known_noise()
    from transformers import PrinterCallback, ProgressCallback

    from kubetune_trainer import model_loading, pet, recipes, switches, tracking
    from kubetune_trainer.recipes import TrainerSetup
    from kubetune_trainer.reporting import ReportingCallback

    spec = job.spec
    recipe = recipes.get(spec.method)
    dist = DistEnv.from_env()
    workdir = Path(workdir)
    out_dir = Path(output_dir) if output_dir is not None else local_output_dir(spec, workdir)
    ckpt_dir = workdir / CHECKPOINTS_DIR
    started = time.monotonic()
    if resume_from is None and dist.local_rank == 0:
        # checkpoint-N dirs of an earlier run would mix into this run's rotation (save_total_limit)
        shutil.rmtree(ckpt_dir, ignore_errors=True)

    _use_own_gpu(dist)
    precision = model_loading.resolve_precision(spec.training.precision)
    plan = pet.plan_pet(spec, precision)
    switches.check_switches(spec, precision)
    tracking.check_installed(spec)
    model_dir = model_loading.resolve_model_dir(
        spec.model.uri, s3=spec.storage.s3, revision=spec.model.revision
    )
    adapter_dir = None
    if spec.model.adapter_uri:
        adapter_dir = model_loading.resolve_model_dir(
            spec.model.adapter_uri, s3=spec.storage.s3, field="spec.model.adapter_uri", require_config=False
        )
    tokenizer = model_loading.load_tokenizer(spec, model_dir)
    from kubetune_trainer.data_cache import cached_build_data

    # the tokenized data of an earlier start of this job, when nothing it depends on changed
    data, data_cache = cached_build_data(
        recipe, job, tokenizer, seed=spec.training.seed, device_type=precision.device_type, rank=dist.rank
    )

    data = padding_free(data, spec)

    device = f"{precision.device_type}:{dist.local_rank}" if precision.device_type == "cuda" else "cpu"
    from transformers import set_seed

    set_seed(spec.training.seed)  # a head the base lacks (a reward model's score) starts random
    model = model_loading.load_model(
        model_dir, spec, precision, quantization_config=plan.quantization_config, device=device,
        head=recipe.head,
    )  # fmt: skip
    set_seed(spec.training.seed)  # adapter init (LoRA A) is random: the same seed gives the same run
    model = pet.apply_pet(model, spec, plan, adapter_dir=adapter_dir, head=recipe.head, scratch=workdir)
    trainable, total = pet.count_parameters(model)
    if dist.is_main:
        log.info(
            "model %s: %s; trainable params %s of %s (%.2f%%); %s on %s x %d",
            spec.model.uri, plan.description, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
            precision.name, precision.device_type, dist.world_size,
        )  # fmt: skip
        log.info("data: %s", data.stats.summary())
        log.info("%s", data_cache.describe())
        if spec.training.packing and not recipe.info.packing:
            log.warning(
                "training.packing is not used by method %s: every sample is scored on its own, padded per batch",
                spec.method,
            )

    tracked = tracking.start(job, out_dir, workdir=workdir, resume_from=resume_from, is_main=dist.is_main)
    args = training_arguments(
        spec, ckpt_dir, precision=precision, has_eval=data.eval_dataset is not None, max_steps=max_steps,
        run_name=job.metadata.name,
    )  # fmt: skip
    reporter = ReportingCallback(out_dir, title=job.metadata.name)
    trainer = recipe.make_trainer(
        TrainerSetup(
            spec=spec, model=model, tokenizer=tokenizer, data=data, args=args, plan=plan,
            callbacks=[reporter, *callbacks],
            load_base=lambda: model_loading.load_model(model_dir, spec, precision, head=recipe.head),
        )
    )  # fmt: skip
    tracked.attach(trainer)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if trainer.is_fsdp_enabled and dist.is_main:
        log.info(
            "strategy fsdp: weights, gradients and optimizer state sharded over %d processes (FSDP2 on %s); "
            "checkpoints are sharded",
            dist.world_size, precision.device_type,
        )  # fmt: skip

    try:
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except Exception as e:
        from kubetune_trainer import diskspace

        # the check before each save estimates; a disk that filled anyway is still one line
        # torch.save reports a full disk as "unexpected pos ..." or "file write failed"
        if diskspace.is_disk_full(e) or (
            isinstance(e, (OSError, RuntimeError)) and diskspace.free_bytes(ckpt_dir) < 1024 * 1024
        ):
            from kubetune_trainer.errors import JobError

            free = diskspace.free_bytes(ckpt_dir)
            raise JobError(diskspace.no_space_message("saving a checkpoint", ckpt_dir, None, free)) from None
        raise
    state = trainer.state
    completed = state.global_step >= state.max_steps
    eval_loss = _last(state.log_history, "eval_loss")
    if (
        completed
        and data.eval_dataset is not None
        and not _evaluated_at(state.log_history, state.global_step)
    ):
        eval_loss = trainer.evaluate().get("eval_loss")

    exported: dict[str, Path] = {}
    full_state = None
    if completed and spec.parallel_config.strategy == "fsdp":
        # sharded weights: every rank takes part in gathering them; rank 0 writes
        full_state = trainer.accelerator.get_state_dict(trainer.model)
    if completed and trainer.is_world_process_zero():
        from kubetune_trainer.export import export_final

        final_model = recipe.model_to_export(trainer.model)
        if data.end_of_turn_token_ids:
            _add_eos_ids(final_model, data.end_of_turn_token_ids)
        exported = export_final(
            final_model, tokenizer, spec, out_dir, plan=plan, precision=precision, model_dir=model_dir,
            state_dict=full_state, head=recipe.head,
        )  # fmt: skip
        log.info(
            "wrote %s",
            ", ".join(str(p) for p in [*exported.values(), reporter.plot_path, reporter.metrics_path]),
        )
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    return TrainResult(
        output_dir=out_dir,
        checkpoint_dir=ckpt_dir,
        completed=completed,
        global_step=state.global_step,
        max_steps=state.max_steps,
        train_loss=output.training_loss,
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        eval_loss=eval_loss,
        trainable_params=trainable,
        total_params=total,
        tokens_seen=state.num_input_tokens_seen,
        runtime_seconds=time.monotonic() - started,
        exported=exported,
        log_history=list(state.log_history),
    )


def _use_own_gpu(dist: DistEnv) -> None:
    """Make cuda:LOCAL_RANK current before anything touches CUDA, so no rank opens a context on GPU 0."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())


def _last(history: list[dict], key: str) -> float | None:
    for h in reversed(history):
        if key in h:
            return h[key]
    return None


def _evaluated_at(history: list[dict], step: int) -> bool:
    return any("eval_loss" in h and h.get("step") == step for h in history)


def _add_eos_ids(model: Any, ids: list[int]) -> None:
    """Generation stops at the tokens that end a reply as the data rendered it (e.g. <|im_end|>)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    current = gen.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    merged = current + [i for i in ids if i not in current]
    gen.eos_token_id = merged[0] if len(merged) == 1 else merged


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_NOISE = _DropMessages("Failed to load CPU gemm_4bit_forward")


def quiet_known_noise() -> None:
    """Silence messages that are harmless here and would only alarm (see ENVIRONMENT.md): the
    missing optional `kernels` package of bitsandbytes, deprecation notes peft triggers inside
    transformers, and transformers' per-file progress bars."""
    import warnings

    bnb_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _NOISE not in bnb_log.filters:
        bnb_log.addFilter(_NOISE)
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    # peft on checkpoint saves when LoRA targets lm_head / embeddings: it keeps the full matrices
    warnings.filterwarnings("ignore", message=r"Setting `save_embedding_layers` to `True`")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


__all__ = [
    "DistEnv", "TrainResult", "local_output_dir", "optimizer_name", "padding_free", "run_training",
    "training_arguments", "training_kwargs",
]  # fmt: skip
