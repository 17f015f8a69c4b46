"""Loss masking: only assistant replies and their end-of-turn token are trained, in every turn.

The end token in the loss is what makes a fine-tuned model stop; these tests make the "model never
stops generating" bug impossible to reintroduce silently.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.chat_render import IGNORE_INDEX, ChatRenderer, Encoded
from kubetune_trainer.data_sources import DataError
from kubetune_trainer.datasets_build import build_datasets
from kubetune_trainer.formats import ASSISTANT, TOOL, USER, Example, Turn
from tests.fixtures_data import EXAMPLE_DATA, make_job, write_rows

CONV = Example(
    "chat",
    (
        Turn(USER, "What is 2+2?"),
        Turn(ASSISTANT, "It is 4."),
        Turn(USER, "And 3+3?"),
        Turn(TOOL, "calculator says 6"),
        Turn(ASSISTANT, "That makes 6.\nAnything else?"),
    ),
)
REPLIES = ["It is 4.", "That makes 6.\nAnything else?"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_END_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
REWRITING_TEMPLATE = (  # renders the last message differently from earlier ones
    "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def trained_spans(tok: Any, enc: Encoded) -> list[str]:
    spans, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    if cur:
        spans.append(tok.decode(cur, skip_special_tokens=False))
    return spans


def llama3_tokenizer(tokenizer: Any) -> Any:
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    tok.bos_token = "<|begin_of_text|>"
    tok.eos_token = "<|eot_id|>"
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def sentencepiece_like_tokenizer() -> Any:
    """A tokenizer with <s>/</s>, a BOS added by the tokenizer itself, and no ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, what is 2+2? it is 4. user assistant system"] * 5, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("use_template", [False, True])
def test_multi_turn_labels_are_exactly_the_replies_and_end_token(tokenizer: Any, use_template: bool) -> None:
    r = ChatRenderer(tokenizer, apply_chat_template=use_template, system_prompt="Be exact.")
    enc = r.encode(CONV)
    assert trained_spans(tokenizer, enc) == [f"{x}<|im_end|>" for x in REPLIES]
    # the end token closing every reply is in the loss
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert r.end_of_turn_token_ids()[0] == im_end == tokenizer.eos_token_id
    assert sum(1 for lab in enc.labels if lab == im_end) == 2
    # the first token is never a target and prompt tokens are -100
    assert enc.labels[0] == IGNORE_INDEX
    assert enc.trainable == sum(
        len(tokenizer(f"{x}<|im_end|>", add_special_tokens=False)["input_ids"]) for x in REPLIES
    )


