"""``spec.evaluation``: score the trained model against the base model, after training or on demand.

    results = evaluate(job, output_dir)          # output_dir holds final/ (adapter or merged model)
    evaluate_after_training(job, result)         # the trainer's hook: rank 0, a completed run
    run_eval(path)                                # `kubetune eval JOB`

Samples: the first ``num_samples`` rows of ``evaluation.dataset`` (read with ``dataset.format`` and
``dataset.columns``), or the rows ``dataset.validation_split`` held out of training. Each is rendered
exactly as training rendered it (chat_render.py): the prompt is everything before the last trained
reply, the reference that reply. Both models generate greedily (no sampling: deterministic) up to
``max_new_tokens``, stopping at the tokens that close a reply as rendered.

Metrics (0 to 100, except perplexity):

- ``bleu_4``: sacrebleu's corpus BLEU; its ``zh`` tokenizer (Chinese split per character, the rest
  as 13a) when a reference holds Chinese, else the standard 13a.
- ``rouge_l``: rouge-score's ROUGE-L F1, mean over samples. rouge-score's own tokenizer keeps only
  [a-z0-9] and would drop every Chinese character, so text is tokenized here first: CJK characters one
  per token (as LLaMA-Factory's character split), other words as runs of letters and digits.
- ``exact_match``: prediction equal to the reference (surrounding whitespace ignored), in percent.
- ``perplexity``: exp of the mean loss per reference token (the reply and its end-of-turn token, as
  trained), given the prompt; the trained model's loss on what it was trained to say.

Written to ``<output>/eval/results.json`` (:class:`kubetune.evaluation.EvaluationResults`: both models'
scores, the thresholds, pass/fail per metric) and ``<output>/eval/predictions.jsonl`` (prompt,
reference, base and trained prediction per sample).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.evaluation import LOWER_IS_BETTER, EvaluationResults, judge
from kubetune.locations import (
    ADAPTER_DIR,
    EVAL_PREDICTIONS_FILE,
    EVAL_RESULTS_FILE,
    FINAL_DIR,
    MERGED_DIR,
    cache_root,
    local_path,
    output_uri,
)
from kubetune_trainer.errors import JobError

if TYPE_CHECKING:
    from kubetune.spec import Evaluation, FineTuneJob
    from kubetune_trainer.chat_render import ChatRenderer
    from kubetune_trainer.formats import Example
    from kubetune_trainer.train import TrainResult

log = logging.getLogger("kubetune.eval")

GENERATION_METRICS = ("bleu_4", "rouge_l", "exact_match")
BATCH_SIZE = 8  # prompts generated together (left-padded)


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class Sample:
    prompt: str  # the rendered prompt, up to the reply's header
    prompt_ids: list[int]
    reference: str  # the reply as written in the data
    reference_ids: list[int]  # the reply's tokens as trained (with its end-of-turn token)


def build_samples(examples: Sequence[Example], renderer: ChatRenderer, seq_length: int) -> list[Sample]:
    """Prompt and reference of each example, rendered as in training. A preference example counts
    with its chosen reply; a text example (pre-training) is all reference, no prompt."""
    from kubetune_trainer.formats import ASSISTANT, Example, Turn

    tok = renderer.tok
    out: list[Sample] = []
    for ex in examples:
        if ex.kind == "preference":
            ex = Example("chat", (*ex.turns, Turn(ASSISTANT, ex.chosen or "")), ex.system, origin=ex.origin)
        segs = renderer.segments(ex)
        last = max((i for i, (_, trained) in enumerate(segs) if trained), default=None)
        if last is None:
            continue  # no reply to compare with
        pieces = [text for text, _ in segs[: last + 1] if text]
        # each segment tokenized on its own, as training did: the same ids at the boundaries
        encoded = [list(x) for x in tok(pieces, add_special_tokens=False)["input_ids"]]
        ids = list(renderer.bos_prefix) if not renderer.use_template or ex.kind == "text" else []
        for piece in encoded[:-1]:
            ids += piece
        reply_ids = encoded[-1]
        prompt = "".join(pieces[:-1])
        if ex.kind == "text":
            reference = ex.text or ""
            if renderer.eos_token_id is not None:
                reply_ids.append(renderer.eos_token_id)
        else:
            reference = next(t.content for t in reversed(ex.turns) if t.role == ASSISTANT)
        out.append(Sample(prompt, ids[-seq_length:], reference, reply_ids))
    return out


# ---------------------------------------------------------------- metrics

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana and Han ideographs
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
_HAS_CJK = re.compile(rf"[{_CJK}]")


def tokenize(text: str) -> list[str]:
    """Lowercased words (runs of letters and digits), each CJK character its own token: for English
    the tokens rouge-score's default tokenizer makes, and Chinese is not dropped."""
    return _TOKEN.findall(text.lower())


