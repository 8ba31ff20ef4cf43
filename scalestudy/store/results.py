"""One row per trial, built from the trial files alone: the frame behind results.parquet, `status`,
the report and the dashboard.

Columns: the contract (`RESULT_COLUMNS`), then the trial's other summary figures, every config key
as a dotted-path column (`loss.kind`, `train.batch_size`, …, so any key can be an analysis axis,
swept or not), the derived values as `derived.*`, and `in_study` (the trial belongs to the study as
last run, per the manifest). Nothing is validated: config.json is read as stored. A trial whose
files cannot be read is still a row, status `failed`, with the reason in `error`: failed trials are
data, not exceptions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from scalestudy.store.files import atomic_write_parquet
from scalestudy.store.records import Status
from scalestudy.store.run import RunStore, TrialStore
from scalestudy.store.schema import RESULT_COLUMNS

Version = tuple[tuple[int, int] | None, ...]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted keys; lists become JSON text so every column has one type."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, list) else value
    return flat


def trial_row(ts: TrialStore) -> dict[str, Any]:
    """The trial's results row; any reason its files cannot be read makes a `failed` row."""
    row: dict[str, Any] = {"trial_id": ts.trial_id}
    try:
        stored = ts.config()
        state = ts.state()
        summary = ts.summary() or {}
        config, derived = stored["config"], stored["derived"]
        if not isinstance(config, dict) or not isinstance(derived, dict):
            raise ValueError("config.json needs `config` and `derived` objects")
    except Exception as err:  # noqa: BLE001 - an unreadable trial is a row, whatever the cause
        return {**row, "status": Status.FAILED.value, "error": f"{type(err).__name__}: {err}"}
    row.update({k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    row["status"] = state.status.value
    row["error"] = state.error
    row.setdefault("step", state.step)
    row.setdefault("steps", derived.get("steps"))
    row.setdefault("examples_seen", derived.get("examples_seen"))
    row.update(flatten(config))
    row.update(flatten(derived, "derived."))
    return row


def file_version(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a file, None when absent: files are atomically replaced, so a change of
    content is a change of version."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


class Rows:
    """Trial rows cached by the versions of each trial's JSON files.

    An executor keeps results.parquet current after every finished trial, and the dashboard polls
    every few seconds: each re-reads only the trials that wrote something since (a study of N
    trials otherwise costs N² file reads over its run).
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self._rows: dict[str, tuple[Version, dict[str, Any]]] = {}

    def row(self, trial_id: str) -> dict[str, Any]:
        ts = self.store.trial(trial_id)
        version = tuple(file_version(p) for p in (ts.config_path, ts.state_path, ts.summary_path))
        cached = self._rows.get(trial_id)
        if cached is None or cached[0] != version:
            cached = self._rows[trial_id] = (version, trial_row(ts))
        return cached[1]

    def frame(self) -> pl.DataFrame:
        """Every trial directory as a row, contract columns first with fixed types, sorted by id."""
        current = set(self.store.manifest().trial_ids)
        rows = [{**self.row(tid), "in_study": tid in current} for tid in self.store.trial_ids()]
        return as_results_frame(rows)

    def write(self) -> pl.DataFrame:
        frame = self.frame()
        atomic_write_parquet(self.store.results_path, frame)
        return frame


def as_results_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    if not rows:
        return pl.DataFrame(schema={**RESULT_COLUMNS, "in_study": pl.Boolean()})
    frame = pl.DataFrame(rows, infer_schema_length=None)
    frame = frame.with_columns(
        pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype).alias(name)
        for name, dtype in RESULT_COLUMNS.items()
    )
    rest = [c for c in frame.columns if c not in RESULT_COLUMNS]
    return frame.select(list(RESULT_COLUMNS) + sorted(rest))


def results_frame(store: RunStore) -> pl.DataFrame:
    """The per-trial frame of a run directory, read fresh."""
    return Rows(store).frame()


def write_results(store: RunStore) -> pl.DataFrame:
    """Write results.parquet from the trial files, fresh, and return the frame."""
    return Rows(store).write()
