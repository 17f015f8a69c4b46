"""``method: dpo``: TRL's ``DPOTrainer`` on the same model, data, arguments and callbacks as SFT.

:func:`run_training` (train.py) loads the model and tokenizer, builds the data
(:func:`datasets_build.build_datasets` gives prompt/chosen/rejected text rendered with the chat
template and system prompt) and applies ``pet_config`` exactly as for SFT; only the trainer object
differs, built here by :func:`build_dpo_trainer`:

- arguments: the ``TrainingArguments`` train.py builds from ``spec.training`` (checkpoint cadence,
  precision, optimizer, schedule, ...) rebuilt as TRL's ``DPOConfig`` (a ``TrainingArguments``
  subclass) plus the DPO fields of :func:`dpo_fields`: ``beta = training.dpo_beta``, ``loss_type``
  sigmoid/ipo/hinge and, with ``training.dpo_sft_weight > 0``, an added ``sft`` term (TRL's list
  ``loss_type`` with ``loss_weights [1, dpo_sft_weight]``), ``max_length = training.seq_length``;
- the reference model: with LoRA/QLoRA none is loaded. TRL keeps a frozen copy of the adapter as
  it was at the start (a few MB; the base weights are shared) and computes the reference with it,
  so the reference is the base (a fresh adapter changes nothing before training) or, with
  ``model.adapter_uri``, the base plus the SFT adapter -- the SFT model, as DPO intends. With
  full/freeze fine-tuning the base is loaded a second time through the same loader, frozen
  (no gradients, eval mode) and never handed to the optimizer;
- callbacks: the same list (reporting, checkpoint sync, SIGTERM save, progress.json):
  ``DPOTrainer`` is a transformers ``Trainer``, so saving, resuming and stopping work unchanged.

TRL logs ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` and ``rewards/accuracies``
(and ``logps/*``) with every loss; they go to metrics.jsonl like every logged value, and the
resilience callback puts them in progress.json (``rewards``). Dropout is off while training DPO
(TRL's default), so the policy and its reference are scored alike.

Checkpoints hold the reference adapter too (``ref/``, a few MB); a resumed run rebuilds it from the
starting adapter, which is what it holds, so a resume is exact. Before the export,
:func:`without_reference_adapter` removes it so ``final/adapter`` holds only the trained adapter.

TRL behaviours worth knowing: a pair whose prompt alone fills ``seq_length`` is dropped
(``DataStats.no_trainable`` counts them); replies that do not end with the tokenizer's EOS get it
appended; on a quantized (QLoRA) base TRL keeps the trainable adapter in bf16.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kubetune_trainer.errors import JobError

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.pet import PetPlan

log = logging.getLogger("kubetune.dpo")

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the starting adapter


def dpo_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The DPOConfig fields that come from ``spec.training`` (the rest is the SFT arguments)."""
    t = spec.training
    loss_type = [t.dpo_loss_type]
    weights = [1.0]
    if t.dpo_sft_weight > 0:
        loss_type.append("sft")
        weights.append(t.dpo_sft_weight)
    return {
        "beta": t.dpo_beta,
        "loss_type": loss_type,
        "loss_weights": weights,
        "max_length": t.seq_length,
        "truncation_mode": "keep_start",
        "precompute_ref_log_probs": False,
    }


def dpo_config(training_args: Any, spec: FineTuneJobSpec) -> Any:
    """``training_args`` (built by train.training_arguments) as a ``DPOConfig`` with the DPO fields.

    Rebuilt from the init fields of ``TrainingArguments``, which transformers supports (its
    ``__post_init__`` accepts its own resolved values); DPOConfig's different defaults (e.g.
    gradient checkpointing on) never apply because every TrainingArguments field is passed.
    """
    from transformers import TrainingArguments
    from trl import DPOConfig

    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return DPOConfig(**values, **dpo_fields(spec))


def freeze_reference(model: Any) -> Any:
    """No gradients and eval mode: the reference is only ever read."""
    model.requires_grad_(False)
    model.eval()
    return model


def build_dpo_trainer(
    spec: FineTuneJobSpec,
    *,
    model: Any,
    tokenizer: Any,
    data: BuiltData,
    args: Any,
    plan: PetPlan,
    callbacks: Sequence[Any] = (),
    load_reference: Callable[[], Any] | None = None,
) -> Any:
    """A ``DPOTrainer`` for a model that ``pet.apply_pet`` prepared.

    `args`: the TrainingArguments train.py built (rebuilt here as a DPOConfig). `load_reference`:
    loads the base again (full/freeze only; LoRA/QLoRA never load a second copy).
    """
    from trl import DPOTrainer

    from kubetune_trainer.trainer_class import kubetune_trainer

    _quiet_dataset_bars()
    if data.method != "dpo":
        raise JobError(f"the DPO trainer needs preference data, got data built for method {data.method}")
    if data.streaming:
        raise JobError("dataset.streaming is not supported with method dpo")
    if spec.training.packing:
        log.warning(
            "training.packing is not used by method dpo: every pair is scored on its own, padded per batch"
        )
    if plan.uses_adapter:
        _check_no_adapter_on_output_head(model, spec)
    ref_model = None
    if not plan.uses_adapter:
        if load_reference is None:
            raise JobError(f"method dpo with pet_type {plan.pet_type} needs a reference model loader")
        ref_model = freeze_reference(load_reference())
    trainer = kubetune_trainer(DPOTrainer)(
        model=model,
        ref_model=ref_model,
        args=dpo_config(args, spec),
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    if plan.uses_adapter:
        adapters = sorted(getattr(trainer.model, "peft_config", {}))
        log.info("dpo reference: the starting adapter, frozen (adapters %s); base weights shared", adapters)
    else:
        log.info("dpo reference: a frozen copy of %s", spec.model.uri)
    return trainer


def _check_no_adapter_on_output_head(model: Any, spec: FineTuneJobSpec) -> None:
    """TRL scores DPO from ``lm_head.weight`` directly, so LoRA on the output head would never train;
    say so in one line instead of TRL's ValueError."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "lora_A"):
        return
    if spec.model.adapter_uri:
        raise JobError(
            f"spec.model.adapter_uri: {spec.model.adapter_uri} has a LoRA adapter on the output head (lm_head), "
            "which method dpo cannot train; use that run's final/merged model as spec.model.uri instead"
        )
    raise JobError(
        "spec.pet_config.target_modules: method dpo cannot train a LoRA adapter on the output head "
        "(lm_head); leave it out (e.g. all-linear or '.*_proj')"
    )


def without_reference_adapter(model: Any) -> Any:
    """Remove TRL's frozen reference adapter (if any) so exports hold only the trained adapter."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and REFERENCE_ADAPTER in peft_config and len(peft_config) > 1:
        model.delete_adapter(REFERENCE_ADAPTER)
    return model


def _quiet_dataset_bars() -> None:
    """TRL tokenizes with ``datasets.map``; its per-pass progress bars would fill pod logs."""
    try:
        from datasets.utils.logging import disable_progress_bar
    except ImportError:  # pragma: no cover
        return
    disable_progress_bar()


__all__ = [
    "REFERENCE_ADAPTER", "build_dpo_trainer", "dpo_config", "dpo_fields", "freeze_reference",
    "without_reference_adapter",
]  # fmt: skip
