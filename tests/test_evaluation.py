"""spec.evaluation: the spec's rules, the metrics (Chinese included), the evaluation after training
through the trainer's own entry point, and `kubetune eval`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.evaluation import EvaluationResults
from kubetune.validate import SpecError, load_jobs_text
from tests import crd_admission as api
from tests.fixtures_spec import BASE

ROOT = Path(__file__).resolve().parents[1]
HUANHUAN = ROOT / "examples/data/huanhuan_20.json"  # Chat-甄嬛 (datawhalechina/self-llm), see its README
EVAL_DATA = "s3://data/eval.json"
# short replies (this tokenizer spends up to 3 tokens on a Chinese character), prompts all different
SHORT_ROWS = [json.loads(HUANHUAN.read_text(encoding="utf-8"))[i] for i in (2, 7, 16, 17)]


# ---------------------------------------------------------------- the spec


def _problems(patch: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(kubetune validate's lines, the API server's) for BASE with `patch` merged into its spec."""
    doc = copy.deepcopy(BASE)
    doc["spec"].update(patch)
    try:
        load_jobs_text(yaml.safe_dump(doc))
        python: list[str] = []
    except SpecError as e:
        python = [f"{p.path}: {p.message}" for p in e.problems]
    return python, api.admit(doc)[1]


