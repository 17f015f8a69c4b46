"""progress.json, the document the trainer keeps under spec.output.uri and the operator reads.

One type for the writer (kubetune_trainer.progress.ProgressWriter), the readers (the operator's
status.progress and last_checkpoint, `kubetune status`, `kubetune run`'s rerun check) and the
local copy the trainer keeps on its own machine. Every field has a default, so a progress.json of
an older trainer parses; fields this version does not know are kept (extra="allow").
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.spec import CheckpointRef

TrainerState = Literal["starting", "running", "saving", "done", "failed", "preempted"]
STATES: tuple[str, ...] = TrainerState.__args__  # type: ignore[attr-defined]


class StoreOutage(BaseModel):
    """Set in the local copy while writes to the store fail (the store's copy cannot say so)."""

    model_config = ConfigDict(extra="allow")
    since: str | None = Field(None, description="When the first write failed (RFC 3339).")
    failed_attempts: int = Field(0, description="Writes that failed since then.")
    error: str | None = Field(None, description="The last failure, one line.")


class TrainerProgress(BaseModel):
    """What the trainer is doing (written by global rank 0 every few seconds and on every state change)."""

    model_config = ConfigDict(extra="allow")
    job: str = Field("", description="metadata.name of the job.")
    attempt: int = Field(0, description="The operator's attempt number ($KUBETUNE_ATTEMPT); 0 locally.")
    state: TrainerState = Field("starting", description="starting, running, saving, done, failed, preempted.")
    reason: str | None = Field(None, description="Why failed, preempted or saving.")
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps in the run.")
    percent: int = Field(0, description="step / total_steps in percent.")
    epoch: float = Field(0.0, description="Epochs done (fractional).")
    loss: float | None = Field(None, description="Latest training loss.")
    tokens_per_second: float | None = Field(None, description="Throughput over the whole gang.")
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end.")
    rewards: dict[str, float] | None = Field(
        None, description="Preference methods: latest mean rewards (chosen, rejected, margins, accuracies)."
    )
    metrics: dict[str, float] | None = Field(
        None, description="The method's other logged values (kubetune.methods: progress_metrics), latest."
    )
    last_checkpoint: CheckpointRef | None = Field(None, description="The newest committed checkpoint.")
    checkpoint_error: str | None = Field(None, description="Why the last checkpoint upload failed for good.")
    resumed_from: CheckpointRef | None = Field(None, description="The checkpoint this attempt resumed from.")
    store_unreachable: StoreOutage | None = Field(
        None, description="Local copy only: the store does not answer."
    )
    world_size: int = Field(1, description="Processes in the gang.")
    started_at: str | None = Field(None, description="When this attempt started (RFC 3339).")
    updated_at: str | None = Field(None, description="When this version was written (RFC 3339).")

    def with_updates(self, **fields: Any) -> TrainerProgress:
        """A copy with `fields` changed (validated) and `percent` recomputed from step and total_steps."""
        doc = {**self.model_dump(), **fields}
        step, total = doc.get("step") or 0, doc.get("total_steps") or 0
        doc["percent"] = int(100 * step / total) if total else 0
        return TrainerProgress.model_validate(doc)

    def to_json(self) -> str:
        """The file's text: every field, null when unknown (`rewards` and `metrics` only where a method logs them)."""
        exclude = {k for k in ("rewards", "metrics") if getattr(self, k) is None}
        return json.dumps(self.model_dump(mode="json", exclude=exclude), indent=1) + "\n"

    @classmethod
    def from_json(cls, data: str | bytes) -> TrainerProgress:
        """Parse a progress.json (of this or an older trainer); ValueError when it is not one."""
        return cls.model_validate_json(data)


__all__ = ["STATES", "StoreOutage", "TrainerProgress", "TrainerState"]
