"""``method: kto``: TRL's ``KTOTrainer`` (Kahneman-Tversky optimisation) on the same model, arguments
and callbacks as SFT and DPO.

KTO learns from replies labelled one by one, desirable or undesirable, with no pairs needed:

- data (:meth:`KTORecipe.build_data`): ``unpaired_preference`` rows (prompt, completion, label) or
  ``preference`` pairs, each pair split into its chosen reply (desirable) and its rejected reply
  (undesirable); the prompt is rendered with the chat template and system prompt as for DPO, and
  TRL tokenizes it. TRL estimates KTO's KL term from mismatched (prompt, reply) pairs within each
  batch and so reads the rows in order (its ``train_sampling_strategy='sequential'``): the rows are
  shuffled once here, seeded, so batches mix desirable and undesirable replies of different prompts
  and a resumed run reads the same order; rows whose prompt fills ``seq_length`` are left out
  (TRL would train them on an empty reply). ``dataset.mix`` and ``training.group_by_length`` are
  refused; ``per_device_train_batch_size`` must be at least 2 (the KL term needs a neighbour);
- arguments: TRL's ``KTOConfig`` built from every method's keyword arguments plus
  ``beta = training.kto_beta``, ``desirable_weight`` / ``undesirable_weight`` and
  ``max_length = training.seq_length``;
- the reference model exactly as for DPO: with LoRA/QLoRA TRL keeps a frozen copy of the starting
  adapter (``ref``) on the one base, with full/freeze fine-tuning the base is loaded again, frozen.
  ``final/adapter`` holds only the trained adapter.

TRL logs ``rewards/chosen``, ``rewards/rejected`` (desirable and undesirable replies),
``rewards/margins`` and ``kl`` with every loss: the rewards go to progress.json's ``rewards`` as for
DPO, ``kl`` to its ``metrics`` (the table's ``progress_metrics``).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.errors import JobError
from kubetune_trainer.recipes.base import Recipe, TrainerSetup, arguments
from kubetune_trainer.recipes.dpo import freeze_reference, without_reference_adapter

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.chat_render import ChatRenderer
    from kubetune_trainer.datasets_build import BuiltData, DataStats
    from kubetune_trainer.formats import Example

log = logging.getLogger("kubetune.kto")

_ENCODE_BATCH = 512


def unpaired_rows(renderer: ChatRenderer, ex: Example) -> list[dict[str, Any]]:
    """{prompt, completion, label} rows of one example: its chosen reply (desirable) and its rejected
    reply (undesirable), whichever it has (an unpaired row has one, a pair both)."""
    rendered = renderer.preference_row(ex)
    rows = []
    for key, label in (("chosen", True), ("rejected", False)):
        if getattr(ex, key) is not None:
            rows.append({"prompt": rendered["prompt"], "completion": rendered[key], "label": label})
    return rows


def unpaired_dataset(
    renderer: ChatRenderer, examples: list[Example], seq_length: int, seed: int, stats: DataStats | None
) -> Any:
    """The rows of `examples`, shuffled once (seeded: TRL reads them in order), as a ``datasets.Dataset``."""
    import datasets

    rows = [row for ex in examples for row in unpaired_rows(renderer, ex)]
    random.Random(seed).shuffle(rows)
    if stats is not None:
        tok = renderer.tok
        for start in range(0, len(rows), _ENCODE_BATCH):
            part = rows[start : start + _ENCODE_BATCH]
            prompts = tok([r["prompt"] for r in part])["input_ids"]
            replies = tok([r["completion"] for r in part], add_special_tokens=False)["input_ids"]
            for p, c in zip(prompts, replies, strict=True):
                stats.samples += 1
                stats.tokens += min(seq_length, len(p) + len(c))
                stats.trainable_tokens += max(0, min(len(c), seq_length - len(p)))
                stats.truncated += len(p) + len(c) > seq_length
                stats.no_trainable += len(p) >= seq_length
        stats.sequences = len(rows)
    cols = {k: [r[k] for r in rows] for k in ("prompt", "completion", "label")}
    return datasets.Dataset.from_dict(cols)


def _with_reply_room(dataset: Any, ctx: Any) -> Any:
    """The rows whose prompt leaves room for a reply within seq_length (TRL would train the others on an
    empty reply; ``DataStats.no_trainable`` counts them)."""
    tok, limit = ctx.renderer.tok, ctx.seq_length
    return dataset.filter(lambda row: len(tok(row["prompt"])["input_ids"]) < limit)


class KTORecipe(Recipe):
    method: ClassVar[str] = "kto"

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        from datasets.utils.logging import disable_progress_bar

        from kubetune_trainer import datasets_build as db
        from kubetune_trainer.data_sources import DataError

        disable_progress_bar()  # datasets' filter and map bars would fill pod logs
        ctx = db.data_context(job, tokenizer, seed=seed, device_type=device_type)
        train_ex, eval_ex = db.read_main(ctx)
        if ctx.ds.mix:
            raise DataError(f"dataset.mix is not supported with method {self.method}")
        train = _with_reply_room(
            unpaired_dataset(ctx.renderer, train_ex, ctx.seq_length, seed, ctx.stats), ctx
        )
        if len(train) == 0:
            raise DataError(f"{ctx.ds.uri}: every prompt fills training.seq_length ({ctx.seq_length} tokens)")
        ctx.stats.sequences = len(train)
        if not any(train["label"]) or all(train["label"]):
            kind = "undesirable (label false)" if any(train["label"]) else "desirable (label true)"
            raise DataError(
                f"{ctx.ds.uri}: method kto needs desirable and undesirable replies; none is {kind}"
            )
        evald = (
            _with_reply_room(unpaired_dataset(ctx.renderer, eval_ex, ctx.seq_length, seed, None), ctx)
            if eval_ex
            else None
        )
        ctx.stats.eval_samples = len(evald) if evald is not None else 0
        return ctx.built(train, evald, None, False)

    def preview(self, job: Any, tokenizer: Any, n: int) -> list[tuple[Example, Any]]:
        """One entry per reply: the prompt, then the reply under the name of its label."""
        from kubetune_trainer import datasets_build as db

        ctx = db.data_context(job, tokenizer, seed=job.spec.training.seed)
        out = []
        for ex in db.first_examples(ctx, n):
            for row in unpaired_rows(ctx.renderer, ex):
                kind = "desirable (label true)" if row["label"] else "undesirable (label false)"
                out.append((ex, {"prompt": row["prompt"], kind: row["completion"]}))
        return out[:n]

    def training_arguments(self, spec: FineTuneJobSpec, kwargs: dict[str, Any]) -> Any:
        from trl import KTOConfig

        t = spec.training
        if t.group_by_length:
            raise JobError(
                "spec.training.group_by_length: method kto reads its rows in order (its KL term pairs each reply "
                "with its batch neighbour's prompt); leave group_by_length off"
            )
        if t.per_device_train_batch_size < 2:
            raise JobError(
                "spec.training.per_device_train_batch_size: method kto needs at least 2 (it estimates its KL term "
                "from the other rows of a batch)"
            )
        return arguments(KTOConfig, {**kwargs, **kto_fields(spec)})

    def make_trainer(self, setup: TrainerSetup) -> Any:
        from datasets.utils.logging import disable_progress_bar
        from trl import KTOTrainer

        from kubetune_trainer.trainer_class import kubetune_trainer

        disable_progress_bar()  # TRL tokenizes with datasets.map; its bars would fill pod logs
        _check_no_adapter_on_output_head(setup.model, setup.plan.uses_adapter)
        ref_model = None
        if not setup.plan.uses_adapter:
            if setup.load_base is None:
                raise JobError(
                    f"method kto with pet_type {setup.plan.pet_type} needs a reference model loader"
                )
            ref_model = freeze_reference(setup.load_base())
        trainer = kubetune_trainer(KTOTrainer)(
            model=setup.model,
            ref_model=ref_model,
            args=setup.args,
            train_dataset=setup.data.train_dataset,
            eval_dataset=setup.data.eval_dataset,
            processing_class=setup.tokenizer,
            callbacks=list(setup.callbacks),
        )
        if setup.plan.uses_adapter:
            log.info("kto reference: the starting adapter, frozen; base weights shared")
        else:
            log.info("kto reference: a frozen copy of %s", setup.spec.model.uri)
        return trainer

    def model_to_export(self, model: Any) -> Any:
        return without_reference_adapter(model)


def kto_fields(spec: FineTuneJobSpec) -> dict[str, Any]:
    """The KTOConfig fields that come from ``spec.training`` (the rest is every method's arguments)."""
    t = spec.training
    return {
        "beta": t.kto_beta,
        "desirable_weight": t.kto_desirable_weight,
        "undesirable_weight": t.kto_undesirable_weight,
        "max_length": t.seq_length,
        "train_sampling_strategy": "sequential",  # TRL's KL term pairs neighbours; the rows are shuffled already
        "precompute_ref_log_probs": False,
    }


def _check_no_adapter_on_output_head(model: Any, uses_adapter: bool) -> None:
    """TRL's KTO scores from ``lm_head.weight`` directly and refuses a LoRA adapter there: one line instead."""
    head = model.get_output_embeddings() if uses_adapter else None
    if head is not None and hasattr(head, "lora_A"):
        raise JobError(
            "spec.pet_config.target_modules: method kto cannot train a LoRA adapter on the output head "
            "(lm_head); leave it out (e.g. all-linear or '.*_proj')"
        )


RECIPE = KTORecipe()

__all__ = ["RECIPE", "KTORecipe", "kto_fields", "unpaired_dataset", "unpaired_rows"]
