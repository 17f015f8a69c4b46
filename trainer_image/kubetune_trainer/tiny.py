"""Tiny random-weight causal LMs of real architectures (Qwen2, Llama) and a real tokenizer, offline.

Nothing can be downloaded where kubetune is tested, so tests and the demo build a small model here,
save it as safetensors in Hugging Face layout and then load it through the same path a real model
takes. The tokenizer is a byte-level BPE trained in-process on a small corpus, with ChatML special
tokens and a chat template, so chat rendering and loss masking behave as with Qwen.

    python -m kubetune_trainer.tiny runs/tiny-qwen2 --arch qwen2
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SHARED_DATA = Path(__file__).resolve().parents[2] / "examples" / "data"


def _default_corpus() -> Iterator[str]:
    """Text to learn merges from: the shipped example data when present, else a built-in pangram set."""
    yielded = False
    if _SHARED_DATA.is_dir():
        for path in sorted(_SHARED_DATA.iterdir()):
            if path.suffix in (".json", ".jsonl", ".txt") and path.stat().st_size < 5_000_000:
                yielded = True
                yield path.read_text(encoding="utf-8", errors="replace")
    base = [
        "The quick brown fox jumps over the lazy dog.",
        "You are a helpful assistant. Answer the question briefly and clearly.",
        "user assistant system instruction input output response question answer",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } : ; , . ! ?",
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。甄嬛 皇上 娘娘 本宫",
    ]
    for _ in range(1 if yielded else 20):
        yield from base


def build_tokenizer(vocab_size: int = 2048, corpus: Iterable[str] | None = None):  # noqa: ANN201
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML tokens, pad = eos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _default_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
    )
    return fast


def build_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 2048,
    max_position_embeddings: int = 4096,
    seed: int = 0,
) -> Path:
    """Save a random-weight model + tokenizer in Hugging Face layout (safetensors) and return the dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or hidden_size * 3,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "llama":
        config = LlamaConfig(**common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use qwen2 or llama")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "kubetune-tiny.json").write_text(
        json.dumps({"arch": arch, "hidden_size": hidden_size, "num_layers": num_layers, "seed": seed}) + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune_trainer.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = build_tiny_model(
        a.out_dir, a.arch, a.hidden_size, a.layers, a.heads, a.kv_heads, vocab_size=a.vocab_size, seed=a.seed
    )
    print(f"tiny {a.arch} model written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