class _RougeTokenizer:
    """rouge-score's tokenizer interface (an object with `tokenize`)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


def bleu_4(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacrebleu corpus BLEU (0-100) and the tokenizer used: zh when any reference holds Chinese."""
    import sacrebleu

    name = "zh" if any(_HAS_CJK.search(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=name).score), name


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (0-100), CJK per character."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    f1 = [
        scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)
    ]
    return 100.0 * sum(f1) / max(len(f1), 1)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    same = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * same / max(len(references), 1)


def scores(
    metrics: Sequence[str],
    predictions: Sequence[str] | None,
    references: Sequence[str],
    nll: tuple[float, int] | None,
) -> tuple[dict[str, float], str | None]:
    """The asked metrics from the predictions and the summed reference loss (loss, tokens)."""
    out: dict[str, float] = {}
    tokenizer = None
    for m in metrics:
        if m == "perplexity":
            assert nll is not None
            total, n = nll
            out[m] = math.exp(total / n) if n else math.inf
            continue
        assert predictions is not None
        if m == "bleu_4":
            out[m], tokenizer = bleu_4(predictions, references)
        elif m == "rouge_l":
            out[m] = rouge_l(predictions, references)
        elif m == "exact_match":
            out[m] = exact_match(predictions, references)
    return out, tokenizer


# ---------------------------------------------------------------- models


def generate(
    model: Any, tokenizer: Any, samples: Sequence[Sample], *, max_new_tokens: int, eos_ids: list[int]
) -> list[str]:
    """Greedy continuations of the prompts (left-padded batches), decoded without special tokens."""
    import torch
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    # a fresh config: the model's own may ask for sampling (temperature, top_p)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad, use_cache=True
    )
    device = _device_of(model)
    out: list[str] = []
    for start in range(0, len(samples), BATCH_SIZE):
        batch = [s.prompt_ids for s in samples[start : start + BATCH_SIZE]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.inference_mode():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def reference_loss(model: Any, samples: Sequence[Sample], seq_length: int) -> tuple[float, int]:
    """Summed loss over the reference tokens given their prompts, and how many tokens it covers."""
    import torch

    device = _device_of(model)
    total, count = 0.0, 0
    for s in samples:
        ids = (s.prompt_ids + s.reference_ids)[:seq_length]  # cut at the end, as training does
        labels = ([-100] * len(s.prompt_ids) + s.reference_ids)[:seq_length]
        n = sum(1 for x in labels[1:] if x != -100)  # the first token is predicted by nothing
        if n == 0:
            continue
        with torch.inference_mode():
            loss = model(
                input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device)
            ).loss
        total += float(loss) * n
        count += n
    return total, count


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _release(model: Any) -> None:
    import torch

    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _models(job: FineTuneJob, output_dir: Path) -> Iterator[tuple[Any, Iterator[tuple[str, Any]]]]:
    """(tokenizer, iterator of ("base", model), ("trained", model)): one model in memory at a time,
    the base loaded as training loaded it (quantized for qlora, with model.adapter_uri applied)."""
    import torch

    from kubetune_trainer import model_loading, pet

    spec = job.spec
    adapter = output_dir / ADAPTER_DIR
    merged = output_dir / MERGED_DIR
    if not (adapter / "adapter_config.json").is_file() and not (merged / "config.json").is_file():
        raise JobError(
            f"spec.output.uri: {spec.output.uri} has no trained model in {FINAL_DIR}/ (adapter or merged): "
            "the job has not finished"
        )
    precision = model_loading.resolve_precision(spec.training.precision)
    device = f"cuda:{torch.cuda.current_device()}" if precision.device_type == "cuda" else "cpu"
    plan = pet.plan_pet(spec, precision)
    model_dir = model_loading.resolve_model_dir(
        spec.model.uri, s3=spec.storage.s3, revision=spec.model.revision
    )
    tokenizer = model_loading.load_tokenizer(spec, model_dir)

    def load(path: Path, quantization: Any) -> Any:
        model = model_loading.load_model(
            path, spec, precision, quantization_config=quantization, device=device
        )
        if quantization is None:
            model = model.to(device)
        model.config.use_cache = True
        return model.eval()

    def models() -> Iterator[tuple[str, Any]]:
        from peft import PeftModel

        base = load(model_dir, plan.quantization_config)
        if spec.model.adapter_uri:  # the job started from this adapter: that is the model it improves on
            start = model_loading.resolve_model_dir(
                spec.model.adapter_uri,
                s3=spec.storage.s3,
                field="spec.model.adapter_uri",
                require_config=False,
            )
            with_start = PeftModel.from_pretrained(base, str(start)).eval()
            yield "base", with_start
            base = with_start.unload()
        else:
            yield "base", base
        if (adapter / "adapter_config.json").is_file():
            yield "trained", PeftModel.from_pretrained(base, str(adapter)).eval()
        else:
            _release(base)
            yield "trained", load(merged, None)

    yield tokenizer, models()


