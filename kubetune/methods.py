"""The training methods (``spec.method``) and the dataset formats (``spec.dataset.format``): one table.

Pure data, no torch: the spec's cross-field rules (CEL for the API server and Python for ``kubetune
validate``, generated here by :func:`format_rules`), the resolution of ``dataset.format: auto``
(:func:`main_format`), the trainer's format detection (``kubetune_trainer.formats.detect_format``)
and the trainer's recipes (``kubetune_trainer/recipes/<method>.py``, one per row, a test checks the
two agree) all read it. ``spec.pet_config`` (full / freeze / LoRA / QLoRA: which weights train) is a
separate axis, in ``kubetune_trainer/pet.py``.

Adding a method: a row in :data:`METHODS`, its recipe module, its spec fields and an example job.
Adding a data format: a row in :data:`FORMATS`, its parser in ``kubetune_trainer.formats.PARSERS``
and, for new columns, fields in ``spec.ColumnMapping``.
"""

from __future__ import annotations

from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class Format:
    """One value of ``dataset.format``."""

    name: str
    label: str  # what the rows are, in messages: "preference data", "plain text"
    # ColumnMapping fields whose columns all being present identify the format (auto detection)
    columns: tuple[str, ...]


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", "instruction data", ("instruction", "output")),
        Format("sharegpt", "sharegpt conversations", ("conversations",)),
        Format("messages", "chat messages", ("messages",)),
        Format("text", "plain text", ("text",)),
        Format("preference", "preference data", ("chosen", "rejected")),
        Format("unpaired_preference", "unpaired preference data", ("completion", "label")),
    )
}


