"""The FineTuneJob API (kubetune.io/v1alpha1): one pydantic model, the single source of truth.

The CRD schema (`kubetune crd`), `kubetune validate`, the operator and the trainer all read it.
Field names follow the words users already know from the seeds (pet_config, lora_rank, ...).
Descriptions become `kubectl explain` text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubetune import methods as _methods
from kubetune.evaluation import METRICS, Metric, MetricScore
from kubetune.uris import CRD_PATTERN, DOT_DOT_CEL, DOT_DOT_MESSAGE, parse_uri

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune", "ml"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"


class _Model(BaseModel):
    # strict: YAML `rank: "8"` is a mistake worth reporting, not coercing.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False, populate_by_name=True)


def _uri_field(description: str, **kw: Any) -> Any:
    extra = {
        "pattern": CRD_PATTERN,
        "x-kubernetes-validations": [{"rule": DOT_DOT_CEL, "message": DOT_DOT_MESSAGE}],
    }
    return Field(description=description, json_schema_extra=extra, **kw)


def _check_uri(value: str | None) -> str | None:
    if value is not None:
        parse_uri(value)
    return value


# ---------------------------------------------------------------- model


class ModelSource(_Model):
    uri: str | None = _uri_field(
        "Base model in Hugging Face layout (config.json + safetensors): s3://bucket/prefix, "
        "file:///path or a plain path, pvc://claim/path, or hf://org/name where the hub is reachable. "
        "Optional when model.name picks a model from the profile's catalog.",
        default=None,
    )
    name: str | None = Field(
        None,
        description="A model from the profile's catalog (FineTuneProfile spec.models): its uri and "
        "recommended settings become this job's defaults.",
        min_length=1,
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hf:// models.")
    tokenizer_uri: str | None = _uri_field(
        "Tokenizer location when it differs from the model's.", default=None
    )
    adapter_uri: str | None = _uri_field(
        "A LoRA adapter (e.g. a kubetune SFT output .../final/adapter) loaded onto the base and trained "
        "further: how DPO starts from an SFT adapter.",
        default=None,
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless needed."
    )

    _uris = field_validator("uri", "tokenizer_uri", "adapter_uri")(_check_uri)


# ---------------------------------------------------------------- dataset

# The values come from the one table of methods and formats (kubetune/methods.py).
DatasetFormat = Literal[_methods.FORMAT_NAMES]  # type: ignore[valid-type]


class ColumnMapping(_Model):
    """Names of the columns in the user's data, when they differ from the format's defaults."""

    instruction: str | None = Field(
        None, description="alpaca: the instruction column (default 'instruction')."
    )
    input: str | None = Field(None, description="alpaca: the optional input column (default 'input').")
    output: str | None = Field(None, description="alpaca: the response column (default 'output').")
    system: str | None = Field(
        None, description="alpaca/sharegpt: a per-row system prompt column (default 'system')."
    )
    history: str | None = Field(
        None, description="alpaca: earlier [instruction, response] turns (default 'history')."
    )
    conversations: str | None = Field(
        None, description="sharegpt: the turns column (default 'conversations')."
    )
    messages: str | None = Field(None, description="messages: the turns column (default 'messages').")
    text: str | None = Field(None, description="text (pre-training): the text column (default 'text').")
    prompt: str | None = Field(None, description="preference: the prompt column (default 'prompt').")
    chosen: str | None = Field(
        None, description="preference: the preferred answer column (default 'chosen')."
    )
    rejected: str | None = Field(
        None, description="preference: the dispreferred answer column (default 'rejected')."
    )
    completion: str | None = Field(
        None, description="unpaired_preference: the reply column (default 'completion')."
    )
    label: str | None = Field(
        None,
        description="unpaired_preference: the column saying the reply is desirable, true/false (default 'label').",
    )


class DataSource(_Model):
    uri: str = _uri_field(
        "Data file or directory: JSON, JSONL, parquet, CSV, plain text (.txt) or a `datasets` save_to_disk "
        "directory; s3://, file://, pvc:// or a path."
    )
    format: DatasetFormat = Field(
        "auto",
        description=f"Row format. {_methods.auto_format_description()}",
    )
    columns: ColumnMapping | None = Field(
        None, description="Column names when they differ from the format's defaults."
    )

    _uris = field_validator("uri")(_check_uri)


class MixSource(DataSource):
    ratio: float = Field(
        description="Share of the training samples drawn from this source (0 < ratio < 1).", gt=0, lt=1
    )


class Dataset(DataSource):
    system_prompt: str | None = Field(None, description="System prompt put before every conversation.")
    apply_chat_template: bool = Field(
        False,
        description="Render conversations with the tokenizer's own chat template; otherwise kubetune's ChatML default.",
    )
    validation_split: float = Field(
        0.0, ge=0, lt=1, description="Fraction of rows held out for evaluation loss (0 disables evaluation)."
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="A malformed row stops the job with its file, row and field named, or is skipped and counted.",
    )
    streaming: bool = Field(
        False, description="pretrain: read text lazily instead of loading it into memory."
    )
    mix: list[MixSource] = Field(
        default_factory=list,
        description="Other sources mixed into the training data by ratio (e.g. SFT data into pretrain).",
    )


# ---------------------------------------------------------------- method


class Quantization(_Model):
    bits: Literal[4, 8] = Field(4, description="Load the frozen base in 4-bit or 8-bit (bitsandbytes).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True, description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the de-quantized matmuls; auto follows training.precision."
    )


PetType = Literal["none", "full", "freeze", "lora", "qlora"]


def compile_module_regex(pattern: str) -> Any:
    """A module-name regex compiled with RE2, which matches in time linear in the name: a pattern
    such as '(.*.*)*q_projX' would keep Python's backtracking `re` busy for hours.
    Raises ValueError saying why RE2 refuses it (back-references and look-around it cannot do)."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the reason is in the exception; RE2 would also print it to stderr
    try:
        return re2.compile(pattern, options=options)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(
            f"is not a valid regex: {reason} (module names are matched with RE2: no back-references "
            "or look-around)"
        ) from None


