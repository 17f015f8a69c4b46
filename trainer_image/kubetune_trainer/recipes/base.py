"""The protocol every training recipe (one per ``spec.method``) follows: :class:`Recipe`.

``train.run_training`` is generic; what differs by method is asked of the job's recipe:

1. ``build_data(job, tokenizer, *, seed, device_type) -> BuiltData``: the method's data pipeline,
   assembled from the shared pieces in ``datasets_build`` (reading, normalising, render and mask,
   packing, collators);
2. ``preview(job, tokenizer, n) -> [(Example, Encoded | {field: text})]``: the first rows as the
   method trains on them, for ``kubetune inspect-data``;
3. ``training_arguments(spec, kwargs) -> TrainingArguments``: its ``TrainingArguments`` class
   (a TRL config for TRL trainers) built directly from the keyword arguments
   ``train.training_kwargs`` makes of ``spec.training`` plus the method's own fields
   (:func:`arguments` keeps transformers' defaults where a TRL config changes them);
4. ``make_trainer(setup) -> Trainer``: a transformers ``Trainer`` (subclass) wrapped by
   ``trainer_class.kubetune_trainer``, from a :class:`TrainerSetup`;
5. ``model_to_export(model) -> model``: what ``final/`` holds (DPO drops its reference adapter);
6. ``head``, a :class:`ModelHead`: the transformers Auto class the base loads as (a causal LM, or a
   sequence classifier with a score head for a reward model), the peft task type of a LoRA adapter
   and the modules trained in full beside it.

The method's row in ``kubetune.methods.METHODS`` (formats, streaming, packing, reference model,
examples) is ``recipe.info``; a test checks the registry's methods are the table's.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune import methods as table

if TYPE_CHECKING:
    from kubetune.methods import Method
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.formats import Example
    from kubetune_trainer.pet import PetPlan


@dataclass
class TrainerSetup:
    """What a recipe's trainer is made of; ``run_training`` fills it in."""

    spec: FineTuneJobSpec
    model: Any  # loaded and prepared by pet.apply_pet (a peft model for LoRA/QLoRA)
    tokenizer: Any
    data: BuiltData  # what this recipe's build_data returned
    args: Any  # what this recipe's training_arguments returned
    plan: PetPlan
    callbacks: Sequence[Any] = field(default_factory=list)  # reporting, checkpoint sync, SIGTERM, progress
    # loads the base model again, as training loaded it (e.g. a frozen reference for full fine-tuning)
    load_base: Callable[[], Any] | None = None


@dataclass(frozen=True)
class ModelHead:
    """What the base model is loaded as, and what a LoRA adapter on it trains besides its matrices."""

    auto_class: str = "AutoModelForCausalLM"  # a transformers Auto class, given init_kwargs on loading
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_labels": 1}
    peft_task_type: str = "CAUSAL_LM"  # peft's TaskType of the adapter
    # trained in full next to LoRA and saved in the adapter (peft's modules_to_save), e.g. a new score head
    modules_to_save: tuple[str, ...] = ()

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)


CAUSAL_LM = ModelHead()


class Recipe(ABC):
    """One training method. Subclass it in ``recipes/<method>.py`` and set ``RECIPE = YourRecipe()``
    there; ``method`` names the row of ``kubetune.methods.METHODS`` it implements."""

    method: ClassVar[str]
    head: ClassVar[ModelHead] = CAUSAL_LM

    @property
    def info(self) -> Method:
        """The method's row of the core's table."""
        return table.method(self.method)

    @abstractmethod
    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        """The training (and held-out) data; DataError with a user-facing line when it is unusable."""

    @abstractmethod
    def preview(self, job: Any, tokenizer: Any, n: int) -> list[tuple[Example, Any]]:
        """The first `n` usable rows of dataset.uri rendered as trained: an ``Encoded`` (tokens with the
        loss mask) or a dict of text fields (the first, ``prompt``, untrained; the others trained)."""

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        """The method's TrainingArguments, built from ``kwargs`` (train.training_kwargs)."""
        from transformers import TrainingArguments

        return arguments(TrainingArguments, kwargs)

    def make_trainer(self, setup: TrainerSetup) -> Any:
        """transformers' Trainer with kubetune's fixes, on the built data and its collator."""
        from transformers import Trainer

        from kubetune_trainer.trainer_class import kubetune_trainer

        return kubetune_trainer(Trainer)(
            model=setup.model,
            args=setup.args,
            train_dataset=setup.data.train_dataset,
            eval_dataset=setup.data.eval_dataset,
            data_collator=setup.data.data_collator,
            processing_class=setup.tokenizer,
            callbacks=list(setup.callbacks),
        )

    def model_to_export(self, model: Any) -> Any:
        """The trained model as final/ should hold it."""
        return model


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def arguments(cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` for a ``TrainingArguments`` class, with transformers' own default for every field
    ``cls`` gives another default and ``kwargs`` leaves out: spec.training decides for every method alike
    (TRL's DPOConfig would otherwise turn gradient checkpointing on, for one)."""
    from transformers import TrainingArguments

    base = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    values = dict(kwargs)
    for f in dataclasses.fields(cls):
        ours = base.get(f.name)
        if ours is None or not f.init or f.name in values:
            continue
        if _default(f) != _default(ours):
            values[f.name] = _default(ours)
    return cls(**values)


__all__ = ["CAUSAL_LM", "ModelHead", "Recipe", "TrainerSetup", "arguments"]
