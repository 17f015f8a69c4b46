"""The final export, in Hugging Face layout with safetensors, under the job's output directory.

- LoRA / QLoRA: ``final/adapter`` holds ``adapter_config.json`` + ``adapter_model.safetensors``
  (and the tokenizer), loadable with ``peft.PeftModel.from_pretrained(base, dir)``.
  With ``output.merge_adapter`` also ``final/merged``: the base with the adapter merged in, plus the
  tokenizer, loadable by plain ``AutoModelForCausalLM.from_pretrained``. For QLoRA the adapter is
  merged onto the *de-quantized* base (the 4-bit weights the adapter was trained against, expanded
  to the training dtype), so the merged model computes what the trained model computed.
- full / freeze: the trained model itself under ``final/merged`` (in the training dtype), with the
  tokenizer.

Only global rank 0 calls :func:`export_final`.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import methods
from kubetune.conventions import ADAPTER_DIR, MERGED_DIR
from kubetune_trainer.recipes.base import CAUSAL_LM, ModelHead

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJobSpec
    from kubetune_trainer.model_loading import Precision
    from kubetune_trainer.pet import PetPlan

log = logging.getLogger("kubetune.export")


def export_final(
    model: Any,
    tokenizer: Any,
    spec: FineTuneJobSpec,
    output_dir: Path,
    *,
    plan: PetPlan,
    precision: Precision,
    model_dir: Path,
    state_dict: dict[str, Any] | None = None,
    head: ModelHead | None = None,
) -> dict[str, Path]:
    """Write final/adapter and/or final/merged; returns {"adapter": dir, "merged": dir} as written.

    `model` is the trained (unwrapped) model; for LoRA with merge it is merged in place, so it is
    not usable for training afterwards. `state_dict`: the full weights when `model` is sharded
    (FSDP; gathered by every rank beforehand); LoRA is then merged onto a freshly loaded base, loaded
    as the method's `head` says (a reward model: with its score head, which the adapter holds).
    """
    written: dict[str, Path] = {}
    if plan.uses_adapter:
        adapter = _fresh_dir(output_dir / ADAPTER_DIR)
        from kubetune_trainer.pet import initial_adapter_dir

        initial = initial_adapter_dir(model)  # PiSSA/OLoRA: written as plain LoRA of the unchanged base
        # the base's embedding / output matrices stay out of the adapter even when LoRA targets them
        model.save_pretrained(
            adapter, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False,
            path_initial_model_for_weight_conversion=str(initial) if initial is not None else None,
        )  # fmt: skip
        save_tokenizer(tokenizer, spec, adapter)
        _record_base_model(adapter, spec.model.uri)
        written["adapter"] = adapter
        if not spec.output.merge_adapter:
            return written
        if plan.pet_type == "qlora" or state_dict is not None:
            merged_model = merge_onto_base(model_dir, adapter, plan, precision, head=head)
        else:
            merged_model = model.merge_and_unload()
        state_dict = None
    else:
        merged_model = model
        if state_dict is None:
            merged_model = model.to(precision.dtype)
        else:
            state_dict = {k: v.to(precision.dtype) for k, v in state_dict.items()}
    merged = _fresh_dir(output_dir / MERGED_DIR)
    merged_model.config.use_cache = True
    merged_model.save_pretrained(merged, state_dict=state_dict, safe_serialization=True)
    save_tokenizer(tokenizer, spec, merged)
    written["merged"] = merged
    return written


def save_tokenizer(tokenizer: Any, spec: FineTuneJobSpec, directory: Path) -> None:
    """Save the tokenizer with the chat template training rendered with (kubetune's ChatML or the
    tokenizer's own, with the job's system_prompt), so whatever prompts the export prompts it as trained."""
    from kubetune_trainer.chat_render import training_chat_template

    if not methods.method(spec.method).chat:  # plain text (pretrain): no conversation rendering to record
        tokenizer.save_pretrained(directory)
        return
    kept = tokenizer.chat_template
    tokenizer.chat_template = training_chat_template(
        tokenizer,
        apply_chat_template=spec.dataset.apply_chat_template,
        system_prompt=spec.dataset.system_prompt,
    )
    try:
        tokenizer.save_pretrained(directory)
    finally:
        tokenizer.chat_template = kept


def merge_onto_base(
    model_dir: Path, adapter_dir: Path, plan: PetPlan, precision: Precision, *, head: ModelHead | None = None
) -> Any:
    """Reload the base as in training (QLoRA: quantized the same way, then de-quantized) and merge
    the saved adapter into it."""
    import torch
    from peft import PeftModel

    head = head or CAUSAL_LM
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    base = head.model_class().from_pretrained(
        model_dir,
        **head.init_kwargs,
        dtype=precision.dtype,
        use_safetensors=True,
        quantization_config=plan.quantization_config,
        device_map={"": precision.device_type},
    )
    if plan.quantization_config is not None:
        base = base.dequantize(dtype=precision.dtype)
        if getattr(base.config, "quantization_config", None) is not None:
            del base.config.quantization_config
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def base_model_reference(uri: str) -> str:
    """What an adapter records as its base: a local model as an absolute path (peft resolves a
    relative one against the loader's directory), a hub model as its id, others as given."""
    from kubetune.uris import parse_uri

    u = parse_uri(uri)
    if u.scheme == "file":
        return str(Path(u.path).expanduser().absolute())
    if u.scheme == "hf":
        return f"{u.netloc}/{u.path}".strip("/") if u.netloc else u.path
    return uri


def _record_base_model(adapter_dir: Path, uri: str) -> None:
    config = adapter_dir / "adapter_config.json"
    doc = json.loads(config.read_text(encoding="utf-8"))
    doc["base_model_name_or_path"] = base_model_reference(uri)
    config.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