class PetConfig(_Model):
    pet_type: PetType = Field(
        "lora",
        description="none/full: train every weight. freeze: train only the last layers or named modules. "
        "lora: low-rank adapters on a frozen base. qlora: lora on a 4/8-bit quantized base.",
    )
    lora_rank: int = Field(8, ge=1, le=4096, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, description="LoRA scaling alpha (update scaled by alpha/r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: a regex over module names such as '.*q_proj|.*v_proj', "
        "a list of names, or 'all-linear'.",
        json_schema_extra={"x-kubetune-string-or-list": True},
    )
    freeze_trainable_layers: int = Field(
        2, ge=1, description="freeze: number of last decoder layers left trainable."
    )
    freeze_trainable_modules: list[str] = Field(
        default_factory=list,
        description="freeze: module name patterns left trainable instead of the last layers.",
    )
    quantization: Quantization | None = Field(None, description="qlora: how the frozen base is quantized.")
    use_dora: bool = Field(
        False,
        description="lora/qlora: DoRA (peft use_dora): each adapted weight is split into a magnitude per output "
        "feature, trained, and a direction that LoRA updates; closer to full fine-tuning at low ranks, slower steps.",
    )
    use_rslora: bool = Field(
        False,
        description="lora/qlora: rank-stabilised LoRA (peft use_rslora): the update is scaled by "
        "lora_alpha/sqrt(lora_rank) instead of lora_alpha/lora_rank, so high ranks still learn.",
    )
    init_lora_weights: Literal[True, "gaussian", "pissa", "olora"] = Field(
        True,
        description="lora/qlora: how a new adapter starts (peft init_lora_weights). true: A random, B zero (the "
        "model starts as the base). gaussian: A Gaussian, B zero. pissa: A and B from each weight's principal "
        "singular vectors, taken out of the base weight (needs an unquantized base: pet_type lora). olora: A and "
        "B from a QR decomposition of each weight, likewise taken out. final/adapter is converted to a plain LoRA "
        "adapter of the unchanged base.",
        json_schema_extra={"x-kubetune-scalar-enum": [True, "gaussian", "pissa", "olora"]},
    )

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list):
            if not v or any(not m.strip() for m in v):
                raise ValueError("must be a non-empty list of module names")
        elif v != "all-linear":
            compile_module_regex(v)
        return v

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init(cls, v: Any) -> Any:
        return _scalar_choice(v, (True, "gaussian", "pissa", "olora"))


def _scalar_choice(v: Any, choices: tuple[Any, ...]) -> Any:
    """`v` when it is one of `choices` (booleans and strings, compared with their type: 1 is not true)."""
    if any(type(v) is type(c) and v == c for c in choices):
        return v
    shown = ", ".join(str(c).lower() if isinstance(c, bool) else repr(c) for c in choices)
    raise ValueError(f"must be one of {shown}, got {v!r}")


# ---------------------------------------------------------------- training


class Training(_Model):
    learning_rate: float = Field(2e-4, gt=0, le=1, description="Peak learning rate (AdamW).")
    num_train_epochs: float = Field(
        3.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Total optimizer steps; overrides num_train_epochs."
    )
    per_device_train_batch_size: int = Field(1, ge=1, description="Samples per process per micro-step.")
    per_device_eval_batch_size: int = Field(1, ge=1, description="Samples per process per evaluation step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    seq_length: int = Field(
        1024, ge=8, le=1048576, description="Maximum tokens per sample (longer samples are truncated)."
    )
    packing: bool = Field(
        False,
        description="Pack several samples into one sequence of seq_length tokens, best fit first (rows come "
        "out about 0.99 full); samples never attend to each other and are never split (a pre-training "
        "document longer than seq_length is cut into seq_length pieces). Not used by method dpo.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch samples of similar length together (transformers' length-grouped sampler, "
        "shuffled by the seed each epoch) so batches carry less padding; exact on resume. For unpacked "
        "sft and pretrain data (packed rows are all about seq_length long).",
    )
    gradient_checkpointing: bool | Literal["offload"] = Field(
        False,
        description="Recompute activations in backward to save memory. offload: also keep the activations saved "
        "for the recompute in pinned host memory instead of on the GPU (transformers' activation offloading, "
        "torch save_on_cpu); frees layers x seq_length x hidden bytes of GPU memory for slower steps. CUDA only.",
        json_schema_extra={"x-kubetune-scalar-enum": [True, False, "offload"]},
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Weights/compute precision. auto: bf16 on GPUs that support it and on CPUs with native "
        "bf16 (AMX or AVX512-BF16 flags), else fp32. bf16 autocasts the compute and keeps trainable weights "
        "(full, freeze) and LoRA adapters in fp32.",
    )
    optimizer: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "sgd"] = Field(
        "auto",
        description="Optimizer. auto: AdamW, fused (adamw_torch_fused: one kernel for all parameters) on CUDA "
        "GPUs, adamw_torch on CPU.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps used for linear warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Warm-up steps (overrides warmup_ratio when > 0).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    seed: int = Field(42, ge=0, description="Seed for weights init of adapters, data order and dropout.")
    logging_steps: int = Field(1, ge=1, description="Log loss every N optimizer steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (default: once per epoch)."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="Data-loading worker processes per rank.")
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune (transformers neftune_noise_alpha): uniform noise of scale alpha/sqrt(tokens x "
        "hidden) added to the input embeddings in training steps only (evaluation and the exported model see "
        "none); 5 to 15 is typical for instruction tuning.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel the model is loaded with (from_pretrained attn_implementation). auto: "
        "transformers' choice (sdpa where the model supports it). flash_attention_2 needs a CUDA GPU, the "
        "flash-attn package and bf16/fp16; with packing it trains padding-free (a batch is one row of its "
        "samples, varlen kernels). flex_attention needs a torch that has it and a CUDA GPU (no backward on CPU).",
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels (transformers use_liger_kernel): fused RMSNorm, RoPE, SwiGLU and "
        "fused linear cross-entropy for the model's architecture, for less memory and faster steps. Needs a "
        "CUDA GPU and the liger-kernel package.",
    )

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, v: Any) -> Any:
        return _scalar_choice(v, (True, False, "offload"))

    simpo_beta: float = Field(
        2.0, gt=0, description="simpo: scale of the length-normalised reward (TRL's beta; paper: 2.0 to 2.5)."
    )
    simpo_gamma: float = Field(
        1.0, ge=0, description="simpo: target reward margin the chosen reply must beat the rejected one by."
    )
    cpo_alpha: float = Field(
        0.0, ge=0, description="simpo: weight of CPO's SFT loss on the chosen replies (0: pure SimPO)."
    )
    reward_center_coefficient: float | None = Field(
        None, ge=0, description="reward: weight of a term pulling the rewards toward mean zero (e.g. 0.01)."
    )
    dpo_beta: float = Field(
        0.1, gt=0, description="dpo: strength of the pull toward the reference model (0.1 to 0.5)."
    )

    dpo_loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="dpo: preference loss.")
    dpo_sft_weight: float = Field(
        0.0, ge=0, description="dpo: weight of an added SFT loss on the chosen answers."
    )
    kto_beta: float = Field(
        0.1, gt=0, description="kto: strength of the pull toward the reference model (0.1 to 0.5)."
    )
    kto_desirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of the desirable replies' loss (raise it when they are fewer)."
    )
    kto_undesirable_weight: float = Field(
        1.0, gt=0, description="kto: weight of the undesirable replies' loss (raise it when they are fewer)."
    )
    orpo_beta: float = Field(
        0.1,
        gt=0,
        description="orpo: weight of the odds-ratio term beside the SFT loss on the chosen answers.",
    )


