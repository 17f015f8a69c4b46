"""``method: orpo``: TRL's ``ORPOTrainer`` (odds-ratio preference optimisation) on the same model,
arguments and callbacks as SFT and DPO.

ORPO trains a base model on preference pairs in one stage, with no reference model: an SFT loss on
the chosen reply plus ``orpo_beta`` times a log odds-ratio term that pushes the chosen reply's odds
above the rejected one's.

- data: the DPO pipeline (``datasets_build.preference_data``: prompt/chosen/rejected text rendered
  with the chat template and system prompt; TRL tokenizes it); pairs whose prompt alone fills
  ``seq_length`` are dropped here (TRL would train them on an empty reply). ``dataset.mix`` is refused;
- arguments: ``ORPOConfig`` (``trl.experimental.orpo``, hence the pin ``trl<1.17``) built from every
  method's keyword arguments plus ``beta = training.orpo_beta`` and ``max_length = training.seq_length``;
- no reference model is loaded, for any pet_type; ``final/`` holds the trained model or adapter.

TRL logs ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies`` (to
progress.json's ``rewards``) and ``log_odds_ratio``, ``log_odds_chosen``, ``nll_loss`` (to its
``metrics``, the table's ``progress_metrics``) with every loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.recipes.base import Recipe, TrainerSetup, arguments

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.formats import Example


def _with_reply_room(dataset: Any, tokenizer: Any, seq_length: int) -> Any:
    """The pairs whose prompt leaves room for a reply within seq_length."""
    if dataset is None:
        return None
    return dataset.filter(lambda row: len(tokenizer(row["prompt"])["input_ids"]) < seq_length)


class ORPORecipe(Recipe):
    method: ClassVar[str] = "orpo"

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        import dataclasses

        from datasets.utils.logging import disable_progress_bar

        from kubetune_trainer import datasets_build as db
        from kubetune_trainer.data_sources import DataError

        disable_progress_bar()  # datasets.map and filter bars would fill pod logs
        ctx = db.data_context(job, tokenizer, seed=seed, device_type=device_type)
        train_ex, eval_ex = db.read_main(ctx)
        if ctx.ds.mix:
            raise DataError(f"dataset.mix is not supported with method {self.method}")
        built = db.preference_data(ctx, train_ex, eval_ex)
        train = _with_reply_room(built.train_dataset, tokenizer, ctx.seq_length)
        if len(train) == 0:
            raise DataError(f"{ctx.ds.uri}: every prompt fills training.seq_length ({ctx.seq_length} tokens)")
        evald = _with_reply_room(built.eval_dataset, tokenizer, ctx.seq_length)
        built.stats.sequences = len(train)  # what training iterates (stats.no_trainable counts the rest)
        return dataclasses.replace(built, train_dataset=train, eval_dataset=evald)

    def preview(self, job: Any, tokenizer: Any, n: int) -> list[tuple[Example, Any]]:
        from kubetune_trainer import datasets_build as db

        ctx = db.data_context(job, tokenizer, seed=job.spec.training.seed)
        return [(ex, ctx.renderer.preference_row(ex)) for ex in db.first_examples(ctx, n)]

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        from trl.experimental.orpo import ORPOConfig

        return arguments(ORPOConfig, {**kwargs, **orpo_fields(spec)})

    def make_trainer(self, setup: TrainerSetup) -> Any:
        from trl.experimental.orpo import ORPOTrainer

        from kubetune_trainer.trainer_class import kubetune_trainer

        return kubetune_trainer(ORPOTrainer)(
            model=setup.model,
            args=setup.args,
            train_dataset=setup.data.train_dataset,
            eval_dataset=setup.data.eval_dataset,
            processing_class=setup.tokenizer,
            callbacks=list(setup.callbacks),
        )


def orpo_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The ORPOConfig fields that come from ``spec.training`` (the rest is every method's arguments)."""
    t = spec.training
    return {"beta": t.orpo_beta, "max_length": t.seq_length}


RECIPE = ORPORecipe()

__all__ = ["RECIPE", "ORPORecipe", "orpo_fields"]
