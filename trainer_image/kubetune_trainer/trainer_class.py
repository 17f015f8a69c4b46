"""kubetune's Trainer: transformers' Trainer (or TRL's DPOTrainer) with two fixes that resume needs.

- strategy fsdp shards on CPU gangs too (fsdp.enable_on_cpu);
- a run resumed at its last step (the final checkpoint of a pod lost during export) stops there:
  the Trainer only checks max_steps after a step, so it would train one step past the end;
- ``training.group_by_length``: transformers' length-grouped sampler shuffles with the global RNG,
  whose state at an epoch's start differs between an uninterrupted and a resumed run (and between
  ranks once dropout has drawn from it); it gets a generator of its own, seeded with data_seed +
  epoch as accelerate seeds the random sampler, so every restart and every rank sees the same order;
- pair batches without ``input_ids`` (TRL's CPO and ORPO trainers keep ``chosen_*`` and ``rejected_*``
  apart): the tokens seen are both sides' attention masks, as DPO's concatenated batch counts them;
  the Trainer would warn at every step and count none (no tokens/s in progress.json or the trackers).
"""

from __future__ import annotations

from typing import Any, TypeVar

from kubetune_trainer.fsdp import enable_on_cpu

T = TypeVar("T", bound=type)


def epoch_seeded(sampler: Any, seed: int) -> Any:
    """`sampler` (a transformers ``LengthGroupedSampler``) drawing from its own generator, reseeded with
    ``seed + epoch`` at every pass (the Trainer calls ``set_epoch`` through accelerate)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self) -> Any:
            self.generator.manual_seed(seed + self.epoch)
            return super().__iter__()

    return EpochSeededLengthGroupedSampler(
        sampler.batch_size, lengths=sampler.lengths, generator=torch.Generator()
    )


def kubetune_trainer(base: T) -> T:
    """A subclass of `base` (a transformers Trainer class) with the fixes above."""

    class KubetuneTrainer(base):  # type: ignore[misc, valid-type]
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            enable_on_cpu(self)

        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            from transformers.trainer_pt_utils import LengthGroupedSampler

            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, LengthGroupedSampler):
                seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
                sampler = epoch_seeded(sampler, seed)
            return sampler

        def _track_num_input_tokens(self, inputs: Any) -> None:
            import torch

            masks = [inputs.get(f"{side}_attention_mask") for side in ("chosen", "rejected")]
            if (
                getattr(self.model, "main_input_name", "input_ids") in inputs
                or self.args.include_num_input_tokens_seen == "no"
                or any(m is None for m in masks)
            ):
                return super()._track_num_input_tokens(inputs)
            tokens = sum(m.sum() if self.args.include_num_input_tokens_seen == "non_padding" else m.numel()
                         for m in masks)  # fmt: skip
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
            return None

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

    KubetuneTrainer.__name__ = KubetuneTrainer.__qualname__ = base.__name__
    return KubetuneTrainer  # type: ignore[return-value]


__all__ = ["epoch_seeded", "kubetune_trainer"]
