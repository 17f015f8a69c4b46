"""Packing samples into ``seq_length`` rows, and the batch collator.

Packed samples never attend to each other: each row carries ``position_ids`` that restart at 0 for
every sample, and the collator sends **no** ``attention_mask``. transformers (>= 4.56,
``masking_utils.find_packed_sequence_indices``) then reads the sample boundaries from the position
ids and builds a block-diagonal causal mask for eager/SDPA/flex attention; FlashAttention-2 uses the
same position ids for its variable-length kernels. The first token of every sample has label -100,
so no position predicts the first token of the next sample: a packed row's loss is exactly the
token-weighted mean of its samples' losses run one by one (tests/test_data_packing.py proves it).

- SFT (``training.packing: true``): whole samples, in their (shuffled) order, are put into a row
  until the next one does not fit; samples are never split (they were truncated to seq_length).
- Pre-training: documents (each ending with EOS) are concatenated and cut into ``seq_length``
  blocks; a document that crosses a block boundary continues in the next block as a new segment
  (position 0). Every token is in the loss except each segment's first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.chat_render import IGNORE_INDEX


def _ids_labels(sample: Any) -> tuple[list[int], list[int]]:
    if isinstance(sample, dict):
        return list(sample["input_ids"]), list(sample["labels"])
    return list(sample.input_ids), list(sample.labels)


def pack_greedy(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Whole samples, in order, into rows of at most seq_length tokens (a longer sample is cut)."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        s_ids, s_labels = s_ids[:seq_length], s_labels[:seq_length]
        if not s_ids:
            continue
        if ids and len(ids) + len(s_ids) > seq_length:
            yield {"input_ids": ids, "labels": labels, "position_ids": pos}
            ids, labels, pos = [], [], []
        ids += s_ids
        labels += [IGNORE_INDEX, *s_labels[1:]]
        pos += list(range(len(s_ids)))
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": pos}


def pack_blocks(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Concatenate samples and cut into seq_length blocks; a sample crossing a boundary is split."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        start = 0
        while start < len(s_ids):
            take = min(seq_length - len(ids), len(s_ids) - start)
            ids += s_ids[start : start + take]
            labels += [IGNORE_INDEX, *s_labels[start + 1 : start + take]]
            pos += list(range(take))
            start += take
            if len(ids) == seq_length:
                yield {"input_ids": ids, "labels": labels, "position_ids": pos}
                ids, labels, pos = [], [], []
    if ids:
        yield {"input_ids": ids, "labels": labels, "position_ids": pos}


def chunk(samples: Iterable[Any], seq_length: int) -> Iterator[dict[str, list[int]]]:
    """Pre-training without packing: each document on its own, cut into pieces of seq_length."""
    for sample in samples:
        s_ids, s_labels = _ids_labels(sample)
        for start in range(0, len(s_ids), seq_length):
            piece = s_labels[start : start + seq_length]
            yield {"input_ids": s_ids[start : start + seq_length], "labels": [IGNORE_INDEX, *piece[1:]]}


@dataclass
class DataCollator:
    """Pads a batch on the right.

    Unpacked rows (``input_ids``, ``labels``): pads with ``pad_token_id``, labels -100, and returns an
    ``attention_mask``. Packed rows (with ``position_ids``): pads the same way, gives the padding its
    own segment of position ids (0, 1, ...) and returns no ``attention_mask``, so transformers builds the
    per-sample mask from the position ids.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        packed = "position_ids" in features[0]
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids, labels, masks, positions = [], [], [], []
        for f in features:
            ids = [int(x) for x in f["input_ids"]]
            lab = [int(x) for x in f["labels"]]
            pad = longest - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            if packed:
                positions.append([int(x) for x in f["position_ids"]] + list(range(pad)))
            else:
                masks.append([1] * len(ids) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        return batch


__all__ = ["DataCollator", "chunk", "pack_blocks", "pack_greedy"]
