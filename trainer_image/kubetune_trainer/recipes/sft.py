"""``method: sft``: supervised fine-tuning on conversations (alpaca, sharegpt, messages).

Rows are rendered with the chat template (or kubetune's ChatML) and system prompt, prompt tokens
masked with -100, each sample truncated to ``seq_length``, then packed best fit
(``training.packing``) or batched as they are; ``dataset.mix`` sources are drawn in by ratio.
transformers' ``Trainer`` trains on them with the padding collator of ``datasets_build``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.recipes.base import Recipe

if TYPE_CHECKING:
    from kubetune_trainer.datasets_build import BuiltData
    from kubetune_trainer.formats import Example


class SFTRecipe(Recipe):
    method: ClassVar[str] = "sft"
    # samples are whole documents cut into seq_length pieces, every token in the loss (pre-training),
    # instead of conversations truncated at seq_length
    documents: ClassVar[bool] = False

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        from kubetune_trainer import datasets_build as db

        ctx = db.data_context(job, tokenizer, seed=seed, device_type=device_type)
        train_ex, eval_ex = db.read_main(ctx)
        return db.tokenized_data(ctx, db.add_mix(ctx, train_ex), eval_ex, documents=self.documents)

    def preview(self, job: Any, tokenizer: Any, n: int) -> list[tuple[Example, Any]]:
        from kubetune_trainer import datasets_build as db

        ctx = db.data_context(job, tokenizer, seed=job.spec.training.seed)
        return [
            (ex, ctx.renderer.encode(ex, truncate=not self.documents)) for ex in db.first_examples(ctx, n)
        ]


RECIPE = SFTRecipe()