# ---------------------------------------------------------------- the evaluation


def evaluate(job: FineTuneJob, output_dir: Path, *, step: int | None = None) -> EvaluationResults:
    """Score the base and the trained model (final/ under `output_dir`, a local directory) and write
    eval/results.json and eval/predictions.jsonl there. Raises JobError / DataError for problems the
    user fixes (no trained model, unreadable evaluation data)."""
    from kubetune.spec import Evaluation
    from kubetune_trainer.chat_render import ChatRenderer
    from kubetune_trainer.datasets_build import evaluation_examples

    spec = job.spec
    ev: Evaluation = spec.evaluation or Evaluation()
    output_dir = Path(output_dir)
    if ev.dataset is None and spec.dataset.validation_split <= 0:
        raise JobError(
            "spec.evaluation.dataset: set it, or dataset.validation_split > 0 to evaluate on the held-out rows"
        )
    seq_length = spec.training.seq_length
    with _models(job, output_dir) as (tokenizer, models):
        ds = spec.dataset
        renderer = ChatRenderer(
            tokenizer, apply_chat_template=ds.apply_chat_template, system_prompt=ds.system_prompt,
            seq_length=seq_length,
        )  # fmt: skip
        samples = build_samples(evaluation_examples(job, ev.num_samples, ev.dataset), renderer, seq_length)
        where = ev.dataset or f"{ds.uri} (the rows dataset.validation_split={ds.validation_split} held out)"
        if not samples:
            raise JobError(f"spec.evaluation: no sample with a reply to evaluate in {where}")
        eos_ids = renderer.end_of_turn_token_ids() or [tokenizer.eos_token_id]
        references = [s.reference for s in samples]
        wants_text = any(m in GENERATION_METRICS for m in ev.metrics)
        predictions: dict[str, list[str]] = {}
        per_model: dict[str, dict[str, float]] = {}
        bleu_tok = None
        for name, model in models:
            preds = None
            if wants_text:
                preds = generate(model, tokenizer, samples, max_new_tokens=ev.max_new_tokens, eos_ids=eos_ids)
                predictions[name] = preds
            nll = reference_loss(model, samples, seq_length) if "perplexity" in ev.metrics else None
            per_model[name], bleu_tok = scores(ev.metrics, preds, references, nll)
            log.info("evaluated the %s model on %d samples: %s", name, len(samples), _show(per_model[name]))
    results = judge(per_model["base"], per_model["trained"], ev.thresholds, list(ev.metrics))
    results = results.model_copy(
        update={
            "num_samples": len(samples), "max_new_tokens": ev.max_new_tokens, "dataset": where,
            "bleu_tokenizer": bleu_tok, "step": step,
        }
    )  # fmt: skip
    write(output_dir, results, samples, predictions)
    return results


def write(
    output_dir: Path,
    results: EvaluationResults,
    samples: Sequence[Sample] = (),
    predictions: dict[str, list[str]] | None = None,
) -> list[Path]:
    """eval/results.json (and eval/predictions.jsonl when there are samples) under `output_dir`."""
    path = output_dir / EVAL_RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(results.model_dump_json(indent=2) + "\n", encoding="utf-8")
    written = [path]
    if samples:
        preds = predictions or {}
        lines = [
            json.dumps(
                {
                    "prompt": s.prompt,
                    "reference": s.reference,
                    "base": preds["base"][i] if "base" in preds else None,
                    "trained": preds["trained"][i] if "trained" in preds else None,
                },
                ensure_ascii=False,
            )  # fmt: skip
            for i, s in enumerate(samples)
        ]
        pred_path = output_dir / EVAL_PREDICTIONS_FILE
        pred_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        written.append(pred_path)
    return written


