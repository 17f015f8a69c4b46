"""``method: dpo``: TRL's ``DPOTrainer`` on the same model, arguments and callbacks as SFT.

:func:`run_training` (train.py) loads the model and tokenizer and applies ``pet_config`` exactly as
for SFT; this recipe gives the rest:

- data (:meth:`DPORecipe.build_data`): ``datasets_build.preference_data``, prompt/chosen/rejected text
  rendered with the chat template and system prompt (TRL tokenizes it); ``dataset.mix`` is refused;
- arguments (:meth:`DPORecipe.training_arguments`): TRL's ``DPOConfig`` (a ``TrainingArguments``
  subclass) built from the keyword arguments train.py makes of ``spec.training`` (checkpoint cadence,
  precision, optimizer, schedule, ...; transformers' defaults where DPOConfig has others) plus the
  DPO fields of :func:`dpo_fields`: ``beta = training.dpo_beta``, ``loss_type`` sigmoid/ipo/hinge
  and, with ``training.dpo_sft_weight > 0``, an added ``sft`` term (TRL's list ``loss_type`` with
  ``loss_weights [1, dpo_sft_weight]``), ``max_length = training.seq_length``;
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
:func:`without_reference_adapter` (the recipe's ``model_to_export``) removes it so ``final/adapter``
holds only the trained adapter.

TRL behaviours worth knowing: a pair whose prompt alone fills ``seq_length`` is dropped
(``DataStats.no_trainable`` counts them); replies that do not end with the tokenizer's EOS get it
appended; on a quantized (QLoRA) base TRL keeps the trainable adapter in bf16.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import Recipe, TrainerSetup, arguments

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.formats import Example
    from kubetune_trainer.pet import PetPlan

log = logging.getLogger("kubetune.dpo")

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the starting adapter


class DPORecipe(Recipe):
    method: ClassVar[str] = "dpo"

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        from kubetune_trainer import datasets_build as db
        from kubetune_trainer.data_sources import DataError

        ctx = db.data_context(job, tokenizer, seed=seed, device_type=device_type)
        train_ex, eval_ex = db.read_main(ctx)
        if ctx.ds.mix:
            raise DataError(f"dataset.mix is not supported with method {self.method}")
        return db.preference_data(ctx, train_ex, eval_ex)

    def preview(self, job: Any, tokenizer: Any, n: int) -> list[tuple[Example, Any]]:
        from kubetune_trainer import datasets_build as db

        ctx = db.data_context(job, tokenizer, seed=job.spec.training.seed)
        return [(ex, ctx.renderer.preference_row(ex)) for ex in db.first_examples(ctx, n)]

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        from trl import DPOConfig

        return arguments(DPOConfig, {**kwargs, **dpo_fields(spec)})

    def make_trainer(self, setup: TrainerSetup) -> Any:
        return build_dpo_trainer(
            setup.spec, model=setup.model, tokenizer=setup.tokenizer, data=setup.data, args=setup.args,
            plan=setup.plan, callbacks=setup.callbacks, load_reference=setup.load_base,
        )  # fmt: skip

    def model_to_export(self, model: Any) -> Any:
        return without_reference_adapter(model)


def dpo_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The DPOConfig fields that come from ``spec.training`` (the rest is every method's arguments)."""
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

    `args`: the ``DPOConfig`` of :meth:`DPORecipe.training_arguments` (train.training_arguments for a
    dpo spec). `load_reference`: loads the base again (full/freeze only; LoRA/QLoRA never load a
    second copy).
    """
    from trl import DPOConfig, DPOTrainer

    from kubetune_trainer.trainer_class import kubetune_trainer

    _quiet_dataset_bars()
    if data.method != RECIPE.method:
        raise JobError(f"the DPO trainer needs preference data, got data built for method {data.method}")
    if data.streaming:
        raise JobError(f"dataset.streaming is not supported with method {RECIPE.method}")
    if not isinstance(args, DPOConfig):
        raise TypeError(
            f"build_dpo_trainer needs a DPOConfig (train.training_arguments), got {type(args).__name__}"
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
        args=args,
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


RECIPE = DPORecipe()

__all__ = [
    "RECIPE", "REFERENCE_ADAPTER", "DPORecipe", "build_dpo_trainer", "dpo_fields", "freeze_reference",
    "without_reference_adapter",
]  # fmt: skip
