"""``kubetune inspect-data job.yaml``: see exactly what the model will be trained on.

Prints the first few rows of the job's dataset as rendered (chat template or ChatML, system
prompt applied) with the tokens that are in the loss marked -- green on a terminal, ``[[...]]``
otherwise -- and then the counts for the whole dataset: samples, tokens, trainable tokens,
truncated samples, samples with no trainable token, skipped bad rows, packed sequences -- and
whether the job's tokenized-data cache (data_cache.py) holds these rows (a hit: the counts are the
cached build's, and training will not tokenize again).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from kubetune_trainer.chat_render import IGNORE_INDEX, Encoded
from kubetune_trainer.data_sources import DataError
from kubetune_trainer.datasets_build import DataStats

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja", "chat_template.json", "config.json",
    "generation_config.json",
)  # fmt: skip


def load_tokenizer(job: Any) -> Any:
    """The job's tokenizer (model.tokenizer_uri, else model.uri); for s3:// only tokenizer files are fetched."""
    from transformers import AutoTokenizer

    from kubetune.uris import parse_uri

    model = job.spec.model
    text = model.tokenizer_uri or model.uri
    uri = parse_uri(text)
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if uri.scheme == "hf":
        return AutoTokenizer.from_pretrained(uri.path, revision=model.revision, **kwargs)
    from kubetune_trainer.errors import JobError
    from kubetune_trainer.locations import to_local

    try:  # s3://: only the tokenizer's files are fetched
        path = to_local(
            text,
            job.spec.storage.s3,
            field="",
            select=lambda keys: [k for k in keys if k in _TOKENIZER_FILES],
        )
    except JobError as e:
        raise DataError(f"tokenizer {e}") from None
    if not path.exists():
        raise DataError(f"tokenizer {text}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a tokenizer from {text}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # as the trainer does (model_loading.load_tokenizer)
    return tok


def _mark(tokenizer: Any, enc: Encoded, color: bool) -> str:
    """Decoded text, trained spans marked."""
    out: list[str] = []
    start = 0
    ids, labels = enc.input_ids, enc.labels
    while start < len(ids):
        trained = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == trained:
            end += 1
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        if trained:
            out.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
        else:
            out.append(text)
        start = end
    return "".join(out)


def _print_stats(stats: DataStats, out: TextIO, job: Any) -> None:
    t = job.spec.training
    print(f"\n== counts ({job.spec.method}, seq_length {t.seq_length}, packing {t.packing})", file=out)
    for key in (
        "rows", "skipped_bad_rows", "empty_rows", "samples", "eval_samples", "mixed_samples", "tokens",
        "trainable_tokens", "truncated", "no_trainable", "sequences", "packing_efficiency",
    ):  # fmt: skip
        value = getattr(stats, key)
        if value is None:
            continue
        shown = f"{value:.1%}" if isinstance(value, float) else f"{value:,}"
        print(f"  {key.replace('_', ' '):<20} {shown}", file=out)
    for msg in stats.bad_row_examples:
        print(f"  skipped: {msg}", file=out)


def inspect_data(
    job: Any,
    samples: int = 3,
    *,
    tokenizer: Any = None,
    file: TextIO | None = None,
    color: bool | None = None,
) -> DataStats:
    """Print ``samples`` rendered rows with the trained span marked, then the dataset's counts."""
    out = file or sys.stdout
    if color is None:
        color = hasattr(out, "isatty") and out.isatty()
    from kubetune_trainer import recipes

    recipe = recipes.get(job.spec.method)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(job)
    ds = job.spec.dataset
    how = "tokenizer chat template" if ds.apply_chat_template else "ChatML (kubetune default)"
    legend = f"{GREEN}like this{RESET}" if color else "[[like this]]"
    print(
        f"dataset {ds.uri} ({job.spec.method}, rendering: {how}); tokens in the loss are shown {legend}",
        file=out,
    )
    for i, (ex, rendered) in enumerate(recipe.preview(job, tokenizer, samples), 1):
        print(f"\n== sample {i} ({ex.origin})", file=out)
        if isinstance(rendered, Encoded):
            note = f"{len(rendered.input_ids)} tokens, {rendered.trainable} trained"
            if rendered.truncated:
                note += ", truncated"
            print(_mark(tokenizer, rendered, color), file=out)
            print(f"{DIM if color else ''}-- {note}{RESET if color else ''}", file=out)
        else:  # text fields a TRL trainer tokenizes: the first (the prompt) untrained, the others trained
            for j, (key, body) in enumerate(rendered.items()):
                if j:
                    body = f"{GREEN}{body}{RESET}" if color else f"[[{body}]]"
                print(f"-- {key}:\n{body}", file=out)
    from kubetune_trainer.data_cache import lookup

    # read-only: the cache is written by training, which holds the output's lease
    seed = job.spec.training.seed
    built, outcome, _ = lookup(recipe, job, tokenizer, seed=seed)
    if built is None:
        built = recipe.build_data(job, tokenizer, seed=seed)
    stats = built.stats
    if built.streaming:
        n = sum(1 for _ in built.train_dataset.iter_sequences())
        stats = built.train_dataset.stats
        stats.sequences = n
    _print_stats(stats, out, job)
    print(f"\n{_cache_line(outcome)}", file=out)
    return stats


def _cache_line(outcome: Any) -> str:
    if outcome.status == "hit":
        return f"data cache: hit ({outcome.uri}): training loads these rows instead of tokenizing"
    if outcome.status == "off":
        return f"data cache: not used ({outcome.reason})"
    why = f"; the entry there is unreadable ({outcome.reason})" if outcome.status == "rebuilt" else ""
    return f"data cache: miss{why}: training tokenizes and writes {outcome.uri}"


__all__ = ["inspect_data", "load_tokenizer"]