BAD_EVALUATIONS = [
    ("unknown-metric", {"evaluation": {"metrics": ["bleu"], "dataset": EVAL_DATA}},
     "spec.evaluation.metrics[0]: must be one of 'bleu_4', 'rouge_l', 'exact_match' or 'perplexity', got 'bleu'"),
    ("threshold-unknown-metric", {"evaluation": {"thresholds": {"bleu": 20}, "dataset": EVAL_DATA}},
     "spec.evaluation.thresholds: every threshold must be for a metric: bleu_4, rouge_l, exact_match or "
     "perplexity, got 'bleu'"),
    ("threshold-metric-not-listed",
     {"evaluation": {"metrics": ["bleu_4"], "thresholds": {"rouge_l": 20}, "dataset": EVAL_DATA}},
     "spec.evaluation.thresholds: every threshold must be for a metric listed in evaluation.metrics"),
    ("threshold-over-100", {"evaluation": {"thresholds": {"bleu_4": 120}, "dataset": EVAL_DATA}},
     "spec.evaluation.thresholds: bleu_4, rouge_l and exact_match thresholds are scores from 0 to 100; "
     "perplexity thresholds at least 1"),
    ("perplexity-below-1", {"evaluation": {"thresholds": {"perplexity": 0.5}, "dataset": EVAL_DATA}},
     "spec.evaluation.thresholds: bleu_4, rouge_l and exact_match thresholds are scores from 0 to 100; "
     "perplexity thresholds at least 1"),
    ("no-data", {"evaluation": {}},
     "spec.evaluation.dataset: evaluation needs evaluation.dataset, or dataset.validation_split > 0 to evaluate "
     "on the held-out rows"),
    ("pretrain-generation",
     {"method": "pretrain", "dataset": {"uri": "s3://data/c4.jsonl", "validation_split": 0.1}, "evaluation": {}},
     "spec.evaluation.metrics: method pretrain has no replies to compare generations with: evaluate it with "
     "metrics [perplexity]"),
    ("max-new-tokens-zero", {"evaluation": {"max_new_tokens": 0, "dataset": EVAL_DATA}},
     "spec.evaluation.max_new_tokens: must be >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("case,patch,line", BAD_EVALUATIONS, ids=[c[0] for c in BAD_EVALUATIONS])
def test_a_bad_evaluation_is_one_line_naming_the_field(case: str, patch: dict, line: str) -> None:
    python, server = _problems(patch)
    assert python == [line]
    # the API server refuses it too; where CEL says it, in the same words
    assert server and all(p.startswith("spec.evaluation.") for p in server), server
    if case not in ("unknown-metric", "threshold-unknown-metric", "max-new-tokens-zero"):
        assert server == [line]


def test_a_listed_metric_twice_is_refused() -> None:
    python, _ = _problems({"evaluation": {"metrics": ["bleu_4", "bleu_4"], "dataset": EVAL_DATA}})
    assert python == ["spec.evaluation.metrics: lists bleu_4 more than once"]


@pytest.mark.parametrize(
    "patch",
    [
        {
            "evaluation": {
                "thresholds": {"bleu_4": 20, "rouge_l": 35.5, "perplexity": 30},
                "dataset": EVAL_DATA,
            }
        },
        {
            "dataset": {"uri": "s3://data/a.json", "validation_split": 0.1},
            "evaluation": {"metrics": ["rouge_l"]},
        },
        {
            "method": "pretrain",
            "dataset": {"uri": "s3://data/c4.jsonl", "validation_split": 0.1},
            "evaluation": {"metrics": ["perplexity"], "thresholds": {"perplexity": 12}},
        },
    ],
)
def test_good_evaluations_are_admitted_by_both(patch: dict) -> None:
    assert _problems(patch) == ([], [])


# ---------------------------------------------------------------- the metrics


def test_chinese_references_score_100_when_identical_and_lower_when_not() -> None:
    from kubetune_trainer.evaluation import bleu_4, exact_match, rouge_l, tokenize

    refs = [row["output"] for row in json.loads(HUANHUAN.read_text(encoding="utf-8"))[:8]]
    assert refs[2] == "皇上万福金安。"
    assert tokenize("皇上万福金安。") == ["皇", "上", "万", "福", "金", "安"]
    assert bleu_4(refs, refs) == (pytest.approx(100.0), "zh")
    assert rouge_l(refs, refs) == pytest.approx(100.0)
    assert exact_match(refs, refs) == 100.0
    # the first half of every reply: overlaps, but is not the reference
    halves = [r[: max(1, len(r) // 2)] for r in refs]
    assert 0 < bleu_4(halves, refs)[0] < 100
    assert 0 < rouge_l(halves, refs) < 100
    assert exact_match(halves, refs) == 0.0
    # rouge-score's own tokenizer keeps only [a-z0-9]: it would score any Chinese pair 0
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rougeL"]).score(refs[0], refs[0])["rougeL"].fmeasure == 0


def test_english_scores_use_the_standard_tokenizers() -> None:
    from kubetune_trainer.evaluation import bleu_4, rouge_l, tokenize

    assert tokenize("Paris is the capital, of France!") == ["paris", "is", "the", "capital", "of", "france"]
    assert bleu_4(["The cat sat on the mat."], ["The cat sat on the mat."]) == (pytest.approx(100.0), "13a")
    assert rouge_l(["a cat sat"], ["the cat sat down"]) == pytest.approx(100 * 2 / 3.5)  # P 2/3, R 2/4


def test_thresholds_are_minimums_and_perplexity_a_maximum() -> None:
    from kubetune.evaluation import judge

    r = judge(
        {"bleu_4": 1.0, "perplexity": 900.0},
        {"bleu_4": 30.0, "perplexity": 40.0},
        {"bleu_4": 35, "perplexity": 50},
        ["bleu_4", "perplexity"],
    )
    assert not r.passed and r.failed == ["bleu_4 30 < minimum 35"]
    assert (r.scores["perplexity"].passed, r.scores["bleu_4"].passed) == (True, False)
    assert judge({"perplexity": 9.0}, {"perplexity": 60.0}, {"perplexity": 50}, ["perplexity"]).failed == [
        "perplexity 60 > maximum 50"
    ]


# ---------------------------------------------------------------- after training, and kubetune eval


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, KUBETUNE_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _write(job: Any, path: Path) -> Path:
    path.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


@pytest.fixture(scope="module")
def chinese_run(tmp_path_factory: pytest.TempPathFactory, train_job: Any) -> tuple[Any, Path, Path]:
    """`python -m kubetune_trainer` on 4 short Chat-甄嬛 rows (LoRA, learned by heart in 60 steps),
    evaluated on them: (job, job file, output directory)."""
    tmp = tmp_path_factory.mktemp("eval-zh")
    data = tmp / "huanhuan_4.json"
    data.write_text(json.dumps(SHORT_ROWS, ensure_ascii=False))
    job = train_job(
        tmp / "out", dataset={"uri": str(data)}, training={"max_steps": 60}, merge_adapter=False, name="zh"
    )
    job = job.model_validate(
        {
            **job.model_dump(mode="json", exclude_none=True),
            "spec": {
                **job.spec.model_dump(mode="json", exclude_none=True),
                "evaluation": {
                    "dataset": str(data), "max_new_tokens": 48,
                    "thresholds": {"bleu_4": 90, "exact_match": 75, "perplexity": 5000},
                },
            },
        }
    )  # fmt: skip
    config = _write(job, tmp / "job.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--workdir", str(tmp / "work")],
        capture_output=True, text=True, env=_env(tmp), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluation passed" in proc.stderr
    return job, config, tmp / "out"


def test_the_trainer_scores_the_trained_and_the_base_model_after_training(chinese_run: Any) -> None:
    job, _, out = chinese_run
    results = EvaluationResults.model_validate_json((out / "eval/results.json").read_text())
    assert results.passed and results.failed == [] and results.error is None
    assert (results.num_samples, results.max_new_tokens, results.bleu_tokenizer) == (4, 48, "zh")
    assert results.step == 60 and list(results.scores) == ["bleu_4", "rouge_l", "exact_match", "perplexity"]
    s = results.scores
    assert s["bleu_4"].trained == pytest.approx(100) and s["bleu_4"].base < 5
    assert s["exact_match"].trained == 100 and s["exact_match"].base == 0
    assert s["rouge_l"].trained == pytest.approx(100)
    assert s["perplexity"].trained < s["perplexity"].base  # learnt: less surprised by the replies
    assert (s["bleu_4"].threshold, s["bleu_4"].passed, s["rouge_l"].passed) == (90, True, None)
    lines = [
        json.loads(line) for line in (out / "eval/predictions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [line["reference"] for line in lines] == [r["output"] for r in SHORT_ROWS]
    assert [line["trained"] for line in lines] == [r["output"] for r in SHORT_ROWS]
    assert lines[0]["prompt"] == "<|im_start|>user\n皇上驾到！<|im_end|>\n<|im_start|>assistant\n"
    assert all(line["base"] != line["reference"] for line in lines)


def test_kubetune_eval_prints_base_vs_trained_and_fails_on_a_threshold(
    chinese_run: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune.cli import main

    job, config, out = chinese_run
    before = (out / "eval/predictions.jsonl").read_text(encoding="utf-8")
    assert main(["eval", str(config)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["metric", "base", "trained", "threshold"]
    assert table[1].split()[0] == "bleu_4" and table[1].split()[2:] == ["100.00", ">=", "90", "pass"]
    assert (out / "eval/predictions.jsonl").read_text(encoding="utf-8") == before  # greedy: deterministic

    doc = yaml.safe_load(config.read_text())
    doc["spec"]["evaluation"]["thresholds"] = {"perplexity": 1.5, "bleu_4": 90}
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(doc))
    assert main(["eval", str(tmp_path / "strict.yaml")]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in next(line for line in captured.out.splitlines() if line.startswith("perplexity"))
    assert (
        captured.err.startswith("kubetune: evaluation failed: perplexity ")
        and "> maximum 1.5" in captured.err
    )
    results = json.loads((out / "eval/results.json").read_text())
    assert results["passed"] is False and results["scores"]["perplexity"]["passed"] is False


def test_kubetune_eval_of_a_job_without_output_is_one_line(
    train_job: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kubetune.cli import main

    job = train_job(tmp_path / "never-ran", dataset={"validation_split": 0.25})
    assert main(["eval", str(_write(job, tmp_path / "job.yaml"))]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"kubetune: spec.output.uri: {tmp_path / 'never-ran'} has no trained model in final/ (adapter or "
        "merged): the job has not finished\n"
    )


def test_an_evaluation_that_cannot_run_is_recorded_not_fatal(chinese_run: Any, tmp_path: Path) -> None:
    from kubetune_trainer.evaluation import evaluate_after_training
    from kubetune_trainer.train import TrainResult

    job, _, out = chinese_run
    broken = job.model_copy(deep=True)
    broken.spec.evaluation.dataset = str(tmp_path / "missing.json")
    copy_out = tmp_path / "out"
    subprocess.run(["cp", "-r", str(out), str(copy_out)], check=True)
    result = TrainResult(
        output_dir=copy_out, checkpoint_dir=tmp_path, completed=True, global_step=60, max_steps=60,
        train_loss=None, first_loss=None, last_loss=None, eval_loss=None, trainable_params=0, total_params=0,
        tokens_seen=0, runtime_seconds=0.0,
    )  # fmt: skip
    results = evaluate_after_training(broken, result)
    assert results is not None and not results.passed
    assert "missing.json" in (results.error or "")
    on_disk = json.loads((copy_out / "eval/results.json").read_text())
    assert on_disk["passed"] is False and on_disk["error"] == results.error


def test_by_default_it_evaluates_the_rows_training_held_out_rendered_as_trained(
    train_job: Any, tmp_path: Path
) -> None:
    from kubetune_trainer.datasets_build import build_datasets, evaluation_examples
    from kubetune_trainer.evaluation import build_samples
    from kubetune_trainer.model_loading import load_tokenizer

    rows = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    data = tmp_path / "zh.json"
    data.write_text(json.dumps(rows, ensure_ascii=False))
    # long enough that no held-out sample loses its reply (training would drop it)
    job = train_job(
        tmp_path / "out", dataset={"uri": str(data), "validation_split": 0.2}, training={"seq_length": 512}
    )
    tok = load_tokenizer(job.spec, Path(job.spec.model.uri))
    built = build_datasets(job, tok, seed=job.spec.training.seed)
    from kubetune_trainer.chat_render import ChatRenderer

    renderer = ChatRenderer(tok, seq_length=job.spec.training.seq_length)
    samples = build_samples(evaluation_examples(job, 100), renderer, job.spec.training.seq_length)
    assert len(samples) == len(built.eval_dataset) == 4
    for sample, row in zip(samples, built.eval_dataset, strict=True):
        n = len(sample.prompt_ids) + len(sample.reference_ids)
        assert row["input_ids"][:n] == (sample.prompt_ids + sample.reference_ids)[: len(row["input_ids"])]
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        assert trained == sample.reference_ids[: len(trained)]  # the reply is exactly what training trained
    assert len(evaluation_examples(job, 2)) == 2  # num_samples: the first of them