# ---------------------------------------------------------------- cluster


class ParallelConfig(_Model):
    # Upper bounds keep a typo (nnodes: 1000000000) from becoming that many pods at admission.
    nnodes: int = Field(1, ge=1, le=512, description="Nodes (pods) in the gang, at most 512.")
    nproc_per_node: int | None = Field(
        None, ge=1, le=64, description="Processes per node, at most 64; default: GPUs per node, or 1 on CPU."
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: replicate the model; fsdp: shard weights, gradients and optimizer state across the "
        "gang's processes (FSDP2, GPUs or CPU), with sharded checkpoints.",
    )
    max_worker_restarts: int = Field(
        1,
        ge=0,
        description="torchrun --max-restarts: in-pod restarts of crashed worker processes before the pod fails.",
    )


def _is_quantity(v: str) -> str:
    import re

    if not re.fullmatch(r"(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", v):
        raise ValueError(f"is not a Kubernetes quantity such as '4', '500m' or '16Gi', got {v!r}")
    return v


class ScratchVolume(_Model):
    size: str = Field(description="Size of each pod's scratch volume (Kubernetes quantity), e.g. 500Gi.")
    storage_class: str | None = Field(
        None, description="StorageClass of the volume; the cluster's default class when omitted."
    )

    @field_validator("size")
    @classmethod
    def _quantity(cls, v: str) -> str:
        return _is_quantity(v)


