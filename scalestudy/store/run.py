"""A run directory and its trial directories: the paths, and every read and write of their files.

Layout (README "The results store")::

    RUN_DIR/study.yaml                  the resolved study as last run (for people)
    RUN_DIR/manifest.json               what `run` resolved: trial ids, axes, the study (for readers)
    RUN_DIR/results.parquet             one row per trial
    RUN_DIR/trials/<id>/config.json     the resolved Trial (config, derived values, swept values)
    RUN_DIR/trials/<id>/state.json      TrialState: status, attempts, times, host, job, error
    RUN_DIR/trials/<id>/metrics/*.parquet  per-step rows, one part per flush ("<first>-<last>.parquet")
    RUN_DIR/trials/<id>/evals.parquet   one row per evaluation
    RUN_DIR/trials/<id>/summary.json    the trial's final figures
    RUN_DIR/trials/<id>/checkpoint.pt   model + optimiser + monitors + RNG, for resume
    RUN_DIR/trials/<id>/log.txt         the trial process's output
    RUN_DIR/tensorboard/<id>/           TensorBoard event files (monitor.sinks: [tensorboard])
    RUN_DIR/superseded/<id>-<time>/     trials set aside by `run --retrain-changed`

Every write is atomic (temp file, fsync, rename): a killed writer never leaves a half-written file.
Metric parts are append-only; a resumed trial first drops rows after its checkpoint step, so no step
appears twice.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from scalestudy.errors import StoreError
from scalestudy.store.files import (
    atomic_write_json, atomic_write_parquet, atomic_write_text, load_torch, part_name, part_range,
    read_json, read_parts, save_torch,
)
from scalestudy.store.records import Manifest, Status, Trial, TrialState


class TrialStore:
    """One trial's directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def trial_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def metrics_dir(self) -> Path:
        return self.path / "metrics"

    @property
    def evals_path(self) -> Path:
        return self.path / "evals.parquet"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.path / "log.txt"

    # The trial's definition.
    def read_trial(self) -> Trial:
        """The resolved trial, validated: what the trial process trains (the read side uses
        `config()` instead, which does not validate)."""
        return Trial.model_validate(self.config())

    def config(self) -> dict[str, Any]:
        """config.json as stored (trial_id, config, derived, swept), without validation."""
        return read_json(self.config_path)

    def write_trial(self, trial: Trial) -> None:
        atomic_write_json(self.config_path, trial.model_dump(mode="json"))

    # State.
    def state(self) -> TrialState:
        """The trial's state; a trial that never started is `pending`."""
        if not self.state_path.exists():
            return TrialState()
        try:
            return TrialState.model_validate(read_json(self.state_path))
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            raise StoreError(f"{self.state_path}: not a trial state ({err})") from None

    def update_state(self, **fields: Any) -> TrialState:
        """Merge `fields` into state.json atomically (one writer per trial at a time)."""
        state = self.state().updated(**fields)
        atomic_write_json(self.state_path, state.model_dump(mode="json", exclude_none=True))
        return state

    def start_attempt(self, backend: str, allocator: str | None = None) -> TrialState:
        return self.update_state(
            status=Status.RUNNING,
            attempts=self.state().attempts + 1,
            started_at=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            backend=backend,
            allocator=allocator,
            error=None,
        )

    # Metrics: append-only parquet parts named by their step range.
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        frame = pl.DataFrame(rows, infer_schema_length=None)
        atomic_write_parquet(self.metrics_dir / part_name(rows[0]["step"], rows[-1]["step"]), frame)

    def metric_parts(self) -> list[Path]:
        return sorted(self.metrics_dir.glob("*.parquet")) if self.metrics_dir.exists() else []

    def metrics(self) -> pl.DataFrame:
        return read_parts(self.metric_parts())

    def truncate_after(self, step: int) -> None:
        """Drop metric and eval rows after `step` (the checkpoint a resumed trial restarts from)."""
        for part in self.metric_parts():
            first, last = part_range(part) or (0, 0)
            if first > step:
                part.unlink()
            elif last > step:
                kept = pl.read_parquet(part).filter(pl.col("step") <= step)
                atomic_write_parquet(part.with_name(part_name(first, step)), kept)
                part.unlink()
        if self.evals_path.exists():
            atomic_write_parquet(self.evals_path, self.evals().filter(pl.col("step") <= step))

    def compact_metrics(self) -> None:
        """Merge all parts into one file once the trial ends (fewer files for readers)."""
        parts = self.metric_parts()
        if len(parts) <= 1:
            return
        frame = read_parts(parts)
        target = self.metrics_dir / part_name(frame["step"][0], frame["step"][-1])
        atomic_write_parquet(target, frame)
        for part in parts:
            if part != target:
                part.unlink()

    def append_eval(self, row: dict[str, Any]) -> None:
        frame = pl.DataFrame([row], infer_schema_length=None)
        atomic_write_parquet(self.evals_path, pl.concat([self.evals(), frame], how="diagonal_relaxed"))

    def evals(self) -> pl.DataFrame:
        return pl.read_parquet(self.evals_path) if self.evals_path.exists() else pl.DataFrame()

    def summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path) if self.summary_path.exists() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    # Checkpoints.
    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        save_torch(self.checkpoint_path, payload)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint's payload (on the CPU), or None when there is none."""
        return load_torch(self.checkpoint_path) if self.checkpoint_path.exists() else None

    def reset(self) -> None:
        """Forget all progress (no checkpoint to resume from): metrics, evals, summary."""
        for part in self.metric_parts():
            part.unlink()
        for path in (self.evals_path, self.summary_path):
            path.unlink(missing_ok=True)


