"""``method: simpo``: SimPO, preference optimisation without a reference model, with TRL's
``CPOTrainer`` (``loss_type="simpo"``).

SimPO scores a reply by its length-normalised log-probability under the policy alone and asks the
chosen reply to beat the rejected one by a target margin: ``-logsigmoid(beta * (avg logp(chosen) -
avg logp(rejected)) - gamma)``. Nothing but the trained model is held: no reference model, no
reference adapter, so LoRA, QLoRA, freeze and full fine-tuning train one copy of the weights.

- data: DPO's (``datasets_build.preference_data``: prompt/chosen/rejected text rendered with the
  chat template and system prompt; TRL tokenizes it and cuts the replies to fit ``seq_length``);
  ``dataset.mix`` is refused. A pair whose prompt alone fills ``seq_length`` is dropped, as DPO
  drops it (``DataStats.no_trainable`` counts them): CPOTrainer would keep the whole prompt and
  empty replies, whose mean log-probability is 0/0, a NaN loss;
- arguments: TRL's ``CPOConfig`` built from every method's keyword arguments (transformers'
  defaults where CPOConfig has others) plus ``beta = training.simpo_beta``, ``simpo_gamma =
  training.simpo_gamma`` and ``cpo_alpha = training.cpo_alpha`` (0: pure SimPO; above 0 adds CPO's
  SFT term on the chosen replies), ``max_length = training.seq_length``;
- metrics: TRL logs ``rewards/chosen``, ``rewards/rejected`` (beta times the mean log-probability
  per token), ``rewards/margins`` and ``rewards/accuracies`` with every loss; they go to
  metrics.jsonl and progress.json's ``rewards`` as for DPO. Dropout is off (TRL's default).

``CPOTrainer`` lives in ``trl.experimental`` (pyproject pins ``trl<1.17`` for it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.data_sources import DataError
from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import TrainerSetup, arguments
from kubetune_trainer.recipes.dpo import DPORecipe

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData


class SimPORecipe(DPORecipe):
    """DPO's data and preview; TRL's CPOTrainer with the SimPO loss, no reference model."""

    method: ClassVar[str] = "simpo"

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        data = super().build_data(job, tokenizer, seed=seed, device_type=device_type)
        limit = job.spec.training.seq_length

        def room_for_a_reply(batch: dict[str, list[Any]]) -> list[bool]:
            return [len(ids) < limit for ids in tokenizer(batch["prompt"])["input_ids"]]

        train = data.train_dataset.filter(room_for_a_reply, batched=True)
        if len(train) == 0:
            raise DataError(
                f"{job.spec.dataset.uri}: every pair's prompt alone fills seq_length {limit}; raise "
                "training.seq_length"
            )
        evald = data.eval_dataset
        if evald is not None:
            evald = evald.filter(room_for_a_reply, batched=True)
        return dataclasses.replace(data, train_dataset=train, eval_dataset=evald if evald else None)

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        return arguments(_cpo().CPOConfig, {**kwargs, **simpo_fields(spec)})

    def make_trainer(self, setup: TrainerSetup) -> Any:
        from kubetune_trainer.recipes.dpo import _quiet_dataset_bars
        from kubetune_trainer.trainer_class import kubetune_trainer

        if setup.data.method != self.method:
            raise JobError(
                f"the SimPO trainer needs preference data, got data built for method {setup.data.method}"
            )
        _quiet_dataset_bars()
        return kubetune_trainer(_cpo().CPOTrainer)(
            model=setup.model,
            args=setup.args,
            train_dataset=setup.data.train_dataset,
            eval_dataset=setup.data.eval_dataset,
            processing_class=setup.tokenizer,
            callbacks=list(setup.callbacks),
        )

    def model_to_export(self, model: Any) -> Any:
        return model  # no reference adapter to drop


def _cpo() -> Any:
    """``trl.experimental.cpo``, without the warning every import of trl.experimental prints (the
    version is pinned for it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
        from trl.experimental import cpo
    return cpo


def simpo_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The CPOConfig fields that come from ``spec.training`` (the rest is every method's arguments)."""
    t = spec.training
    return {
        "loss_type": "simpo",
        "beta": t.simpo_beta,
        "simpo_gamma": t.simpo_gamma,
        "cpo_alpha": t.cpo_alpha,
        "max_length": t.seq_length,
    }


RECIPE = SimPORecipe()

__all__ = ["RECIPE", "SimPORecipe", "simpo_fields"]