@dataclass(frozen=True)
class Method:
    """One value of ``spec.method`` and what it asks of the data and the trainer."""

    name: str
    summary: str  # spec.method's description: "sft: supervised fine-tuning"
    # dataset.format values it reads (besides auto), in the order auto detection tries them
    formats: tuple[str, ...]
    # what `auto` means for dataset.uri: this format, or None: detected from the first row's columns
    auto_format: str | None
    # formats it also reads: dataset.mix sources in them as given (e.g. SFT data mixed into
    # pre-training), dataset.uri only through a mapped dataset.columns.text (read as text)
    text_column_formats: tuple[str, ...]
    # auto detection's order over every format it recognises; a detected format the method does not
    # read is refused, naming the methods that do (sft: a preference row is preference data first)
    detect: tuple[str, ...]
    # what `kubetune validate` says when dataset.format is one it does not read
    format_message: str
    preference: bool  # trains on preference pairs (prompt/chosen/rejected)
    reference_model: bool  # scores the policy against a frozen reference model
    streaming: bool  # dataset.streaming: read lazily (needs training.max_steps)
    packing: bool  # training.packing applies
    # trains replies in a chat template: the export records the template, an evaluation compares replies
    chat: bool
    example: str  # a job for a cluster, under examples/
    local_example: str  # the same method on the tiny model and shipped data (`kubetune run`)
    # values the method's trainer logs besides loss and rewards/*, kept in progress.json's `metrics`
    progress_metrics: tuple[str, ...] = ()
    # parallel_config.strategy fsdp: None, or why the method refuses it (one line, at admission)
    no_fsdp: str | None = None
    # the trained model is a language model (it generates, has a perplexity); False: a reward model's scores
    generates: bool = True

    @property
    def reads(self) -> tuple[str, ...]:
        """Every format a source of this method may hold."""
        return self.formats + self.text_column_formats


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            name="sft",
            summary="supervised fine-tuning",
            formats=("sharegpt", "messages", "alpaca"),
            auto_format=None,
            text_column_formats=(),
            detect=("preference", "sharegpt", "messages", "alpaca", "text"),
            format_message="method sft needs conversations (alpaca, sharegpt or messages); use method pretrain for "
            "plain text",
            preference=False,
            reference_model=False,
            streaming=False,
            packing=True,
            chat=True,
            example="examples/sft-lora.yaml",
            local_example="examples/local-lora.yaml",
        ),
        Method(
            name="dpo",
            summary="preference optimisation",
            formats=("preference",),
            auto_format="preference",
            text_column_formats=(),
            detect=("preference",),
            format_message="method dpo needs a preference dataset (prompt/chosen/rejected); set dataset.format to "
            "preference",
            preference=True,
            reference_model=True,
            streaming=False,
            packing=False,
            chat=True,
            example="examples/dpo.yaml",
            local_example="examples/local-dpo.yaml",
        ),
        Method(
            name="pretrain",
            summary="continued pre-training",
            formats=("text",),
            auto_format="text",
            text_column_formats=("sharegpt", "messages", "alpaca"),
            detect=("text", "sharegpt", "messages", "alpaca"),
            format_message="method pretrain reads plain text; use format text or map a text column "
            "(dataset.columns.text)",
            preference=False,
            reference_model=False,
            streaming=True,
            packing=True,
            chat=False,
            example="examples/pretrain.yaml",
            local_example="examples/local-pretrain.yaml",
        ),
        Method(
            name="kto",
            summary="Kahneman-Tversky optimisation (desirable / undesirable replies)",
            formats=("unpaired_preference", "preference"),
            auto_format=None,
            text_column_formats=(),
            detect=("preference", "unpaired_preference"),
            format_message="method kto needs unpaired preference data (prompt/completion/label) or preference "
            "pairs (prompt/chosen/rejected)",
            preference=True,
            reference_model=True,
            streaming=False,
            packing=False,
            chat=True,
            example="examples/kto.yaml",
            local_example="examples/local-kto.yaml",
            progress_metrics=("kl",),
            no_fsdp="its reference model and KL estimate are not covered by kubetune's FSDP checkpoint resume",
        ),
        Method(
            name="orpo",
            summary="odds-ratio preference optimisation (no reference model)",
            formats=("preference",),
            auto_format="preference",
            text_column_formats=(),
            detect=("preference",),
            format_message="method orpo needs a preference dataset (prompt/chosen/rejected); set dataset.format to "
            "preference",
            preference=True,
            reference_model=False,
            streaming=False,
            packing=False,
            chat=True,
            example="examples/orpo.yaml",
            local_example="examples/local-orpo.yaml",
            progress_metrics=("log_odds_ratio", "log_odds_chosen", "nll_loss"),
            no_fsdp="TRL's ORPO trainer (trl.experimental) is not covered by kubetune's FSDP checkpoint resume",
        ),
        Method(
            name="simpo",
            summary="simple preference optimisation (SimPO: length-normalised rewards, no reference model)",
            formats=("preference",),
            auto_format="preference",
            text_column_formats=(),
            detect=("preference",),
            format_message="method simpo needs a preference dataset (prompt/chosen/rejected); set dataset.format "
            "to preference",
            preference=True,
            reference_model=False,
            streaming=False,
            packing=False,
            chat=True,
            example="examples/simpo.yaml",
            local_example="examples/local-simpo.yaml",
        ),
        Method(
            name="reward",
            summary="a reward model (a score head trained on preference pairs)",
            formats=("preference",),
            auto_format="preference",
            text_column_formats=(),
            detect=("preference",),
            format_message="method reward needs a preference dataset (prompt/chosen/rejected); set dataset.format "
            "to preference",
            preference=True,
            reference_model=False,
            streaming=False,
            packing=False,
            chat=True,
            example="examples/reward.yaml",
            local_example="examples/local-reward.yaml",
            progress_metrics=("accuracy", "margin", "eval_accuracy", "eval_margin"),
            generates=False,
        ),
    )
}  # fmt: skip

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
FORMAT_NAMES: tuple[str, ...] = (AUTO, *FORMATS)


