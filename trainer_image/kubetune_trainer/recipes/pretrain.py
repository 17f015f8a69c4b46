"""``method: pretrain``: continued pre-training on plain text.

SFT's pipeline with whole documents: each text row followed by EOS, every token in the loss, cut
into ``seq_length`` pieces (never truncated) that are packed best fit (``training.packing``) or
trained one per row. ``dataset.mix`` may draw in conversations (rendered as documents).
``dataset.streaming`` reads the text lazily instead (``datasets_build.PretrainStream``; the spec's
rules require ``training.max_steps``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from kubetune_trainer.recipes.sft import SFTRecipe

if TYPE_CHECKING:
    from kubetune_trainer.datasets_build import BuiltData


class PretrainRecipe(SFTRecipe):
    method: ClassVar[str] = "pretrain"
    documents: ClassVar[bool] = True

    def build_data(self, job: Any, tokenizer: Any, *, seed: int, device_type: str = "cpu") -> BuiltData:
        if not job.spec.dataset.streaming:
            return super().build_data(job, tokenizer, seed=seed, device_type=device_type)
        from kubetune_trainer import datasets_build as db

        return db.streamed_documents(db.data_context(job, tokenizer, seed=seed, device_type=device_type))


RECIPE = PretrainRecipe()