class Resources(_Model):
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per node.")
    cpu: str = Field("4", description="CPU request and limit per node (Kubernetes quantity).")
    memory: str = Field("16Gi", description="Memory request and limit per node (Kubernetes quantity).")
    shm_size: str = Field("2Gi", description="Size of /dev/shm for data-loader workers and NCCL.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    affinity: dict[str, Any] | None = Field(None, description="Pod affinity.")
    priority_class_name: str | None = Field(None, description="Pod priorityClassName.")
    service_account_name: str | None = Field(None, description="Service account of the trainer pods.")
    scratch_size: str = Field(
        "100Gi",
        description="Node-local scratch per pod (/tmp: the downloaded model, local checkpoints, caches): the "
        "pod's ephemeral-storage request and limit and the scratch emptyDir's sizeLimit, so the scheduler "
        "places pods where the model fits. Size it to about 2x the model's files plus one checkpoint.",
    )
    scratch_volume: ScratchVolume | None = Field(
        None,
        description="Scratch on a generic ephemeral volume (a fresh PersistentVolumeClaim per pod, deleted "
        "with it) instead of the node's ephemeral storage: for models larger than a node's disk.",
    )

    @field_validator("cpu", "memory", "shm_size", "scratch_size")
    @classmethod
    def _quantity(cls, v: str) -> str:
        return _is_quantity(v)


_INLINE_SECRET_KEYS = {
    "access_key", "access_key_id", "secret_key", "secret_access_key", "aws_access_key_id",
    "aws_secret_access_key", "session_token", "password", "token", "secret",
}  # fmt: skip


_ENDPOINT_SCHEME_MESSAGE = "must be an http:// or https:// URL"
# The endpoint is copied into the ConfigMap and the pods' env, so user:password@ there would publish it.
_ENDPOINT_USERINFO_MESSAGE = (
    "must not hold credentials (user:password@host); store them in a Secret and set credentials_secret"
)


class S3Storage(_Model):
    endpoint: str | None = Field(
        None,
        description="S3 endpoint URL for MinIO, SeaweedFS, Ceph RGW ...; empty for AWS.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.matches('^https?://')", "message": _ENDPOINT_SCHEME_MESSAGE},
                {"rule": "!self.matches('^[^/]*//[^/?#]*@')", "message": _ENDPOINT_USERINFO_MESSAGE},
            ]
        },
    )
    region: str = Field("us-east-1", description="S3 region.")
    credentials_secret: str | None = Field(
        None,
        description="Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(optionally AWS_SESSION_TOKEN). Omit to use the pod's own identity (IRSA, workload identity).",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field("path", description="S3 addressing style.")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_credentials(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower() in _INLINE_SECRET_KEYS:
                    raise ValueError(
                        f"inline credentials ({key!r}) are not allowed; store them in a Secret and set credentials_secret"
                    )
        return data

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{_ENDPOINT_SCHEME_MESSAGE}, got {v!r}")
        from urllib.parse import urlsplit

        if "@" in urlsplit(v).netloc:
            raise ValueError(_ENDPOINT_USERINFO_MESSAGE)  # the value itself is a secret: not echoed
        return v


class Storage(_Model):
    s3: S3Storage | None = Field(None, description="How to reach s3:// URIs.")


class Checkpoint(_Model):
    uri: str | None = _uri_field("Where checkpoints go; default <output.uri>/checkpoints.", default=None)
    every_steps: int = Field(100, ge=1, description="Save a checkpoint every N optimizer steps.")
    every_minutes: float | None = Field(
        None, gt=0, description="Also save when this many minutes passed since the last save."
    )
    keep_last: int = Field(
        2, ge=1, description="Committed checkpoints kept; older ones are pruned (never the newest)."
    )
    sigterm_grace_seconds: int = Field(
        25,
        ge=5,
        le=3600,
        description="On SIGTERM (preemption), time allowed to save and commit a checkpoint.",
    )
    upload_timeout_seconds: int = Field(
        900,
        ge=5,
        le=86400,
        description="At the end of training, the one budget for committing the last checkpoint and uploading "
        "the output while the store is slow or unreachable; then the run fails saying what is not uploaded.",
    )
    on_spec_change: Literal["refuse", "start_over"] = Field(
        "refuse",
        description="When the newest checkpoint was made by a different model/method/data spec: refuse to resume, "
        "or ignore old checkpoints and start over.",
    )

    _uris = field_validator("uri")(_check_uri)


class Output(_Model):
    uri: str = _uri_field(
        "The job's output prefix: final/ (adapter and merged model), progress.json, metrics.jsonl, loss.png "
        "and, by default, checkpoints/."
    )
    merge_adapter: bool = Field(
        False, description="Also write the base model with the adapter merged in (final/merged)."
    )

    _uris = field_validator("uri")(_check_uri)


_METRIC_NAMES = ", ".join(METRICS[:-1]) + f" or {METRICS[-1]}"
_THRESHOLD_KEY_MESSAGE = f"every threshold must be for a metric: {_METRIC_NAMES}"
_THRESHOLD_RANGE_MESSAGE = (
    "bleu_4, rouge_l and exact_match thresholds are scores from 0 to 100; perplexity thresholds at least 1"
)


class Evaluation(_Model):
    """Scores of the trained model against the base model after training, and the thresholds that gate it."""

    metrics: list[Metric] = Field(
        default_factory=lambda: list(METRICS),
        min_length=1,
        description="bleu_4 (sacrebleu, Chinese tokenized per character), rouge_l (F1, CJK per character) and "
        "exact_match on greedy generations, 0 to 100; perplexity from the loss on the reference replies.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    dataset: str | None = _uri_field(
        "Evaluation data, read with dataset.format and dataset.columns; default: the rows "
        "dataset.validation_split holds out.",
        default=None,
    )
    max_new_tokens: int = Field(128, ge=1, le=8192, description="Tokens generated per sample at most.")
    num_samples: int = Field(50, ge=1, le=100000, description="Samples evaluated (the first of the data).")
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per metric, the score the trained model must reach: a minimum for bleu_4, rouge_l and "
        "exact_match (0 to 100), a maximum for perplexity. The Evaluated condition is True when all are met.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.all(k, k in " + repr(list(METRICS)) + ")", "message": _THRESHOLD_KEY_MESSAGE},
                {
                    "rule": "self.all(k, k == 'perplexity' ? double(self[k]) >= 1.0 "
                    ": (double(self[k]) >= 0.0 && double(self[k]) <= 100.0))",
                    "message": _THRESHOLD_RANGE_MESSAGE,
                },
            ]
        },
    )

    _uris = field_validator("dataset")(_check_uri)

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        twice = sorted({m for m in v if v.count(m) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return v

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in v if k not in METRICS]
        if unknown:
            raise ValueError(f"{_THRESHOLD_KEY_MESSAGE}, got {', '.join(map(repr, unknown))}")
        if any(not (v[k] >= 1 if k == "perplexity" else 0 <= v[k] <= 100) for k in v):
            raise ValueError(_THRESHOLD_RANGE_MESSAGE)
        return v


_TRACKING_URI_SCHEME_MESSAGE = "must be an http:// or https:// URL, or databricks"
_TRACKING_URI_USERINFO_MESSAGE = (
    "must not hold credentials (user:password@host); store them in a Secret and set credentials_secret"
)


class MLflowTracking(_Model):
    tracking_uri: str = Field(
        description="The MLflow tracking server (http:// or https://), or databricks.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "self.matches('^(https?://|databricks)')", "message": _TRACKING_URI_SCHEME_MESSAGE},
                {"rule": "!self.matches('^[^/]*//[^/?#]*@')", "message": _TRACKING_URI_USERINFO_MESSAGE},
            ]
        },
    )
    experiment: str | None = Field(
        None,
        min_length=1,
        description="Experiment of the run (created if missing); MLflow's Default when omitted.",
    )
    credentials_secret: str | None = Field(
        None,
        description="Secret in the job's namespace with keys MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
        "or MLFLOW_TRACKING_TOKEN; the pods get them as environment variables.",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri(cls, v: str) -> str:
        if not v.startswith(("http://", "https://", "databricks")):
            raise ValueError(f"{_TRACKING_URI_SCHEME_MESSAGE}, got {v!r}")
        from urllib.parse import urlsplit

        if "@" in urlsplit(v).netloc:
            raise ValueError(_TRACKING_URI_USERINFO_MESSAGE)  # the value itself is a secret: not echoed
        return v


class WandbTracking(_Model):
    project: str = Field(min_length=1, description="W&B project of the run.")
    api_key_secret: str | None = Field(
        None, description="Secret in the job's namespace with key WANDB_API_KEY (the pods' environment)."
    )
    mode: Literal["online", "offline"] = Field(
        "online",
        description="online: stream to W&B; offline: write the run under <output>/wandb (wandb sync it).",
    )


class Tracking(_Model):
    tensorboard: bool = Field(
        False, description="Write TensorBoard event files to <output>/tensorboard (one log dir per job)."
    )
    mlflow: MLflowTracking | None = Field(None, description="Log params and metrics to an MLflow run.")
    wandb: WandbTracking | None = Field(None, description="Log to a Weights & Biases run.")


class RestartPolicy(_Model):
    max_restarts: int = Field(
        3,
        ge=0,
        description="Gang restarts after failures before the job is Failed (preemptions do not count).",
    )
    backoff_seconds: int = Field(10, ge=0, description="Wait before the first restart; doubles each restart.")
    max_backoff_seconds: int = Field(300, ge=0, description="Upper bound of the restart wait.")
    unknown_timeout_seconds: int = Field(
        300,
        ge=10,
        description="A pod whose node stopped reporting (Ready False or Unknown for a node reason) this long "
        "is force-deleted and the gang restarts (NodeLost, not counted against max_restarts).",
    )
    pending_timeout_seconds: int = Field(
        900,
        ge=0,
        description="A gang not fully scheduled and started this long after its attempt began is Stalled "
        "(Unschedulable, WaitingForAdmission, an image error), with an Event; it keeps waiting. 0 disables.",
    )
    max_preemptions: int = Field(
        20,
        ge=0,
        description="Uncounted restarts (preemption, eviction by drain, node loss) allowed before the job "
        "is Failed (TooManyPreemptions).",
    )
    progress_timeout_seconds: int = Field(
        1800,
        ge=0,
        description="A Running gang whose training step has not advanced this long is restarted "
        "(NoProgress, counted). 0 disables.",
    )


Method = Literal[_methods.METHOD_NAMES]  # type: ignore[valid-type]

# Names kubetune itself gives the trainer pod: a profile or job `pod` block cannot take them.
RESERVED_ENV_PREFIX = "KUBETUNE_"
RESERVED_ENV = {"MASTER_ADDR", "MASTER_PORT", "HOME", "PYTHONUNBUFFERED"}
RESERVED_VOLUMES = {"config", "scratch", "dshm", "s3-credentials"}
RESERVED_MOUNT_PATHS = ("/tmp", "/dev/shm", "/etc/kubetune", "/var/run/secrets/kubetune")
RESERVED_LABEL_PREFIXES = ("kubetune.io/", "app.kubernetes.io/")


def _named(items: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    for i, item in enumerate(items):
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise ValueError(f"[{i}]: every {what} needs a name")
    return items


class PodSettings(_Model):
    """Pod-level additions to every trainer pod, set by a profile (FineTuneProfile spec.pod) or the job."""

    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets (in the job's namespace) for pulling the trainer image."
    )
    env: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Extra environment variables of the trainer container (Kubernetes EnvVar), e.g. HF_TOKEN "
        "from a Secret with valueFrom.secretKeyRef.",
    )
    env_from: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra envFrom sources (Kubernetes EnvFromSource)."
    )
    volumes: list[dict[str, Any]] = Field(default_factory=list, description="Extra pod volumes.")
    volume_mounts: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra volume mounts of the trainer container."
    )
    runtime_class_name: str | None = Field(None, description="Pod runtimeClassName (e.g. nvidia).")
    scheduler_name: str | None = Field(None, description="Pod schedulerName.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in _named(v, "variable"):
            if item["name"].startswith(RESERVED_ENV_PREFIX) or item["name"] in RESERVED_ENV:
                raise ValueError(f"{item['name']} is set by kubetune itself")
        return v

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in _named(v, "volume"):
            if item["name"] in RESERVED_VOLUMES or item["name"].startswith("pvc-"):
                raise ValueError(f"volume name {item['name']} is kubetune's own; choose another")
        return v

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in _named(v, "volume mount"):
            path = str(item.get("mountPath") or "")
            if not path.startswith("/"):
                raise ValueError(f"volume mount {item['name']} needs an absolute mountPath")
            if any(path == r or path.startswith(r + "/") for r in RESERVED_MOUNT_PATHS):
                raise ValueError(f"mountPath {path} is kubetune's own")
        return v

    @field_validator("labels", "annotations")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(f"{key} is set by kubetune itself")
        return v


class FineTuneJobSpec(_Model):
    profile: str | None = Field(
        None,
        description="The FineTuneProfile whose defaults, pod settings, limits and model catalog apply; "
        'when omitted, the profile annotated kubetune.io/default-profile: "true" (if any).',
        min_length=1,
    )
    model: ModelSource = Field(description="The base model.")
    dataset: Dataset = Field(description="The training data.")
    method: Method = Field(
        "sft",
        description=_methods.method_description(),
    )
    pet_config: PetConfig = Field(
        default_factory=PetConfig, description="Which weights train: full, freeze, LoRA or QLoRA."
    )
    training: Training = Field(default_factory=Training, description="Training hyper-parameters.")
    parallel_config: ParallelConfig = Field(
        default_factory=ParallelConfig, description="Gang shape and parallelism."
    )
    resources: Resources = Field(default_factory=Resources, description="Per-node resources and scheduling.")
    image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, description="Trainer image.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Trainer image pull policy."
    )
    storage: Storage = Field(default_factory=Storage, description="Object store settings for s3:// URIs.")
    pod: PodSettings | None = Field(
        None,
        description="Pod-level additions (pull secrets, env, volumes, runtime class ...), appended after "
        "the profile's.",
    )
    checkpoint: Checkpoint = Field(default_factory=Checkpoint, description="Checkpointing and resume.")
    output: Output = Field(description="Where results go.")
    evaluation: Evaluation | None = Field(
        None,
        description="After training, generate with the trained and the base model, score both (eval/results.json, "
        "eval/predictions.jsonl) and set the Evaluated condition from the thresholds.",
    )
    tracking: Tracking = Field(
        default_factory=Tracking,
        description="Experiment tracking (TensorBoard, MLflow, W&B); a restarted job continues the same run.",
    )
    restart_policy: RestartPolicy = Field(
        default_factory=RestartPolicy, description="Gang restarts on failure."
    )
    suspend: bool = Field(
        False,
        description="true: delete the pods and keep checkpoints; false again: resume (Kueue's protocol).",
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Wall-clock limit from the first attempt's start: past it the job is Failed "
        "(DeadlineExceeded) and its pods are deleted. Suspended time counts.",
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Delete the FineTuneJob this long after it Succeeded or Failed (its pods, Service and "
        "ConfigMaps go with it); outputs and checkpoints in the store stay.",
    )

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        problems = [(rule.path, rule.message) for rule in CROSS_FIELD_RULES if not rule.check(self)]
        if problems:
            raise CrossFieldError(problems)
        return self

    def checkpoint_uri(self) -> str:
        from kubetune.locations import default_checkpoint_uri

        return self.checkpoint.uri or default_checkpoint_uri(self.output.uri)

    def dataset_format(self) -> str:
        """The format dataset.uri is read as (kubetune.methods.main_format: `auto` resolved where the method
        decides it; `auto` where the first row decides)."""
        return _methods.main_format(self.method, self.dataset.format)

    def training_fields(self) -> dict[str, Any]:
        """The fields that change what a checkpoint means (model, data, method, weights trained) and
        what the steps after it do (optimizer, learning-rate schedule, batch): a checkpoint written
        with others is not resumed silently."""
        keep = self.model_dump(
            include={"model", "dataset", "method", "pet_config"},
            mode="json",
        )
        keep["training"] = self.training.model_dump(
            include={
                "seq_length", "packing", "seed", "precision", "dpo_beta", "dpo_loss_type", "dpo_sft_weight",
                "kto_beta", "kto_desirable_weight", "kto_undesirable_weight", "orpo_beta",
                "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay",
                "max_grad_norm", "optimizer", "per_device_train_batch_size", "gradient_accumulation_steps",
                "simpo_beta", "simpo_gamma", "cpo_alpha", "reward_center_coefficient",
            },
            mode="json",
        )  # fmt: skip
        keep["parallel_strategy"] = self.parallel_config.strategy
        return keep

    def uri_fields(self) -> list[tuple[str, str]]:
        """(field, URI) for every URI set in the spec, e.g. ("spec.dataset.mix[1].uri", "s3://..."). Found
        by the pattern the CRD gives URI fields, so a URI field added later is seen by all that reads them."""
        out: list[tuple[str, str]] = []

        def walk(model: BaseModel, path: str) -> None:
            for name, info in type(model).model_fields.items():
                value, where = getattr(model, name), f"{path}.{name}"
                extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
                if isinstance(value, str) and extra.get("pattern") == CRD_PATTERN:
                    out.append((where, value))
                elif isinstance(value, BaseModel):
                    walk(value, where)
                elif isinstance(value, list):
                    for i, item in enumerate(value):
                        if isinstance(item, BaseModel):
                            walk(item, f"{where}[{i}]")

        walk(self, "spec")
        return out

    def training_hash(self) -> str:
        """Hash of `training_fields`."""
        return hashlib.sha256(json.dumps(self.training_fields(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- cross-field rules
#
# Each rule is stated once, in CEL for the API server and in Python for `kubetune validate`;
# a test evaluates both on the same objects so they cannot drift.


class CrossFieldError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


class Rule:
    def __init__(self, scope: str, path: str, cel: str, message: str, check: Any) -> None:
        self.scope = scope  # where the CEL rule sits in the CRD: "spec" or a field under it
        self.path = path  # the field the message is about
        self.cel = cel
        self.message = message
        self.check = check


# spec.method x spec.dataset.format, generated from the table of methods (kubetune/methods.py)
_FORMAT_RULES = [Rule("spec", r.path, r.cel, r.message, r.check) for r in _methods.format_rules()]
# methods whose data has no replies to compare an evaluation's generations with
_NO_REPLIES = tuple(m.name for m in _methods.METHODS.values() if not m.chat)
# methods that train a model which does not generate (a reward model): nothing to evaluate
_NO_GENERATION = tuple(m.name for m in _methods.METHODS.values() if not m.generates)

# pet_config fields that configure LoRA adapters, each refused with another pet_type: (field, CEL "at default")
_LORA_ONLY = [
    ("use_dora", "!has(self.use_dora) || !self.use_dora", lambda p: not p.use_dora),
    ("use_rslora", "!has(self.use_rslora) || !self.use_rslora", lambda p: not p.use_rslora),
    (
        "init_lora_weights",
        "!has(self.init_lora_weights) || (type(self.init_lora_weights) == bool && self.init_lora_weights)",
        lambda p: p.init_lora_weights is True,
    ),
]
_LORA_ONLY_RULES = [
    Rule(
        "spec.pet_config", f"spec.pet_config.{name}",
        f"self.pet_type in ['lora', 'qlora'] || {cel}",
        f"{name} is a LoRA setting: it needs pet_type lora or qlora",
        lambda s, unset=unset: s.pet_config.pet_type in ("lora", "qlora") or unset(s.pet_config),
    )
    for name, cel, unset in _LORA_ONLY
]  # fmt: skip

CROSS_FIELD_RULES: list[Rule] = [
    Rule(
        "spec", "spec.model.uri",
        "has(self.model.uri) || has(self.model.name)",
        "set model.uri, or model.name for a model from the profile's catalog",
        lambda s: s.model.uri is not None or s.model.name is not None,
    ),
    Rule(
        "spec.pet_config", "spec.pet_config.quantization",
        "self.pet_type != 'qlora' || has(self.quantization)",
        "pet_type qlora needs a quantization block (bits: 4 or 8)",
        lambda s: s.pet_config.pet_type != "qlora" or s.pet_config.quantization is not None,
    ),
    Rule(
        "spec.pet_config", "spec.pet_config.quantization",
        "!has(self.quantization) || self.pet_type == 'qlora'",
        "quantization is only used with pet_type qlora",
        lambda s: s.pet_config.quantization is None or s.pet_config.pet_type == "qlora",
    ),
    *_FORMAT_RULES,
    Rule(
        "spec", "spec.model.adapter_uri",
        "!has(self.model.adapter_uri) || !has(self.pet_config) || !has(self.pet_config.pet_type) "
        "|| self.pet_config.pet_type in ['lora', 'qlora']",
        "adapter_uri continues a LoRA adapter and needs pet_type lora or qlora; for full or freeze fine-tuning "
        "use the SFT run's final/merged model as model.uri",
        lambda s: s.model.adapter_uri is None or s.pet_config.pet_type in ("lora", "qlora"),
    ),
    Rule(
        "spec", "spec.parallel_config.strategy",
        "!has(self.parallel_config) || !has(self.parallel_config.strategy) || self.parallel_config.strategy != 'fsdp' "
        "|| !has(self.pet_config) || !has(self.pet_config.pet_type) || self.pet_config.pet_type != 'qlora'",
        "strategy fsdp is not supported with qlora; use ddp",
        lambda s: s.parallel_config.strategy != "fsdp" or s.pet_config.pet_type != "qlora",
    ),
    *_LORA_ONLY_RULES,
    Rule(
        "spec.pet_config", "spec.pet_config.init_lora_weights",
        "!has(self.init_lora_weights) || self.pet_type != 'qlora' || type(self.init_lora_weights) != string "
        "|| self.init_lora_weights != 'pissa'",
        "init_lora_weights pissa needs the unquantized base weights (peft cannot decompose 4/8-bit ones): use "
        "pet_type lora, or init_lora_weights olora with qlora",
        lambda s: not (s.pet_config.pet_type == "qlora" and s.pet_config.init_lora_weights == "pissa"),
    ),
    Rule(
        "spec", "spec.pet_config.init_lora_weights",
        "!has(self.model.adapter_uri) || !has(self.pet_config) || !has(self.pet_config.init_lora_weights) "
        "|| (type(self.pet_config.init_lora_weights) == bool && self.pet_config.init_lora_weights)",
        "init_lora_weights sets how a new adapter starts; model.adapter_uri continues a trained one: leave "
        "init_lora_weights at true",
        lambda s: s.model.adapter_uri is None or s.pet_config.init_lora_weights is True,
    ),
    Rule(
        "spec", "spec.pet_config.init_lora_weights",
        "!has(self.pet_config) || !has(self.pet_config.init_lora_weights) "
        "|| type(self.pet_config.init_lora_weights) != string || !(self.pet_config.init_lora_weights in ['pissa', 'olora']) "
        "|| !has(self.parallel_config) || !has(self.parallel_config.strategy) || self.parallel_config.strategy != 'fsdp'",
        "init_lora_weights pissa and olora are not supported with strategy fsdp (their adapter is converted for export "
        "from the unsharded model): use ddp",
        lambda s: s.pet_config.init_lora_weights not in ("pissa", "olora") or s.parallel_config.strategy != "fsdp",
    ),
    Rule(
        "spec", "spec.training.gradient_checkpointing",
        "!has(self.training) || !has(self.training.gradient_checkpointing) "
        "|| type(self.training.gradient_checkpointing) != string || !has(self.parallel_config) "
        "|| !has(self.parallel_config.strategy) || self.parallel_config.strategy != 'fsdp'",
        "gradient_checkpointing offload is not supported with strategy fsdp (FSDP checkpoints activations itself): "
        "use true",
        lambda s: s.training.gradient_checkpointing != "offload" or s.parallel_config.strategy != "fsdp",
    ),
    Rule(
        "spec", *_methods.fsdp_rule(),
        lambda s: s.parallel_config.strategy != "fsdp" or not _methods.method(s.method).no_fsdp,
    ),
    Rule(
        "spec", *_methods.streaming_rule(),
        lambda s: not s.dataset.streaming or _methods.method(s.method).streaming,
    ),
    Rule(
        "spec", "spec.training.max_steps",
        "!self.dataset.streaming || has(self.training.max_steps)",
        "dataset.streaming needs training.max_steps (a stream has no known length)",
        lambda s: not s.dataset.streaming or s.training.max_steps is not None,
    ),
    Rule(
        "spec.evaluation", "spec.evaluation.thresholds",
        "!has(self.thresholds) || !has(self.metrics) || self.thresholds.all(k, k in self.metrics)",
        "every threshold must be for a metric listed in evaluation.metrics",
        lambda s: s.evaluation is None or all(k in s.evaluation.metrics for k in s.evaluation.thresholds),
    ),
    Rule(
        "spec", "spec.evaluation.dataset",
        "!has(self.evaluation) || has(self.evaluation.dataset) "
        "|| (has(self.dataset.validation_split) && self.dataset.validation_split > 0.0)",
        "evaluation needs evaluation.dataset, or dataset.validation_split > 0 to evaluate on the held-out rows",
        lambda s: s.evaluation is None or s.evaluation.dataset is not None or s.dataset.validation_split > 0,
    ),
    Rule(
        "spec", "spec.evaluation.metrics",
        f"!has(self.evaluation) || !(self.method in {_methods.cel_list(_NO_REPLIES)}) "
        "|| (has(self.evaluation.metrics) && self.evaluation.metrics.all(m, m == 'perplexity'))",
        f"method {_methods.join_or(_NO_REPLIES)} has no replies to compare generations with: evaluate it with "
        "metrics [perplexity]",
        lambda s: s.evaluation is None or s.method not in _NO_REPLIES or s.evaluation.metrics == ["perplexity"],
    ),
    Rule(
        "spec", "spec.evaluation",
        f"!has(self.evaluation) || !(self.method in {_methods.cel_list(_NO_GENERATION)})",
        f"method {_methods.join_or(_NO_GENERATION)} trains a model that scores replies and does not generate them: "
        "remove spec.evaluation (the held-out pairs' preference accuracy is eval_accuracy in metrics.jsonl)",
        lambda s: s.evaluation is None or s.method not in _NO_GENERATION,
    ),
    Rule(
        "spec.restart_policy", "spec.restart_policy.max_backoff_seconds",
        "!has(self.max_backoff_seconds) || !has(self.backoff_seconds) || self.max_backoff_seconds >= self.backoff_seconds",
        "max_backoff_seconds must be >= backoff_seconds",
        lambda s: s.restart_policy.max_backoff_seconds >= s.restart_policy.backoff_seconds,
    ),
]  # fmt: skip

# Rules that change a running job's meaning: the API server rejects edits (transition rules).
IMMUTABLE_FIELDS = (
    "model",
    "dataset",
    "method",
    "pet_config",
    "training",
    "parallel_config",
    "checkpoint",
    "output",
)


# ---------------------------------------------------------------- status


class Condition(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="Ready, Reconciling, Stalled, Running, Succeeded, Failed or Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="CamelCase reason.")
    message: str = Field("", description="Human-readable detail.")
    lastTransitionTime: str | None = Field(None, description="When status last changed (RFC 3339).")
    observedGeneration: int | None = Field(None, description="Generation the condition was computed for.")


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps in the run.")
    percent: int = Field(0, description="step / total_steps in percent.")
    summary: str | None = Field(None, description="Short form for `kubectl get`, e.g. '40% (120/300)'.")
    epoch: float = Field(0.0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Training throughput over the whole gang.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end.")
    rewards: dict[str, float] | None = Field(
        None, description="dpo, simpo ...: latest mean rewards (chosen, rejected, margins, accuracies)."
    )
    metrics: dict[str, float] | None = Field(
        None,
        description="The method's other logged values, latest (kto: kl; orpo: log_odds_ratio, nll_loss; reward: "
        "accuracy, margin, eval_accuracy ...).",
    )
    state: str | None = Field(None, description="Trainer state: running, saving, done, failed.")


class CheckpointRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    uri: str = Field(description="URI of the newest committed checkpoint.")
    step: int = Field(description="Its global step.")


class ProfileRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="The FineTuneProfile applied.")
    resourceVersion: str | None = Field(
        None, description="Its resourceVersion when the job first reconciled."
    )
    hash: str | None = Field(None, description="Digest of the effective spec (profile merged with the job).")
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="The profile's spec as of the job's first reconcile: later edits of the profile do not "
        "change this job.",
    )


class Reason:
    """Reasons of the job's conditions and Events, as the state machine sets them (kubectl wait,
    Argo CD health and alerts match on them). The failure classes are described in the operator's
    state.py; a phase's own name (Running, Succeeded, Failed, Suspended) is also a reason."""

    # starting, running, finishing
    CREATED = "Created"  # Event: the first attempt starts
    RESUMED = "Resumed"  # Event: spec.suspend became false
    RESTARTED = "Restarted"  # Event: the next attempt starts after a restart
    CREATING_PODS = "CreatingPods"
    CLEANING = "Cleaning"  # waiting for a previous attempt's pods to go
    PODS_RUNNING = "PodsRunning"
    COMPLETED = "Completed"
    IDLE = "Idle"  # Reconciling is False
    # waiting for pods
    WAITING_FOR_PODS = "WaitingForPods"
    WAITING_FOR_ADMISSION = "WaitingForAdmission"  # scheduling gates (Kueue)
    UNSCHEDULABLE = "Unschedulable"
    PENDING_TIMEOUT = "PendingTimeout"  # restart_policy.pending_timeout_seconds passed
    IMAGE_ERROR = "ImageError"  # a stuck container waiting reason without a name of its own
    STALLED = "Stalled"  # Event: the job cannot progress without someone acting
    # suspending, restarting
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    RESTARTING = "Restarting"
    BACKING_OFF = "BackingOff"
    SPEC_CHANGED = "SpecChanged"  # a pod-shaping field edited while the attempt was Pending
    SPEC_EDITED = "SpecEdited"  # ChangesPending is True
    NO_CHANGES = "None"  # ChangesPending is False
    # why an attempt ended (Trouble)
    POD_DELETED = "PodDeleted"
    POD_FAILED = "PodFailed"
    USER_ERROR = "UserError"
    OOM_KILLED = "OOMKilled"
    EVICTED = "Evicted"
    DISRUPTED = "Disrupted"
    PREEMPTED = "Preempted"
    TERMINATED = "Terminated"
    NODE_LOST = "NodeLost"
    NO_OUTPUT = "NoOutput"
    NO_PROGRESS = "NoProgress"
    # Failed
    FAILED = "Failed"  # Event
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    MAX_RESTARTS_EXCEEDED = "MaxRestartsExceeded"
    TOO_MANY_PREEMPTIONS = "TooManyPreemptions"
    INVALID_SPEC = "InvalidSpec"


# Reasons of the Evaluated condition, set once a job with spec.evaluation Succeeded.
EVALUATED_PASSED = "ThresholdsPassed"  # True: every threshold met
EVALUATED_NO_THRESHOLDS = "NoThresholds"  # True: scored, nothing to gate on
EVALUATED_FAILED = "ThresholdFailed"  # False: the message names the thresholds not met
EVALUATED_ERROR = "EvaluationError"  # False: the evaluation could not run (e.g. unreadable evaluation data)
EVALUATED_MISSING = "ResultsMissing"  # False: the output has no eval/results.json
EVALUATED_UNAVAILABLE = "ResultsUnavailable"  # Unknown: the operator cannot read the output (pvc://, errors)
EVALUATION_RETRY_SECONDS = 300  # a store error when the results are read: read again for this long


class EvaluationStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    passed: bool | None = Field(
        None,
        description="Every threshold met (the Evaluated condition); none when the results were unreadable.",
    )
    reason: str = Field(description="The Evaluated condition's reason.")
    message: str = Field("", description="The thresholds not met, or what went wrong.")
    scores: dict[str, MetricScore] = Field(
        default_factory=dict, description="Per metric: base and trained scores, threshold, passed."
    )
    num_samples: int | None = Field(None, description="Samples evaluated.")
    results: str | None = Field(None, description="URI of eval/results.json.")
    retry_until: str | None = Field(
        None,
        description="The results could not be read (a store error): the operator reads again until then.",
    )


Phase = Literal["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]


class FineTuneJobStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    phase: Phase | None = Field(
        None, description="Pending, Running, Restarting, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="kstatus conditions plus job conditions."
    )
    observedGeneration: int | None = Field(None, description="The spec generation this status reflects.")
    attempt: int = Field(0, description="Current gang attempt (1 for the first).")
    restarts: int = Field(0, description="Gang restarts after failures (preemptions excluded).")
    preemptions: int = Field(0, description="Gang restarts after preemption (exit 'preempted, resumable').")
    last_restart_reason: str | None = Field(None, description="Why the gang last restarted.")
    progress: Progress | None = Field(
        None, description="Training progress read from the trainer's progress.json."
    )
    last_checkpoint: CheckpointRef | None = Field(None, description="The newest committed checkpoint.")
    output: str | None = Field(None, description="Where the final model was written, once Succeeded.")
    start_time: str | None = Field(None, description="When the first attempt started.")
    completion_time: str | None = Field(None, description="When the job Succeeded or Failed.")
    restart_after: str | None = Field(
        None, description="While Restarting: the next attempt starts at this time (restart backoff)."
    )
    message: str | None = Field(None, description="Latest human-readable message.")
    attempt_start_time: str | None = Field(
        None,
        description="When the current attempt's pods were created (restart_policy.pending_timeout_seconds).",
    )
    active_since: str | None = Field(
        None, description="Start of the active_deadline_seconds clock: the first start or the last resume."
    )
    applied_spec: dict[str, str] | None = Field(
        None,
        description="Digests of the pod-shaping fields (image, resources, storage ...) the current attempt runs.",
    )
    pending_changes: list[str] | None = Field(
        None, description="Spec fields edited while the attempt runs; they take effect at the next attempt."
    )
    progress_advanced_at: str | None = Field(
        None, description="When the training step last advanced (restart_policy.progress_timeout_seconds)."
    )
    profile: ProfileRecord | None = Field(
        None, description="The profile snapshot this job runs with (taken at its first reconcile)."
    )
    evaluation: EvaluationStatus | None = Field(
        None, description="spec.evaluation's scores from eval/results.json, once the job Succeeded."
    )


# ---------------------------------------------------------------- the resource


# A job's name is the kubetune.io/job label value on all its objects (at most 63 characters) and the
# stem of its pods' hostnames and its Service name, which are DNS labels: a dot can never work there,
# and 63 keeps `-l kubetune.io/job=<name>` exact (naming.py cuts and hashes only the derived names).
JOB_NAME_MESSAGE = (
    "metadata.name must be a DNS-1123 label: at most 63 lowercase letters, digits or '-', starting and "
    "ending with a letter or digit (it names the job's pods, their hostnames and its Service)"
)
JOB_NAME_CEL = (
    "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')"
)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        import re

        if len(v) > 63 or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", v):
            raise ValueError(f"{JOB_NAME_MESSAGE.removeprefix('metadata.name ')}, got {v!r}")
        return v


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    apiVersion: Literal["kubetune.io/v1alpha1"]
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace or "default"


__all__ = [
    "API_VERSION", "KIND", "FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus", "CROSS_FIELD_RULES",
    "IMMUTABLE_FIELDS",
]  # fmt: skip
