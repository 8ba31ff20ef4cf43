"""The records a run directory holds, as types: a trial's status and state, the resolved trial,
and the run manifest. Everything that writes or reads these files goes through these types.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from scalestudy.spec import TrialConfig


class Status(StrEnum):
    """A trial's state (state.json `status`). A StrEnum: each member *is* its string, so it
    compares equal to "done", serialises as "done" and works as a polars value."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DIVERGED = "diverged"
    PREEMPTED = "preempted"

    @property
    def is_result(self) -> bool:
        """Finished with a result: done, or diverged (its history is the finding, not an error)."""
        return self in RESULTS

    @property
    def is_end(self) -> bool:
        """The trial will not continue by itself: a result, or failed."""
        return self in ENDS


# Trials with a result: `run` skips them and they enter the curves.
RESULTS = frozenset({Status.DONE, Status.DIVERGED})
# Trials that stopped for good (failed ones resume only with `run --retry-failed`).
ENDS = RESULTS | {Status.FAILED}


class TrialState(BaseModel):
    """state.json: where a trial stands. Written by the trial itself and by the executor that runs
    it (one writer at a time); every field a writer may set is declared here."""

    # Unknown keys are ignored on read, so a state.json written by a newer version still reads.
    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    status: Status = Status.PENDING
    attempts: int = 0
    step: int | None = Field(None, description="Last step recorded in the metrics.")
    steps: int | None = Field(None, description="Steps the trial trains in all.")
    loss: float | None = Field(None, description="Loss at the last recorded step.")
    error: str | None = Field(None, description="Why the trial failed, diverged or was preempted.")
    backend: str | None = Field(None, description="The executor that ran the last attempt.")
    host: str | None = None
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = None
    submitted_at: float | None = None
    job_id: str | None = Field(None, description="Batch scheduler job of the trial (Slurm).")
    log: str | None = Field(None, description="Where the scheduler writes the trial's output.")
    sbatch_script: str | None = None
    slurm_state: str | None = Field(None, description="Slurm's word for how the job ended.")
    ray_task_id: str | None = None
    ray_node_id: str | None = None
    allocator: str | None = Field(
        None, description="The malloc the last attempt's process ran on: tcmalloc, jemalloc or "
        "system (resources.allocator as found on its machine).")

    def updated(self, **fields: Any) -> TrialState:
        """A copy with `fields` set; an unknown field name is a programming error (TypeError)."""
        unknown = set(fields) - set(TrialState.model_fields)
        if unknown:
            raise TypeError(f"state.json has no fields {sorted(unknown)}")
        return self.model_validate({**self.model_dump(), **fields, "updated_at": time.time()})


class Derived(BaseModel):
    """Values computed from a TrialConfig (by scalestudy.expand.derive); shown by `plan`, used by
    the trial."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(description="ceil(train.examples_seen / train.batch_size).")
    examples_seen: int = Field(description="steps × batch size: the budget actually trained.")
    lr: float = Field(description="optim.lr scaled by optim.lr_scaling for this batch size.")
    warmup_steps: int = Field(
        description="optim.warmup_steps (clipped to the steps), else round(optim.warmup_fraction × steps)."
    )
    temperature_init: float = Field(description="Initial logit scale t.")
    bias_init: float | None = Field(
        description="Initial sigmoid bias b; None for softmax and for sigmoid with use_bias=false."
    )
    params: int | None = Field(
        None, description="Parameters of the model, t and b included (frozen towers too)."
    )


class Trial(BaseModel):
    """One fully resolved trial: what `config.json` in its directory holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trial_id: str
    config: TrialConfig
    derived: Derived
    swept: dict[str, Any] = Field(description="The value of each swept dotted key for this trial.")


MANIFEST_VERSION = 1


class Manifest(BaseModel):
    """manifest.json: what `run` resolved, so the read side (status, report, dashboard, analysis)
    never loads, validates or expands the study again."""

    model_config = ConfigDict(extra="ignore")

    version: int = MANIFEST_VERSION
    name: str
    description: str = ""
    axes: list[str] = Field(description="The swept dotted keys, in declaration order.")
    trial_ids: list[str] = Field(description="The trials of the study as last run, in sweep order.")
    study: dict[str, Any] = Field(description="The resolved study (as study.yaml holds it).")
    written_at: float = Field(default_factory=time.time)
