"""One row per trial, built from the store alone: the frame behind results.parquet and `status`.

Columns: the DESIGN.md contract (`RESULT_COLUMNS`), then every config key as a dotted-path column
(`loss.kind`, `train.batch_size`, …, so any key can be an analysis axis, swept or not), then the
derived values as `derived.*`. A trial whose files cannot be read is still a row, status `failed`,
with the reason in `error`: failed trials are data, not exceptions.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from scalestudy.errors import ScalestudyError
from scalestudy.expand import axes, expand
from scalestudy.load import load_study
from scalestudy.store import RESULT_COLUMNS, RunStore, TrialStore, atomic_write_parquet


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            # Lists (e.g. data.shards) become JSON text so every column has one scalar type.
            flat[path] = json.dumps(value) if isinstance(value, list) else value
    return flat


def trial_row(ts: TrialStore) -> dict[str, Any]:
    row: dict[str, Any] = {"trial_id": ts.trial_id}
    try:
        trial = ts.read_trial()
        state = ts.state()
        summary = ts.summary() or {}
    except ScalestudyError as err:
        return {**row, "status": "failed", "error": str(err)}
    row.update({k: v for k, v in summary.items() if k in RESULT_COLUMNS})
    row["status"] = state.get("status", "pending")
    row["error"] = state.get("error")
    row.setdefault("step", state.get("step"))
    row.setdefault("steps", trial.derived.steps)
    row.setdefault("examples_seen", trial.derived.examples_seen)
    row.update(_flatten(trial.config.model_dump(mode="json")))
    row.update(_flatten(trial.derived.model_dump(mode="json"), "derived."))
    return row


def results_frame(store: RunStore) -> pl.DataFrame:
    """The per-trial frame, contract columns first with fixed types, rows sorted by trial id.

    Every trial directory is a row; `in_study` marks those the study as last run expands to
    (a run directory keeps trials of earlier, different sweeps: they are results too).
    """
    current = set(study_trial_ids(store))
    rows = [
        {**trial_row(store.trial(tid)), "in_study": tid in current} for tid in store.trial_ids()
    ]
    if not rows:
        return pl.DataFrame(schema={**RESULT_COLUMNS, "in_study": pl.Boolean()})
    frame = pl.DataFrame(rows, infer_schema_length=None)
    for name, dtype in RESULT_COLUMNS.items():
        frame = frame.with_columns(
            pl.col(name).cast(dtype) if name in frame.columns else pl.lit(None, dtype).alias(name)
        )
    rest = [c for c in frame.columns if c not in RESULT_COLUMNS]
    return frame.select(list(RESULT_COLUMNS) + sorted(rest))


def study_axes(store: RunStore) -> list[str]:
    """The swept keys of the study as last run in this directory."""
    return axes(load_study(store.study_path))


def study_trial_ids(store: RunStore) -> list[str]:
    """Ids of the trials the run directory's study expands to (its study.yaml as last run)."""
    return [t.trial_id for t in expand(load_study(store.study_path), str(store.study_path))]


def write_results(store: RunStore) -> pl.DataFrame:
    frame = results_frame(store)
    atomic_write_parquet(store.results_path, frame)
    return frame