def test_default_chatml_is_the_qwen_rendering(tokenizer: Any) -> None:
    r = ChatRenderer(tokenizer, system_prompt="Be exact.")
    text = "".join(t for t, _ in r.segments(CONV))
    msgs = [{"role": "system", "content": "Be exact."}] + [
        {"role": t.role, "content": t.content} for t in CONV.turns
    ]
    assert text == tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text.startswith(
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_llama3_style_template(tokenizer: Any) -> None:
    tok = llama3_tokenizer(tokenizer)
    r = ChatRenderer(tok, apply_chat_template=True)
    enc = r.encode(CONV)
    assert trained_spans(tok, enc) == [f"{x}<|eot_id|>" for x in REPLIES]
    assert tok.decode(enc.input_ids[:1]) == "<|begin_of_text|>"
    assert tok.convert_tokens_to_ids("<|eot_id|>") in r.end_of_turn_token_ids()


def test_template_without_end_token_gets_eos_in_the_loss(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NO_END_TEMPLATE
    enc = ChatRenderer(tok, apply_chat_template=True).encode(CONV)
    assert trained_spans(tok, enc) == [f"{x}<|im_end|>" for x in REPLIES]  # tok.eos_token appended


def test_tokenizer_without_chatml_tokens_ends_turns_with_eos_and_adds_bos() -> None:
    tok = sentencepiece_like_tokenizer()
    r = ChatRenderer(tok)
    enc = r.encode(CONV)
    assert trained_spans(tok, enc) == [f"{x}</s>" for x in REPLIES]
    assert enc.input_ids[0] == tok.bos_token_id
    assert r.end_of_turn_token_ids() == [tok.eos_token_id]
    pref = r.preference_row(Example("preference", (Turn(USER, "hi"),), chosen="a", rejected="b"))
    assert pref["chosen"] == "a</s>" and not pref["prompt"].startswith("<s>")  # TRL adds BOS itself

    # its own template writes the BOS: exactly one BOS, replies end with </s>
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    r = ChatRenderer(tok, apply_chat_template=True)
    enc = r.encode(CONV)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(tok.bos_token_id) == 1
    assert trained_spans(tok, enc) == [f"{x}</s>" for x in REPLIES]
    pref = r.preference_row(Example("preference", (Turn(USER, "hi"),), chosen="a", rejected="b"))
    # (jinja trim_blocks eats the newline after a block tag)
    assert pref == {"prompt": "[user] hi[assistant] ", "chosen": "a</s>", "rejected": "b</s>"}


def test_refuses_templates_that_rewrite_earlier_turns(tokenizer: Any) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = REWRITING_TEMPLATE
    with pytest.raises(DataError, match="set dataset.apply_chat_template to false"):
        ChatRenderer(tok, apply_chat_template=True).encode(CONV)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat_template"):
        ChatRenderer(tok, apply_chat_template=True)


def test_system_prompt_applied_and_row_system_wins(tokenizer: Any) -> None:
    r = ChatRenderer(tokenizer, system_prompt="You are Kubi.")
    text = tokenizer.decode(r.encode(CONV).input_ids)
    assert text.startswith("<|im_start|>system\nYou are Kubi.<|im_end|>\n")
    own = Example("chat", CONV.turns, system="Row system.")
    assert "Row system." in tokenizer.decode(r.encode(own).input_ids)
    assert "Kubi" not in tokenizer.decode(r.encode(own).input_ids)
    assert "system" not in tokenizer.decode(ChatRenderer(tokenizer).encode(CONV).input_ids)


def test_every_reply_in_a_real_dataset_ends_with_the_end_token(tokenizer: Any) -> None:
    """Over the whole shipped alpaca slice: one trained <|im_end|> per reply, as the last trained token."""
    job = make_job({"uri": str(EXAMPLE_DATA / "alpaca_en_200.json")}, training={"seq_length": 4096})
    built = build_datasets(job, tokenizer, seed=0)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert built.stats.samples == 200 and built.stats.truncated == 0
    for row in built.train_dataset:
        trained = [x for x in row["labels"] if x != IGNORE_INDEX]
        assert trained[-1] == im_end and trained.count(im_end) == 1
    assert built.end_of_turn_token_ids == [im_end]


def test_truncation_and_no_trainable_counted(tokenizer: Any, tmp_path: Path) -> None:
    long_reply = " ".join(["word"] * 300)
    rows = [
        {"instruction": "short", "input": "", "output": "ok"},
        {"instruction": "long answer please", "input": "", "output": long_reply},
        {"instruction": " ".join(["prompt"] * 300), "input": "", "output": "lost"},
    ]
    path = write_rows(tmp_path / "d.json", rows)
    built = build_datasets(make_job({"uri": str(path)}, training={"seq_length": 64}), tokenizer, seed=0)
    s = built.stats
    assert (s.truncated, s.no_trainable, s.samples) == (2, 1, 2)
    assert all(len(r["input_ids"]) <= 64 for r in built.train_dataset)
    with pytest.raises(DataError, match="no sample has a token to train on"):
        build_datasets(make_job({"uri": str(path)}, training={"seq_length": 8}), tokenizer, seed=0)


def test_dpo_rows_for_trl(tokenizer: Any) -> None:
    job = make_job(
        {"uri": str(EXAMPLE_DATA / "dpo_en_100.json"), "system_prompt": "Be kind.", "validation_split": 0.1},
        method="dpo",
    )
    built = build_datasets(job, tokenizer, seed=0)
    assert built.data_collator is None and built.method == "dpo"
    assert len(built.train_dataset) == 90 and len(built.eval_dataset) == 10
    assert built.train_dataset.column_names == ["prompt", "chosen", "rejected"]
    for row in built.train_dataset:
        assert row["prompt"].endswith("<|im_start|>assistant\n")
        assert row["chosen"].endswith("<|im_end|>") and row["rejected"].endswith("<|im_end|>")
    assert built.stats.samples == 90 and built.stats.eval_samples == 10
    # rows with their own system turn keep it; others get the spec's system prompt
    prompts = list(built.train_dataset["prompt"]) + list(built.eval_dataset["prompt"])
    assert any(p.startswith("<|im_start|>system\nBe kind.") for p in prompts)
    assert any(p.startswith("<|im_start|>system\n") and "Be kind." not in p for p in prompts)
    # as TRL tokenizes them: the prompt's tokens are a prefix of prompt+chosen, and the completion ends
    # with the end-of-turn token (so TRL adds no second EOS and DPO trains the model to stop)
    for row in built.train_dataset:
        p = tokenizer(row["prompt"])["input_ids"]
        for key in ("chosen", "rejected"):
            full = tokenizer(row["prompt"] + row[key])["input_ids"]
            assert full[: len(p)] == p and full[-1] == tokenizer.eos_token_id

    tok = llama3_tokenizer(tokenizer)
    r = ChatRenderer(tok, apply_chat_template=True)
    row = r.preference_row(Example("preference", (Turn(USER, "q"),), chosen="yes", rejected="no"))
    # this tokenizer does not add BOS by itself, so the template's BOS stays in the prompt text
    assert row == {
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "chosen": "yes<|eot_id|>",
        "rejected": "no<|eot_id|>",
    }