class RunStore:
    """A run directory: RUN_DIR = OUT/<study name>."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | Path) -> RunStore:
        """An existing run directory (one `scalestudy run` wrote), else a StoreError saying so."""
        store = cls(root)
        if not store.root.is_dir():
            raise StoreError(f"{store.root}: no such directory; pass the run directory that "
                             "`scalestudy run` created, e.g. runs/<study name>")
        if not (store.manifest_path.exists() or store.study_path.exists()):
            raise StoreError(
                f"{store.root}: not a run directory (no manifest.json or study.yaml); pass the "
                "directory that `scalestudy run` created, e.g. runs/<study name>"
            )
        return store

    @property
    def study_path(self) -> Path:
        return self.root / "study.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def results_path(self) -> Path:
        return self.root / "results.parquet"

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def superseded_dir(self) -> Path:
        return self.root / "superseded"

    def trial(self, trial_id: str) -> TrialStore:
        return TrialStore(self.trials_dir / trial_id)

    def trial_ids(self) -> list[str]:
        if not self.trials_dir.exists():
            return []
        return sorted(p.name for p in self.trials_dir.iterdir() if (p / "config.json").exists())

    def add_trial(self, trial: Trial) -> TrialStore:
        """Create the trial's directory and write its config.json, or bring a stored one up to
        date (new keys, new derived values): the stored config is the one the trial trains from,
        and `run` has checked that it computes the same. An unchanged one is not rewritten."""
        ts = self.trial(trial.trial_id)
        if not ts.config_path.exists() or ts.config() != trial.model_dump(mode="json"):
            ts.write_trial(trial)
        return ts

    def set_aside(self, trial_id: str) -> Path:
        """Move a trial's directory to superseded/ (never deleted: its results stay readable)."""
        target = self.superseded_dir / f"{trial_id}-{time.strftime('%Y%m%dT%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.trial(trial_id).path), target)
        return target

    # What `run` resolved.
    def write_study(self, manifest: Manifest) -> None:
        atomic_write_text(self.study_path, yaml.safe_dump(manifest.study, sort_keys=False))
        atomic_write_json(self.manifest_path, manifest.model_dump(mode="json"))

    def manifest(self) -> Manifest:
        """The run's manifest. A run directory from before manifests existed gets one read from
        its study.yaml as plain YAML (its name, description and swept keys), with every trial
        directory counted in the study: nothing is validated or expanded. A directory with neither
        (trials written by hand, or before `run` wrote anything) has every trial in its study."""
        if not (self.manifest_path.exists() or self.study_path.exists()):
            return Manifest(name=self.root.name, axes=[], trial_ids=self.trial_ids(), study={})
        if self.manifest_path.exists():
            try:
                return Manifest.model_validate(read_json(self.manifest_path))
            except ValueError as err:
                raise StoreError(f"{self.manifest_path}: not a run manifest ({err})") from None
        try:
            study = yaml.safe_load(self.study_path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise StoreError(f"{self.study_path}: unreadable ({err})") from None
        sweep = study.get("sweep") or {}
        axes = list(sweep.get("grid") or {}) + list(sweep.get("zip") or {})
        for extra in sweep.get("include") or []:
            axes += [k for k in extra if k not in axes]
        return Manifest(name=str(study.get("name", self.root.name)),
                        description=str(study.get("description") or ""), axes=axes,
                        trial_ids=self.trial_ids(), study=study)