def method(name: str) -> Method:
    """The table row of ``name``; KeyError names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}") from None


def methods_reading(fmt: str) -> tuple[str, ...]:
    """The methods whose own formats include ``fmt`` (what a refused source should train with)."""
    return tuple(m.name for m in METHODS.values() if fmt in m.formats)


def main_format(method_name: str, fmt: str) -> str:
    """The format dataset.uri is read as: ``auto`` resolved where the method decides it, and a source
    the method reads through its text column read as that. ``auto`` stays where the first row decides."""
    m = method(method_name)
    if m.auto_format is not None and (fmt == AUTO or fmt in m.text_column_formats):
        return m.auto_format
    return fmt


def exclusive_formats() -> tuple[str, ...]:
    """Formats only methods that train on preference pairs read: any other method refuses them outright
    (a rule of their own, naming the methods, not each method's general hint)."""
    return tuple(
        f for f in FORMATS if all(METHODS[n].preference for n in methods_reading(f)) and methods_reading(f)
    )


def join_or(names: tuple[str, ...] | list[str], last: str = "or") -> str:
    """'a', 'a or b', 'a, b or c': names in a message."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def cel_list(values: tuple[str, ...] | list[str]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


@dataclass(frozen=True)
class FormatRule:
    """One cross-field rule on (method, dataset): CEL at ``scope`` and the same check in Python."""

    path: str
    cel: str
    message: str
    method: str | None  # the method it is about (None: every method but the readers of `fmt`)
    accepted: tuple[str, ...]  # dataset.format values it lets through
    text_column: tuple[str, ...]  # ... and these with dataset.columns.text mapped
    refused: str | None = None  # an exclusive format it refuses for every method not reading it

    def check(self, spec: object) -> bool:
        """True when `spec` (a FineTuneJobSpec) keeps the rule."""
        ds = spec.dataset  # type: ignore[attr-defined]
        name = spec.method  # type: ignore[attr-defined]
        if self.refused is not None:
            return ds.format != self.refused or name in methods_reading(self.refused)
        if name != self.method or ds.format in self.accepted:
            return True
        return ds.format in self.text_column and ds.columns is not None and ds.columns.text is not None


def format_rules() -> list[FormatRule]:
    """The rules on spec.method x spec.dataset.format, from the table.

    Per method: dataset.format is auto, one of its formats, or (a method with a text column) another
    format whose text column is mapped. Per exclusive format (preference): only its methods take it;
    each method's own rule leaves that case to it, so a refused preference dataset gets one line."""
    has_format = "!has(self.dataset.format)"
    text_mapped = "has(self.dataset.columns) && has(self.dataset.columns.text)"
    exclusive = exclusive_formats()
    rules: list[FormatRule] = []
    for m in METHODS.values():
        accepted = (AUTO, *m.formats, *(f for f in exclusive if f not in m.formats))
        cel = f"self.method != '{m.name}' || {has_format} || self.dataset.format in {cel_list(accepted)}"
        path = "spec.dataset.format"
        if m.text_column_formats:
            cel += f" || ({text_mapped} && self.dataset.format in {cel_list(m.text_column_formats)})"
            path = "spec.dataset.columns.text"  # the fix it names: map the text column
        rules.append(FormatRule(path, cel, m.format_message, m.name, accepted, m.text_column_formats))
    for f in exclusive:
        readers = methods_reading(f)
        rules.append(
            FormatRule(
                "spec.dataset.format",
                f"{has_format} || self.dataset.format != '{f}' || self.method in {cel_list(readers)}",
                f"a {f} dataset needs method {join_or(readers)}",
                None,
                (),
                (),
                refused=f,
            )
        )
    return rules


def streaming_rule() -> tuple[str, str, str]:
    """(path, CEL, message) of the rule that dataset.streaming needs a method that streams."""
    names = tuple(m.name for m in METHODS.values() if m.streaming)
    return (
        "spec.dataset.streaming",
        f"!self.dataset.streaming || self.method in {cel_list(names)}",
        f"dataset.streaming is supported for method {join_or(names)} only",
    )


def fsdp_rule() -> tuple[str, str, str]:
    """(path, CEL, message) of the rule that parallel_config.strategy fsdp needs a method that supports it."""
    refusing = {m.name: m.no_fsdp for m in METHODS.values() if m.no_fsdp}
    reasons = "; ".join(f"{name}: {why}" for name, why in refusing.items())
    return (
        "spec.parallel_config.strategy",
        "!has(self.parallel_config) || !has(self.parallel_config.strategy) || self.parallel_config.strategy != "
        f"'fsdp' || !(self.method in {cel_list(tuple(refusing))})",
        f"strategy fsdp is not supported with method {join_or(tuple(refusing))}, use ddp ({reasons})",
    )


def method_description() -> str:
    """spec.method's description (kubectl explain)."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."


def auto_format_description() -> str:
    """What dataset.format auto means, per method (kubectl explain)."""
    fixed = [f"{m.auto_format} for {m.name}" for m in METHODS.values() if m.auto_format is not None]
    detected = [f"for {m.name} {join_or(m.formats)}" for m in METHODS.values() if m.auto_format is None]
    return f"auto: {', '.join(fixed)}, and {', '.join(detected)} as detected from the columns."


__all__ = [
    "AUTO", "FORMATS", "FORMAT_NAMES", "METHODS", "METHOD_NAMES", "Format", "FormatRule", "Method",
    "auto_format_description", "cel_list", "exclusive_formats", "format_rules", "fsdp_rule", "join_or", "main_format", "method",
    "method_description", "methods_reading", "streaming_rule",
]  # fmt: skip
