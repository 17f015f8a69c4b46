"""What an evaluation measures and what it wrote: the types of ``<output>/eval/results.json``.

The trainer (kubetune_trainer.evaluation) writes :class:`EvaluationResults`; the operator reads the
same type into ``status.evaluation``; ``kubetune eval`` prints it. No torch, no metric libraries.

Scores: ``bleu_4`` (sacrebleu corpus BLEU), ``rouge_l`` (mean ROUGE-L F1) and ``exact_match`` are
0 to 100, higher is better; ``perplexity`` (exp of the mean loss per reference token) is at least 1,
lower is better. A threshold is a minimum for the first three and a maximum for perplexity.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Metric = Literal["bleu_4", "rouge_l", "exact_match", "perplexity"]
METRICS: tuple[str, ...] = ("bleu_4", "rouge_l", "exact_match", "perplexity")
LOWER_IS_BETTER = frozenset({"perplexity"})
PERCENT_METRICS = frozenset({"bleu_4", "rouge_l", "exact_match"})


class MetricScore(BaseModel):
    """One metric for the base and the trained model, and its threshold if one is set."""

    model_config = ConfigDict(extra="allow")
    base: float | None = Field(None, description="Score of the base model (before training).")
    trained: float | None = Field(None, description="Score of the trained model.")
    threshold: float | None = Field(
        None, description="The threshold set: a minimum, or for perplexity a maximum."
    )
    passed: bool | None = Field(
        None, description="Whether the trained score meets the threshold (none: no threshold)."
    )


class EvaluationResults(BaseModel):
    """``<output>/eval/results.json``."""

    model_config = ConfigDict(extra="allow")
    passed: bool = Field(description="Every threshold met (true when none is set) and the evaluation ran.")
    scores: dict[str, MetricScore] = Field(
        default_factory=dict, description="Per metric, in the spec's order."
    )
    failed: list[str] = Field(
        default_factory=list, description="One line per threshold not met, e.g. 'bleu_4 12.5 < minimum 20'."
    )
    error: str | None = Field(None, description="Why the evaluation could not run (then passed is false).")
    num_samples: int = Field(0, description="Samples generated for.")
    max_new_tokens: int = Field(0, description="Generation limit per sample.")
    dataset: str = Field("", description="The evaluation data: a URI, or dataset.validation_split.")
    bleu_tokenizer: str | None = Field(
        None, description="sacrebleu tokenizer used (zh for Chinese references)."
    )
    step: int | None = Field(None, description="Global step of the trained model.")


def meets(metric: str, value: float, threshold: float) -> bool:
    """A threshold is a minimum, or a maximum for lower-is-better metrics (perplexity)."""
    return value <= threshold if metric in LOWER_IS_BETTER else value >= threshold


def judge(
    base: dict[str, float], trained: dict[str, float], thresholds: dict[str, float], metrics: list[str]
) -> EvaluationResults:
    """Scores and thresholds to the verdict (the rest of the fields are the caller's)."""
    scores: dict[str, MetricScore] = {}
    failed: list[str] = []
    for m in metrics:
        t = thresholds.get(m)
        value = trained[m]
        ok = None if t is None else meets(m, value, t)
        scores[m] = MetricScore(base=base.get(m), trained=value, threshold=t, passed=ok)
        if ok is False:
            bound = f"> maximum {t:g}" if m in LOWER_IS_BETTER else f"< minimum {t:g}"
            failed.append(f"{m} {value:.4g} {bound}")
    return EvaluationResults(passed=not failed, scores=scores, failed=failed)


__all__ = ["METRICS", "EvaluationResults", "Metric", "MetricScore", "judge", "meets"]