def _show(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())


def evaluate_after_training(job: FineTuneJob, result: TrainResult) -> EvaluationResults | None:
    """The trainer's hook after a completed run (global rank 0, `spec.evaluation` set): evaluate the
    exported model and put eval/ next to it in the output. The model is already uploaded, so an
    evaluation that cannot run (bad evaluation data) is recorded in results.json (passed false, the
    reason in `error`) instead of failing the job."""
    import os

    from kubetune_trainer.data_sources import DataError

    if job.spec.evaluation is None or not result.completed or int(os.environ.get("RANK", 0)) != 0:
        return None
    gc.collect()  # the training run's model and optimizer are gone: free their memory first
    try:
        results = evaluate(job, result.output_dir, step=result.global_step)
    except (JobError, DataError) as e:
        log.warning("evaluation failed: %s", e)
        results = EvaluationResults(passed=False, error=str(e), step=result.global_step)
        write(result.output_dir, results)
    publish(job, result.output_dir)
    verdict = "passed" if results.passed else f"failed: {'; '.join(results.failed) or results.error}"
    log.info("evaluation %s (%s)", verdict, output_uri(job.spec.output.uri, EVAL_RESULTS_FILE))
    return results


def publish(job: FineTuneJob, local_output: Path) -> None:
    """Upload eval/ to an output that is not this directory itself (s3://)."""
    from kubetune_trainer.store import open_store, with_retries

    if local_path(job.spec.output.uri) is not None:
        return
    store = open_store(job.spec.output.uri, job.spec.storage.s3)
    for key in (EVAL_RESULTS_FILE, EVAL_PREDICTIONS_FILE):
        if (local_output / key).is_file():
            with_retries(lambda k=key: store.put_file(local_output / k, k), what=f"upload of {key}")


# ---------------------------------------------------------------- kubetune eval


def fetch_output(job: FineTuneJob) -> Path:
    """A local directory with the job's final/ (the output itself, or a download of an s3:// one)."""
    from kubetune_trainer.store import open_store

    local = local_path(job.spec.output.uri)
    if local is not None:
        return local
    store = open_store(job.spec.output.uri, job.spec.storage.s3)
    if not store.list(f"{FINAL_DIR}/"):
        raise JobError(
            f"spec.output.uri: {job.spec.output.uri} has no {FINAL_DIR}/: the job has not finished"
        )
    into = cache_root() / "eval" / job.metadata.name
    store.download_dir(FINAL_DIR, into / FINAL_DIR)
    return into


def table(results: EvaluationResults) -> str:
    """Base vs trained per metric, with the threshold and the verdict."""
    rows = [("metric", "base", "trained", "threshold", "")]
    for name, s in results.scores.items():
        bound = "" if s.threshold is None else f"{'<=' if name in LOWER_IS_BETTER else '>='} {s.threshold:g}"
        verdict = "" if s.passed is None else "pass" if s.passed else "FAIL"
        rows.append((name, _num(s.base), _num(s.trained), bound, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(
            cell.ljust(w) if i in (0, 3, 4) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def run_eval(job: FineTuneJob) -> int:
    """`kubetune eval JOB`: evaluate the finished job's output here, print the table, write eval/ to the
    output. 0 when every threshold is met, 1 otherwise."""
    import sys

    from kubetune_trainer.train import quiet_known_noise

    quiet_known_noise()  # no per-file progress bars of transformers around the table
    output = fetch_output(job)
    results = evaluate(job, output)
    publish(job, output)
    print(table(results))
    where = output_uri(job.spec.output.uri, EVAL_RESULTS_FILE)
    print(f"{results.num_samples} samples from {results.dataset}; written to {where}")
    if results.failed:
        print(f"kubetune: evaluation failed: {'; '.join(results.failed)}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "Sample", "build_samples", "bleu_4", "evaluate", "evaluate_after_training", "exact_match", "rouge_l",
    "run_eval", "table", "tokenize",
]  # fmt: skip
