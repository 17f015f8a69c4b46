"""``method: reward``: a reward model, trained on preference pairs with TRL's ``RewardTrainer``.

The base loads as a sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels 1``: the recipe's :attr:`RewardRecipe.head`), whose score head is new and starts
random (seeded by ``training.seed``). The loss is Bradley-Terry: ``-logsigmoid(r(chosen) -
r(rejected))``, plus ``training.reward_center_coefficient * mean(r^2)`` when set (rewards pulled
toward mean zero).

- data: DPO's (``datasets_build.preference_data``: prompt/chosen/rejected text rendered with the
  chat template and system prompt); TRL scores prompt + reply as one sequence, after the tokenizer's
  EOS, at the last non-padding token. A pair with a side longer than ``seq_length`` is dropped by
  TRL (not truncated: a cut reply would be scored on text it lacks);
- pet_config: full and freeze train the score head with the rest (freeze: the head and the chosen
  layers); LoRA and QLoRA are peft adapters of task type ``SEQ_CLS`` with the score head trained
  in full beside them (``modules_to_save``), so ``final/adapter`` holds the head too;
- arguments: TRL's ``RewardConfig`` built from every method's keyword arguments (transformers'
  defaults where RewardConfig has others) plus ``max_length = training.seq_length`` and
  ``center_rewards_coefficient``; dropout is off (TRL's default);
- metrics: TRL logs ``accuracy`` (the share of pairs whose chosen reply scores higher), ``margin``
  (mean ``r(chosen) - r(rejected)``) and ``min_reward`` / ``mean_reward`` / ``max_reward`` with every
  loss, and ``eval_accuracy`` / ``eval_margin`` on the held-out pairs (``dataset.validation_split``):
  all go to metrics.jsonl, and progress.json's ``metrics`` keeps the newest of the method's
  ``progress_metrics``;
- export: ``final/merged`` (full, freeze, or LoRA merged) loads with
  ``AutoModelForSequenceClassification`` and scores as the trained model did; the exported
  tokenizer records the chat template the pairs were rendered with, so scoring a conversation with
  ``tokenizer.apply_chat_template`` renders it as in training.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.data_sources import DataError
from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import ModelHead, TrainerSetup, arguments
from kubetune_trainer.recipes.dpo import DPORecipe

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData

log = logging.getLogger("kubetune.reward")

# Qwen2, Llama, Mistral, Gemma ... name their sequence classification head `score`
SCORE_HEAD = "score"


class RewardRecipe(DPORecipe):
    """DPO's data and preview; a sequence classifier trained by TRL's RewardTrainer."""

    method: ClassVar[str] = "reward"
    head: ClassVar[ModelHead] = ModelHead(
        auto_class="AutoModelForSequenceClassification",
        init_kwargs={"num_labels": 1},  # one scalar reward per sequence
        peft_task_type="SEQ_CLS",
        modules_to_save=(SCORE_HEAD,),
    )

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        data = super().build_data(job, tokenizer, seed=seed, device_type=device_type)
        stats, limit = data.stats, job.spec.training.seq_length
        if stats.truncated and stats.truncated >= stats.samples:
            raise DataError(
                f"{job.spec.dataset.uri}: every pair has a side longer than seq_length {limit}, and a reward model "
                "scores whole replies; raise training.seq_length"
            )
        if stats.truncated:
            log.warning(
                "%d of %d pairs have a side longer than training.seq_length %d: TRL's reward trainer leaves them "
                "out (a cut reply would be scored on text it lacks); raise seq_length to train on them",
                stats.truncated, stats.samples, limit,
            )  # fmt: skip
        return data

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        from trl import RewardConfig

        return arguments(RewardConfig, {**kwargs, **reward_fields(spec)})

    def make_trainer(self, setup: TrainerSetup) -> Any:
        from trl import RewardTrainer

        from kubetune_trainer.recipes.dpo import _quiet_dataset_bars
        from kubetune_trainer.trainer_class import kubetune_trainer

        if setup.data.method != self.method:
            raise JobError(
                f"the reward trainer needs preference data, got data built for method {setup.data.method}"
            )
        _quiet_dataset_bars()
        trainer = kubetune_trainer(RewardTrainer)(
            model=setup.model,
            args=setup.args,
            train_dataset=setup.data.train_dataset,
            eval_dataset=setup.data.eval_dataset,
            processing_class=setup.tokenizer,
            callbacks=list(setup.callbacks),
        )
        _score_head_in_fp32(trainer.model)
        return trainer

    def model_to_export(self, model: Any) -> Any:
        return model


def _score_head_in_fp32(model: Any) -> None:
    """On a quantized (QLoRA) base TRL casts every trainable parameter to bf16: right for LoRA layers,
    which cast their input, but the score head is a plain Linear fed the hidden states in the compute
    dtype (fp32 when training in fp32). Kept in fp32 it works in both (bf16 training autocasts)."""
    import torch

    for name, p in model.named_parameters():
        if p.requires_grad and "modules_to_save" in name and p.dtype == torch.bfloat16:
            p.data = p.data.float()


def reward_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The RewardConfig fields that come from ``spec.training`` (the rest is every method's arguments)."""
    t = spec.training
    return {"max_length": t.seq_length, "center_rewards_coefficient": t.reward_center_coefficient}


RECIPE = RewardRecipe()

__all__ = ["RECIPE", "SCORE_HEAD", "RewardRecipe", "reward_fields"]
