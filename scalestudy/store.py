"""The results store: the on-disk contract between trials, executors, analysis and the dashboard.

Layout (DESIGN.md)::

    RUN_DIR/study.yaml                  the resolved study as run
    RUN_DIR/results.parquet             one row per trial
    RUN_DIR/trials/<id>/config.json     the resolved Trial (config, derived values, swept values)
    RUN_DIR/trials/<id>/state.json      status, attempts, times, host, pid, backend job id, error
    RUN_DIR/trials/<id>/metrics/*.parquet  per-step rows, one part per flush ("<first>-<last>.parquet")
    RUN_DIR/trials/<id>/evals.parquet   one row per evaluation
    RUN_DIR/trials/<id>/summary.json    the trial's final figures
    RUN_DIR/trials/<id>/checkpoint.pt   model + optimiser + monitors + RNG, for resume

Every write is atomic (temp file, fsync, rename): a killed writer never leaves a half-written file.
Metric parts are append-only; a resumed trial first drops rows after its checkpoint step, so no step
appears twice.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import polars as pl

from scalestudy.errors import StoreError
from scalestudy.expand import Trial

STATES = ("pending", "running", "done", "failed", "diverged", "preempted")
# A diverged trial is a finished result (its history is the finding), not an error to retry.
FINAL_STATES = frozenset({"done", "diverged"})

# The per-trial columns every results.parquet and `status --json` have (DESIGN.md), with types.
RESULT_COLUMNS: dict[str, pl.DataType] = {
    "trial_id": pl.String(),
    "status": pl.String(),
    "steps": pl.Int64(),
    "examples_seen": pl.Int64(),
    "step": pl.Int64(),
    "final_loss": pl.Float64(),
    "zeroshot_top1": pl.Float64(),
    "zeroshot_chance": pl.Float64(),
    "best_zeroshot_top1": pl.Float64(),
    "retrieval_i2t_r1": pl.Float64(),
    "retrieval_t2i_r1": pl.Float64(),
    "spike_count": pl.Int64(),
    "max_spike_ratio": pl.Float64(),
    "first_spike_step": pl.Int64(),
    "spike_rate_per_1k": pl.Float64(),
    "loss_spike_count": pl.Int64(),
    "steps_to_recover": pl.Int64(),
    "diverged": pl.Boolean(),
    "wall_s": pl.Float64(),
    "samples_per_s": pl.Float64(),
    "error": pl.String(),
}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: Path, frame: pl.DataFrame) -> None:
    _atomic_write(path, lambda tmp: frame.write_parquet(tmp))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object")
    return data


def read_parts(paths: Iterable[Path]) -> pl.DataFrame:
    """Concatenate parquet parts (columns may differ between parts); later rows win per step."""
    frames = [pl.read_parquet(p) for p in sorted(paths)]
    if not frames:
        return pl.DataFrame()
    frame = pl.concat(frames, how="diagonal_relaxed")
    return frame.unique("step", keep="last", maintain_order=True).sort("step")


class TrialStore:
    """One trial's directory."""

    def __init__(self, path: Path) -> None:
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

    def read_trial(self) -> Trial:
        return Trial.model_validate(read_json(self.config_path))

    def state(self) -> dict[str, Any]:
        """The trial's state; a trial that never started is `pending`."""
        if not self.state_path.exists():
            return {"status": "pending", "attempts": 0}
        return read_json(self.state_path)

    def update_state(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into state.json atomically (one writer per trial at a time)."""
        state = self.state()
        state.update(fields, updated_at=time.time())
        atomic_write_json(self.state_path, state)
        return state

    def start_attempt(self, backend: str) -> dict[str, Any]:
        state = self.state()
        return self.update_state(
            status="running",
            attempts=int(state.get("attempts", 0)) + 1,
            started_at=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
            backend=backend,
            error=None,
        )

    # Metrics: append-only parquet parts named by their step range.
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        frame = pl.DataFrame(rows, infer_schema_length=None)
        first, last = rows[0]["step"], rows[-1]["step"]
        atomic_write_parquet(self.metrics_dir / f"{first:09d}-{last:09d}.parquet", frame)

    def metric_parts(self) -> list[Path]:
        return sorted(self.metrics_dir.glob("*.parquet")) if self.metrics_dir.exists() else []

    def metrics(self) -> pl.DataFrame:
        return read_parts(self.metric_parts())

    def truncate_after(self, step: int) -> None:
        """Drop metric and eval rows after `step` (the checkpoint a resumed trial restarts from)."""
        for part in self.metric_parts():
            first, last = (int(x) for x in part.stem.split("-"))
            if first > step:
                part.unlink()
            elif last > step:
                kept = pl.read_parquet(part).filter(pl.col("step") <= step)
                atomic_write_parquet(part.with_name(f"{first:09d}-{step:09d}.parquet"), kept)
                part.unlink()
        if self.evals_path.exists():
            evals = self.evals().filter(pl.col("step") <= step)
            atomic_write_parquet(self.evals_path, evals)

    def compact_metrics(self) -> None:
        """Merge all parts into one file once the trial ends (fewer files for readers)."""
        parts = self.metric_parts()
        if len(parts) <= 1:
            return
        frame = read_parts(parts)
        first, last = frame["step"][0], frame["step"][-1]
        target = self.metrics_dir / f"{first:09d}-{last:09d}.parquet"
        atomic_write_parquet(target, frame)
        for part in parts:
            if part != target:
                part.unlink()

    def append_eval(self, row: dict[str, Any]) -> None:
        evals = self.evals()
        frame = pl.DataFrame([row], infer_schema_length=None)
        atomic_write_parquet(self.evals_path, pl.concat([evals, frame], how="diagonal_relaxed"))

    def evals(self) -> pl.DataFrame:
        return pl.read_parquet(self.evals_path) if self.evals_path.exists() else pl.DataFrame()

    def summary(self) -> dict[str, Any] | None:
        return read_json(self.summary_path) if self.summary_path.exists() else None

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
        store = cls(root)
        if not store.study_path.exists():
            raise StoreError(
                f"{store.root}: not a run directory (no study.yaml); pass the directory that "
                "`scalestudy run` created, e.g. runs/<study name>"
            )
        return store

    @property
    def study_path(self) -> Path:
        return self.root / "study.yaml"

    @property
    def results_path(self) -> Path:
        return self.root / "results.parquet"

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def trial(self, trial_id: str) -> TrialStore:
        return TrialStore(self.trials_dir / trial_id)

    def trial_ids(self) -> list[str]:
        if not self.trials_dir.exists():
            return []
        return sorted(p.name for p in self.trials_dir.iterdir() if (p / "config.json").exists())

    def add_trial(self, trial: Trial) -> TrialStore:
        """Create the trial's directory and config.json (idempotent: the id fixes the config)."""
        ts = self.trial(trial.trial_id)
        if not ts.config_path.exists():
            atomic_write_json(ts.config_path, trial.model_dump(mode="json"))
        return ts
