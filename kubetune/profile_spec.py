"""The FineTuneProfile API (kubetune.io/v1alpha1, cluster-scoped): what a platform team sets once.

    defaults  any part of a FineTuneJob spec; the job's own fields win (kubetune.profiles says how)
    pod       pod-level additions (pull secrets, env, volumes, runtime class, labels ...)
    limits    what no job using the profile may exceed or choose
    models    a catalog: short names for the platform's base models, with recommended settings

Like spec.py, the pydantic model is the one source: the CRD (`kubetune crd --kind FineTuneProfile`)
is generated from it.
"""

from __future__ import annotations

import functools
import typing
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from kubetune import spec as s

PROFILE_KIND = "FineTuneProfile"
PROFILE_PLURAL = "finetuneprofiles"
PROFILE_SINGULAR = "finetuneprofile"
PROFILE_SHORT_NAMES = ["ftp"]
DEFAULT_PROFILE_ANNOTATION = "kubetune.io/default-profile"

# Fields a profile's defaults cannot set: the profile is chosen by the job, and `pod` has its own block.
_NOT_DEFAULTABLE = {"profile", "pod"}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (itself or Optional of it); None for lists, maps, scalars."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if len(args) == 1:
            return _model_of(args[0])
    return None


def _optional(info: FieldInfo, annotation: Any) -> tuple[Any, FieldInfo]:
    # Constraints (ge, le, min_length ...) live in the metadata; they keep applying to a given value.
    typed = Annotated[(annotation, *info.metadata)] if info.metadata else annotation
    return Optional[typed], Field(  # noqa: UP045 - create_model needs a runtime type
        None, description=info.description, json_schema_extra=info.json_schema_extra
    )


@functools.cache
def partial_model(model: type[BaseModel]) -> type[BaseModel]:
    """`model` with every field optional and no defaults, sub-blocks likewise: a profile's defaults.

    Field validators do not carry over; the effective spec (defaults merged with a job) is validated
    with the full model, so a bad default is still reported, naming the profile."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if model is s.FineTuneJobSpec and name in _NOT_DEFAULTABLE:
            continue
        sub = _model_of(info.annotation)
        fields[name] = _optional(info, partial_model(sub) if sub else info.annotation)
    doc = f"Defaults for {model.__name__}: every field optional."
    return create_model(f"{model.__name__}Defaults", __base__=s._Model, __doc__=doc, **fields)


SpecDefaults = partial_model(s.FineTuneJobSpec)
ResourcesDefaults = partial_model(s.Resources)


class CatalogModel(s._Model):
    """A base model the platform offers under a short name, with the settings recommended for it."""

    uri: str = s._uri_field("Where the model is (as spec.model.uri).")
    revision: str | None = Field(None, description="Hub revision for hf:// models.")
    tokenizer_uri: str | None = s._uri_field("Tokenizer location when it differs.", default=None)
    trust_remote_code: bool | None = Field(None, description="Whether the model needs its own Python code.")
    target_modules: str | list[str] | None = Field(
        None,
        description="Recommended pet_config.target_modules for this model.",
        json_schema_extra={"x-kubetune-string-or-list": True},
    )
    resources: ResourcesDefaults | None = Field(  # type: ignore[valid-type]
        None, description="Recommended resources (gpus, memory ...) for this model."
    )

    _uris = s.field_validator("uri", "tokenizer_uri")(s._check_uri)

    def as_defaults(self) -> dict[str, Any]:
        """The entry as a layer of FineTuneJob spec defaults (the fields `catalog_source` names)."""
        model = self.model_dump(
            include={"uri", "revision", "tokenizer_uri", "trust_remote_code"}, mode="json", exclude_none=True
        )
        layer: dict[str, Any] = {"model": model}
        if self.target_modules is not None:
            layer["pet_config"] = {"target_modules": self.target_modules}
        if self.resources is not None:
            layer["resources"] = self.resources.model_dump(mode="json", exclude_none=True)
        return layer


def catalog_source(path: str) -> str | None:
    """The field of a catalog entry that gives the job spec's `path` (as `as_defaults` lays it), or None."""
    head, _, rest = path.partition(".")
    if head == "model" and rest in {"uri", "revision", "tokenizer_uri", "trust_remote_code"}:
        return rest
    if path == "pet_config.target_modules":
        return "target_modules"
    if head == "resources" and rest in s.Resources.model_fields:
        return path
    return None


class Limits(s._Model):
    """What no job using the profile may exceed or choose. An absent limit does not limit."""

    max_gpus_per_node: int | None = Field(None, ge=0, description="Upper bound of resources.gpus.")
    max_nodes: int | None = Field(None, ge=1, description="Upper bound of parallel_config.nnodes.")
    max_total_gpus: int | None = Field(None, ge=0, description="Upper bound of resources.gpus x nnodes.")
    allowed_image_prefixes: list[str] | None = Field(
        None, description="The trainer image must start with one of these (e.g. registry.example/kubetune/)."
    )
    allowed_methods: list[s.Method] | None = Field(None, description="Methods jobs may use.")
    allowed_pet_types: list[s.PetType] | None = Field(None, description="pet_config.pet_type values allowed.")
    allowed_service_accounts: list[str] | None = Field(
        None,
        description="resources.service_account_name values allowed (unset is the namespace's 'default').",
    )
    allowed_priority_classes: list[str] | None = Field(
        None, description="resources.priority_class_name values allowed (unset is allowed)."
    )
    max_active_deadline_seconds: int | None = Field(
        None, ge=1, description="Upper bound of active_deadline_seconds; a job must then have a deadline."
    )


class FineTuneProfileSpec(s._Model):
    defaults: SpecDefaults | None = Field(  # type: ignore[valid-type]
        None, description="Any part of a FineTuneJob spec; a job's own (non-default) fields win."
    )
    pod: s.PodSettings | None = Field(
        None,
        description="Pod-level additions to every trainer pod of the profile's jobs (before the job's own).",
    )
    limits: Limits | None = Field(None, description="What no job using this profile may exceed or choose.")
    models: dict[str, CatalogModel] = Field(
        default_factory=dict, description="Model catalog: short name (spec.model.name) -> model and settings."
    )


class FineTuneProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    apiVersion: Literal["kubetune.io/v1alpha1"]
    kind: Literal["FineTuneProfile"]
    metadata: s.ObjectMeta
    spec: FineTuneProfileSpec = Field(default_factory=FineTuneProfileSpec)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def is_default(self) -> bool:
        return self.metadata.annotations.get(DEFAULT_PROFILE_ANNOTATION) == "true"
