"""`kubetune validate`: every bad input fails with one line naming the document, field and problem."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli import main
from kubetune.validate import SpecError, load_jobs_text

EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml"))

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"uri": "s3://models/qwen"},
        "dataset": {"uri": "s3://data/alpaca.json"},
        "output": {"uri": "s3://runs/job"},
    },
}


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()

# (case id, path to set, value, expected field path, expected words in the message)
BAD_FIELDS = [
    ("lora-rank-zero", "spec.pet_config.lora_rank", 0, "spec.pet_config.lora_rank", "must be >= 1, got 0"),
    ("lora-rank-string", "spec.pet_config.lora_rank", "8", "spec.pet_config.lora_rank", "must be an integer, got '8'"),
    ("lora-rank-float", "spec.pet_config.lora_rank", 8.5, "spec.pet_config.lora_rank", "must be an integer"),
    ("lora-alpha-negative", "spec.pet_config.lora_alpha", -1, "spec.pet_config.lora_alpha", "must be >= 1"),
    ("lora-dropout-one", "spec.pet_config.lora_dropout", 1.0, "spec.pet_config.lora_dropout", "must be < 1"),
    ("pet-type-unknown", "spec.pet_config.pet_type", "prefix", "spec.pet_config.pet_type", "must be one of"),
    ("target-modules-int", "spec.pet_config.target_modules", 5, "spec.pet_config.target_modules", "must be a string or a list"),
    ("target-modules-bad-regex", "spec.pet_config.target_modules", "(q_proj", "spec.pet_config.target_modules", "not a valid regex"),
    ("target-modules-empty-list", "spec.pet_config.target_modules", [], "spec.pet_config.target_modules", "non-empty list"),
    ("target-modules-backreference", "spec.pet_config.target_modules", r"(q)\1_proj", "spec.pet_config.target_modules", "not a valid regex: invalid escape sequence: \\1 (module names are matched with RE2"),
    ("freeze-layers-zero", "spec.pet_config.freeze_trainable_layers", 0, "spec.pet_config.freeze_trainable_layers", ">= 1"),
    ("qlora-bits-3", "spec.pet_config.quantization", {"bits": 3}, "spec.pet_config.quantization.bits", "must be one of 4 or 8"),
    ("quant-type-int8", "spec.pet_config.quantization", {"quant_type": "int8"}, "spec.pet_config.quantization.quant_type", "one of 'nf4' or 'fp4'"),
    ("lr-negative", "spec.training.learning_rate", -2e-4, "spec.training.learning_rate", "must be > 0"),
    ("lr-zero", "spec.training.learning_rate", 0, "spec.training.learning_rate", "must be > 0"),
    ("lr-string", "spec.training.learning_rate", "fast", "spec.training.learning_rate", "must be a number, got 'fast'"),
    ("epochs-zero", "spec.training.num_train_epochs", 0, "spec.training.num_train_epochs", "must be > 0"),
    ("max-steps-zero", "spec.training.max_steps", 0, "spec.training.max_steps", "must be >= 1"),
    ("batch-zero", "spec.training.per_device_train_batch_size", 0, "spec.training.per_device_train_batch_size", ">= 1"),
    ("grad-accum-negative", "spec.training.gradient_accumulation_steps", -4, "spec.training.gradient_accumulation_steps", ">= 1"),
    ("seq-length-tiny", "spec.training.seq_length", 4, "spec.training.seq_length", "must be >= 8"),
    ("seq-length-text", "spec.training.seq_length", "1k", "spec.training.seq_length", "must be an integer, got '1k'"),
    ("packing-yes-string", "spec.training.packing", "yes", "spec.training.packing", "must be true or false"),
    ("precision-unknown", "spec.training.precision", "fp8", "spec.training.precision", "must be one of"),
    ("scheduler-unknown", "spec.training.lr_scheduler_type", "cosine_restarts", "spec.training.lr_scheduler_type", "must be one of"),
    ("warmup-ratio-one", "spec.training.warmup_ratio", 1.5, "spec.training.warmup_ratio", "must be < 1"),
    ("dpo-beta-zero", "spec.training.dpo_beta", 0, "spec.training.dpo_beta", "must be > 0"),
    ("seed-negative", "spec.training.seed", -1, "spec.training.seed", ">= 0"),
    ("nnodes-zero", "spec.parallel_config.nnodes", 0, "spec.parallel_config.nnodes", "must be >= 1, got 0"),
    ("nproc-zero", "spec.parallel_config.nproc_per_node", 0, "spec.parallel_config.nproc_per_node", ">= 1"),
    ("strategy-unknown", "spec.parallel_config.strategy", "deepspeed", "spec.parallel_config.strategy", "one of 'ddp' or 'fsdp'"),
    ("gpus-negative", "spec.resources.gpus", -1, "spec.resources.gpus", ">= 0"),
    ("memory-not-quantity", "spec.resources.memory", "lots", "spec.resources.memory", "not a Kubernetes quantity"),
    ("model-uri-gs", "spec.model.uri", "gs://bucket/model", "spec.model.uri", "unsupported scheme 'gs'"),
    ("model-uri-http", "spec.model.uri", "https://example.com/m", "spec.model.uri", "unsupported scheme 'https'"),
    ("model-uri-empty", "spec.model.uri", "", "spec.model.uri", "non-empty URI"),
    ("s3-bad-bucket", "spec.dataset.uri", "s3://A_B/x.json", "spec.dataset.uri", "invalid bucket name"),
    ("hf-no-org", "spec.model.uri", "hf://qwen", "spec.model.uri", "hf://org/name"),
    ("pvc-bad-claim", "spec.output.uri", "pvc://Bad_Claim/x", "spec.output.uri", "PersistentVolumeClaim name"),
    ("model-missing", "spec.model", _DELETE, "spec.model", "required field is missing"),
    ("output-missing", "spec.output", _DELETE, "spec.output", "required field is missing"),
    ("dataset-missing", "spec.dataset", _DELETE, "spec.dataset", "required field is missing"),
    ("typo-lora-rnak", "spec.pet_config", {"lora_rnak": 8}, "spec.pet_config.lora_rnak", "unknown field; did you mean 'lora_rank'?"),
    ("typo-learning-rate", "spec.training", {"learning_rat": 1e-4}, "spec.training.learning_rat", "did you mean 'learning_rate'?"),
    ("typo-top-level", "spec.pet_conifg", {"pet_type": "lora"}, "spec.pet_conifg", "did you mean 'pet_config'?"),
    ("unknown-field-no-hint", "spec.training", {"flux_capacitor": 1}, "spec.training.flux_capacitor", "unknown field"),
    ("method-unknown", "spec.method", "ppo", "spec.method", "must be one of 'sft', 'dpo' or 'pretrain'"),
    ("format-unknown", "spec.dataset.format", "csv", "spec.dataset.format", "must be one of"),
    ("validation-split-one", "spec.dataset.validation_split", 1.0, "spec.dataset.validation_split", "must be < 1"),
    ("on-bad-row-unknown", "spec.dataset.on_bad_row", "ignore", "spec.dataset.on_bad_row", "one of 'error' or 'skip'"),
    ("inline-secret-key", "spec.storage.s3", {"secret_access_key": "abc"}, "spec.storage.s3", "inline credentials"),
    ("inline-access-key", "spec.storage.s3", {"access_key_id": "AKIA"}, "spec.storage.s3", "credentials_secret"),
    ("s3-endpoint-no-scheme", "spec.storage.s3", {"endpoint": "minio:9000"}, "spec.storage.s3.endpoint", "http:// or https://"),
    ("keep-last-zero", "spec.checkpoint.keep_last", 0, "spec.checkpoint.keep_last", ">= 1"),
    ("every-steps-zero", "spec.checkpoint.every_steps", 0, "spec.checkpoint.every_steps", ">= 1"),
    ("grace-too-short", "spec.checkpoint.sigterm_grace_seconds", 1, "spec.checkpoint.sigterm_grace_seconds", ">= 5"),
    ("max-restarts-negative", "spec.restart_policy.max_restarts", -1, "spec.restart_policy.max_restarts", ">= 0"),
    ("suspend-string", "spec.suspend", "true", "spec.suspend", "must be true or false"),
    ("model-is-string", "spec.model", "s3://models/qwen", "spec.model", "must be a mapping"),
    ("mix-ratio-one", "spec.dataset.mix", [{"uri": "s3://data/x.json", "ratio": 1.0}], "spec.dataset.mix[0].ratio", "must be < 1"),
    ("pull-policy", "spec.image_pull_policy", "Sometimes", "spec.image_pull_policy", "must be one of"),
    # hostile specs: each must be refused, naming the field
    ("pvc-escapes-claim", "spec.model.uri", "pvc://claim/../../etc", "spec.model.uri", "must not contain '..' path segments"),
    ("pvc-escapes-claim-at-end", "spec.output.uri", "pvc://claim/runs/../..", "spec.output.uri", "'..' path segments"),
    ("s3-key-escapes-prefix", "spec.checkpoint.uri", "s3://runs/job/../../other", "spec.checkpoint.uri", "'..' path segments"),
    ("path-escapes-directory", "spec.dataset.uri", "../../etc/passwd", "spec.dataset.uri", "'..' path segments"),
    ("file-uri-escapes", "spec.model.tokenizer_uri", "file:///models/../etc", "spec.model.tokenizer_uri", "'..' path segments"),
    ("hf-id-escapes-cache", "spec.model.adapter_uri", "hf://org/..", "spec.model.adapter_uri", "'..' path segments"),
    ("mix-uri-escapes", "spec.dataset.mix", [{"uri": "pvc://data/a/../../../x", "ratio": 0.5}], "spec.dataset.mix[0].uri", "'..' path segments"),
    ("s3-endpoint-with-credentials", "spec.storage.s3", {"endpoint": "http://KEY:SECRET@minio:9000"}, "spec.storage.s3.endpoint", "must not hold credentials"),
    ("s3-endpoint-with-user", "spec.storage.s3", {"endpoint": "https://AKIAEXAMPLE@s3.example.com/"}, "spec.storage.s3.endpoint", "credentials_secret"),
    ("nnodes-a-billion", "spec.parallel_config.nnodes", 1000000000, "spec.parallel_config.nnodes", "must be <= 512, got 1000000000"),
    ("nproc-per-node-too-many", "spec.parallel_config.nproc_per_node", 65, "spec.parallel_config.nproc_per_node", "must be <= 64, got 65"),
]  # fmt: skip

# Cross-field rules: (case id, spec patch, expected field path, expected words)
BAD_COMBINATIONS = [
    ("qlora-without-quantization", {"pet_config": {"pet_type": "qlora"}}, "spec.pet_config.quantization", "needs a quantization block"),
    ("quantization-without-qlora", {"pet_config": {"pet_type": "lora", "quantization": {"bits": 4}}}, "spec.pet_config.quantization", "only used with pet_type qlora"),
    ("dpo-with-alpaca", {"method": "dpo", "dataset": {"uri": "s3://data/a.json", "format": "alpaca"}}, "spec.dataset.format", "dpo needs a preference dataset"),
    ("dpo-with-text", {"method": "dpo", "dataset": {"uri": "s3://data/a.txt", "format": "text"}}, "spec.dataset.format", "preference"),
    ("preference-with-sft", {"dataset": {"uri": "s3://data/p.json", "format": "preference"}}, "spec.dataset.format", "needs method dpo"),
    ("pretrain-with-chat", {"method": "pretrain", "dataset": {"uri": "s3://data/c.json", "format": "sharegpt"}}, "spec.dataset.columns.text", "map a text column"),
    ("sft-with-text", {"dataset": {"uri": "s3://data/c.txt", "format": "text"}}, "spec.dataset.format", "use method pretrain"),
    ("adapter-with-full", {"model": {"uri": "s3://models/qwen", "adapter_uri": "s3://runs/sft/final/adapter"}, "pet_config": {"pet_type": "full"}}, "spec.model.adapter_uri", "needs pet_type lora or qlora"),
    ("fsdp-with-qlora", {"pet_config": {"pet_type": "qlora", "quantization": {"bits": 4}}, "parallel_config": {"strategy": "fsdp"}}, "spec.parallel_config.strategy", "not supported with qlora"),
    ("streaming-without-max-steps", {"method": "pretrain", "dataset": {"uri": "s3://data/c4.jsonl", "streaming": True}}, "spec.training.max_steps", "needs training.max_steps"),
    ("streaming-with-sft", {"dataset": {"uri": "s3://data/a.json", "streaming": True}, "training": {"max_steps": 10}}, "spec.dataset.streaming", "pretrain only"),
    ("backoff-bounds", {"restart_policy": {"backoff_seconds": 600, "max_backoff_seconds": 60}}, "spec.restart_policy.max_backoff_seconds", ">= backoff_seconds"),
    ("model-without-uri-or-name", {"model": {"revision": "main"}}, "spec.model.uri", "or model.name for a model from the profile's catalog"),
]  # fmt: skip


def _with_affinity(yaml_lines: list[str]) -> str:
    """BASE with `yaml_lines` written as the body of spec.resources.affinity."""
    return (
        yaml.safe_dump(BASE)
        + "  resources:\n    affinity:\n"
        + "".join(f"      {line}\n" for line in yaml_lines)
    )


# Ten levels of ten aliases: 10**10 values once expanded, from a 1 KB file ("billion laughs").
ALIAS_BOMB = _with_affinity(
    ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
)

# Whole-document problems: (case id, file text, expected words)
BAD_DOCUMENTS = [
    ("empty-file", "", "empty file"),
    ("comments-only", "# nothing here\n", "empty file"),
    ("not-yaml", "spec: [unclosed\n  model: {", "not valid YAML at line"),
    ("tab-indented", "spec:\n\tmodel: x\n", "not valid YAML"),
    ("a-list", "- 1\n- 2\n", "must be a YAML mapping, got a list"),
    ("a-scalar", "hello\n", "must be a YAML mapping, got 'hello'"),
    ("wrong-kind", "apiVersion: batch/v1\nkind: Job\nmetadata: {name: x}\n", "not a FineTuneJob"),
    ("wrong-version", yaml.safe_dump({**BASE, "apiVersion": "kubetune.io/v2"}), "not a FineTuneJob"),
    ("bad-name", yaml.safe_dump({**BASE, "metadata": {"name": "Bad_Name"}}), "metadata.name"),
    ("name-with-a-dot", yaml.safe_dump({**BASE, "metadata": {"name": "qwen2.5-lora"}}), "metadata.name: must be a DNS-1123 label"),
    ("name-too-long", yaml.safe_dump({**BASE, "metadata": {"name": "j" * 64}}), "metadata.name: must be a DNS-1123 label: at most 63"),
    ("name-ends-with-dash", yaml.safe_dump({**BASE, "metadata": {"name": "lora-"}}), "metadata.name: must be a DNS-1123 label"),
    ("no-spec", yaml.safe_dump({k: v for k, v in BASE.items() if k != "spec"}), "spec: required field is missing"),
    # hostile documents: refused before anything walks them
    ("alias-bomb", ALIAS_BOMB, "refused: the document expands to more than 10000 values"),
    ("alias-bomb-of-text", _with_affinity(["t: &t " + "x" * 60000, "l: [" + ", ".join(["*t"] * 20) + "]"]), "1 MiB of text"),
    ("recursive-alias", _with_affinity(["a: &a {b: *a}"]), "refused: a YAML alias refers to a node that contains it"),
    ("deep-nesting", "spec: " + "[" * 100000 + "]" * 100000 + "\n", "refused: the document nests deeper than 64 levels"),
]  # fmt: skip


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_jobs_text(text, "job.yaml")
    return [str(p) for p in e.value.problems]


def test_there_are_at_least_40_distinct_bad_inputs() -> None:
    ids = [c[0] for c in BAD_FIELDS + BAD_COMBINATIONS + BAD_DOCUMENTS]
    assert len(ids) == len(set(ids)) >= 40


@pytest.mark.parametrize("case,path,value,field,words", BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
def test_bad_field(case: str, path: str, value: Any, field: str, words: str) -> None:
    lines = _problems(yaml.safe_dump(_set(BASE, path, value)))
    assert any(line.startswith(f"job.yaml (job): {field}: ") and words in line for line in lines), lines


@pytest.mark.parametrize("case,patch,field,words", BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS])
def test_bad_combination(case: str, patch: dict[str, Any], field: str, words: str) -> None:
    doc = copy.deepcopy(BASE)
    doc["spec"].update(patch)
    lines = _problems(yaml.safe_dump(doc))
    assert any(f": {field}: " in line and words in line for line in lines), lines


@pytest.mark.parametrize("case,text,words", BAD_DOCUMENTS, ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_document(case: str, text: str, words: str) -> None:
    lines = _problems(text)
    assert any(line.startswith("job.yaml") and words in line for line in lines), lines


def test_render_refuses_an_alias_bomb_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert main(["render", str(bomb)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{bomb}: refused: the document expands to more than 10000 values")


def test_minimal_job_gets_defaults() -> None:
    (job,) = load_jobs_text(yaml.safe_dump(BASE))
    assert job.spec.method == "sft"
    assert job.spec.pet_config.pet_type == "lora"
    assert job.spec.parallel_config.nnodes == 1
    assert job.spec.checkpoint_uri() == "s3://runs/job/checkpoints"


def test_scientific_notation_is_a_number_like_in_kubernetes() -> None:
    # PyYAML alone reads `2e-4` as a string; users write it this way and Kubernetes reads a number.
    text = yaml.safe_dump(BASE).replace("spec:\n", "spec:\n  training: {learning_rate: 2e-4}\n", 1)
    (job,) = load_jobs_text(text)
    assert job.spec.training.learning_rate == pytest.approx(2e-4)


def test_multi_document_names_each_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = yaml.safe_dump(BASE)
    bad = yaml.safe_dump(_set(_set(BASE, "metadata.name", "second"), "spec.parallel_config.nnodes", 0))
    f = tmp_path / "jobs.yaml"
    f.write_text(good + "---\n" + bad)
    assert main(["validate", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{f}#2 (second): spec.parallel_config.nnodes: must be >= 1, got 0"]


def test_every_problem_is_reported_not_just_the_first() -> None:
    doc = _set(_set(BASE, "spec.pet_config.lora_rank", 0), "spec.training.learning_rate", -1.0)
    lines = _problems(yaml.safe_dump(doc))
    assert len(lines) == 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    assert main(["validate", "-q", str(path)]) == 0


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_set(BASE, "spec.pet_config.lora_rank", 0)))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(bad), *map(str, EXAMPLES)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if ": warning: " not in line]  # ./runs/tiny-qwen2
    assert errors == [f"{bad} (job): spec.pet_config.lora_rank: must be >= 1, got 0"]
    ok = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", *map(str, EXAMPLES)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr


def test_validate_warns_about_local_paths_that_do_not_exist(tmp_path: Path) -> None:
    model = tmp_path / "models" / "tiny"
    model.mkdir(parents=True)
    doc = _set(_set(BASE, "spec.model.uri", str(model)), "spec.dataset.uri", "data/train.jsonl")
    doc = _set(doc, "spec.model.adapter_uri", "/opt/adapters/sft")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    run = subprocess.run(
        [sys.executable, "-m", "kubetune", "validate", str(job)], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr  # a warning: the path may be meant for inside the image
    assert run.stdout.strip() == f"{job}: job: valid (sft, lora)"
    assert run.stderr.splitlines() == [
        f"{job} (job): spec.model.adapter_uri: warning: /opt/adapters/sft does not exist on this machine; "
        "fine if it is a path inside the trainer image",
        f"{job} (job): spec.dataset.uri: warning: data/train.jsonl does not exist here (a relative path is "
        f"read from the current directory, now {tmp_path}); fine if it is a path inside the trainer image",
    ]


def test_validate_reads_local_data_and_names_the_bad_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    data = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": "Capital of France?", "chosen": "Paris"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = _set(_set(BASE, "spec.method", "dpo"), "spec.dataset", {"uri": str(data), "format": "preference"})
    job = tmp_path / "dpo.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert "prefs.jsonl row 2: field 'rejected'" in err and "spec.dataset" in err
    assert main(["validate", "--no-data", str(job)]) == 0
