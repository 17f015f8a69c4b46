"""FineTuneJob test data the validation and CRD tests share: the examples, a minimal job (BASE),
`set_field`, and the tables of bad fields and bad combinations with the field and words their one-line
error must carry (kubetune validate and the API server's CEL give the same)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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


DELETE = object()  # as a value: remove the field


def set_field(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


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
    ("model-missing", "spec.model", DELETE, "spec.model", "required field is missing"),
    ("output-missing", "spec.output", DELETE, "spec.output", "required field is missing"),
    ("dataset-missing", "spec.dataset", DELETE, "spec.dataset", "required field is missing"),
    ("typo-lora-rnak", "spec.pet_config", {"lora_rnak": 8}, "spec.pet_config.lora_rnak", "unknown field; did you mean 'lora_rank'?"),
    ("typo-learning-rate", "spec.training", {"learning_rat": 1e-4}, "spec.training.learning_rat", "did you mean 'learning_rate'?"),
    ("typo-top-level", "spec.pet_conifg", {"pet_type": "lora"}, "spec.pet_conifg", "did you mean 'pet_config'?"),
    ("unknown-field-no-hint", "spec.training", {"flux_capacitor": 1}, "spec.training.flux_capacitor", "unknown field"),
    ("method-unknown", "spec.method", "ppo", "spec.method", "must be one of 'sft', 'dpo', 'pretrain'"),
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
    ("init-lora-weights-loftq", "spec.pet_config.init_lora_weights", "loftq", "spec.pet_config.init_lora_weights", "must be one of true, 'gaussian', 'pissa', 'olora', got 'loftq'"),
    ("init-lora-weights-false", "spec.pet_config.init_lora_weights", False, "spec.pet_config.init_lora_weights", "must be one of true,"),
    ("gradient-checkpointing-yes", "spec.training.gradient_checkpointing", "yes", "spec.training.gradient_checkpointing", "must be one of true, false, 'offload', got 'yes'"),
    ("attn-implementation-unknown", "spec.training.attn_implementation", "flash", "spec.training.attn_implementation", "must be one of 'auto', 'sdpa', 'eager'"),
    ("neftune-alpha-zero", "spec.training.neftune_noise_alpha", 0, "spec.training.neftune_noise_alpha", "must be > 0"),
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
    ("dora-with-full", {"pet_config": {"pet_type": "full", "use_dora": True}}, "spec.pet_config.use_dora", "use_dora is a LoRA setting: it needs pet_type lora or qlora"),
    ("rslora-with-freeze", {"pet_config": {"pet_type": "freeze", "use_rslora": True}}, "spec.pet_config.use_rslora", "needs pet_type lora or qlora"),
    ("gaussian-init-with-full", {"pet_config": {"pet_type": "full", "init_lora_weights": "gaussian"}}, "spec.pet_config.init_lora_weights", "needs pet_type lora or qlora"),
    ("pissa-with-qlora", {"pet_config": {"pet_type": "qlora", "quantization": {"bits": 4}, "init_lora_weights": "pissa"}}, "spec.pet_config.init_lora_weights", "pissa needs the unquantized base weights"),
    ("olora-with-adapter-uri", {"model": {"uri": "s3://models/qwen", "adapter_uri": "s3://runs/sft/final/adapter"}, "pet_config": {"init_lora_weights": "olora"}}, "spec.pet_config.init_lora_weights", "model.adapter_uri continues a trained one"),
    ("olora-with-fsdp", {"pet_config": {"init_lora_weights": "olora"}, "parallel_config": {"strategy": "fsdp"}}, "spec.pet_config.init_lora_weights", "not supported with strategy fsdp"),
    ("offload-with-fsdp", {"training": {"gradient_checkpointing": "offload"}, "parallel_config": {"strategy": "fsdp"}}, "spec.training.gradient_checkpointing", "not supported with strategy fsdp"),
    ("streaming-without-max-steps", {"method": "pretrain", "dataset": {"uri": "s3://data/c4.jsonl", "streaming": True}}, "spec.training.max_steps", "needs training.max_steps"),
    ("streaming-with-sft", {"dataset": {"uri": "s3://data/a.json", "streaming": True}, "training": {"max_steps": 10}}, "spec.dataset.streaming", "pretrain only"),
    ("backoff-bounds", {"restart_policy": {"backoff_seconds": 600, "max_backoff_seconds": 60}}, "spec.restart_policy.max_backoff_seconds", ">= backoff_seconds"),
    ("model-without-uri-or-name", {"model": {"revision": "main"}}, "spec.model.uri", "or model.name for a model from the profile's catalog"),
]  # fmt: skip
