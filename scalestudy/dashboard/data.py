"""What the dashboard shows, read from the results store alone; nothing here writes to it.

- `Dashboard.overview()`: one row per trial (the results.parquet row, `store.trial_row`, for the
  swept axes and key figures), live spike figures for trials still without a summary, and a
  `problem` for every trial whose files cannot be read, so one broken trial never hides the others.
- `metrics_after(trial, after)`: per-step rows after a step. Metric parts are named
  `<first>-<last>.parquet` (store.py), so only the parts that end after `after` are read: a page
  polling for new steps costs a directory listing, not a re-read of the history.
- `encode_columns`: those rows as raw little-endian float64 columns, which the browser views as
  Float64Arrays without parsing (20 traces × 10,000 steps is 10+ MB; as JSON it would take longer to
  print and parse than the whole render budget).
- `Dashboard.scaling(...)`: the report's curves over seeds (`analysis.aggregate.seed_stats`: mean
  and Student-t interval, none with one seed), from current results.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from scalestudy.analysis.aggregate import LEVEL, curve_trials, seed_stats
from scalestudy.errors import ScalestudyError, StoreError
from scalestudy.store import (
    RESULTS,
    RunStore,
    Status,
    TrialStore,
    file_version,
    part_range,
    read_ordered,
    trial_row,
)

# What the instability view plots (grad norm, loss and update RMS aligned, both kinds of spike
# flagged); the run view asks for more by name.
PLOT_COLUMNS = ("step", "grad_norm", "is_spike", "spike_ratio", "loss", "is_loss_spike",
                "loss_spike_ratio", "temperature", "bias", "rms_max")
# Overview columns besides the swept axes (whose names come from the study).
OVERVIEW_COLUMNS = ("trial_id", "status", "step", "steps", "final_loss", "zeroshot_top1",
                    "best_zeroshot_top1", "zeroshot_chance", "spike_count", "max_spike_ratio",
                    "first_spike_step", "loss_spike_count", "max_loss_spike_ratio",
                    "first_loss_spike_step", "stalled", "samples_per_s", "mfu", "peak_memory_gib",
                    "in_study", "error")
# Figures a scaling curve can plot on its y axis (per-trial result columns).
SCALING_METRICS = ("zeroshot_top1", "best_zeroshot_top1", "linear_probe_top1", "final_loss",
                   "retrieval_i2t_r1", "retrieval_t2i_r1", "spike_count", "max_spike_ratio",
                   "spike_rate_per_1k", "loss_spike_count", "loss_spike_rate_per_1k",
                   "samples_per_s")
MAGIC = b"SSM1"  # the binary metrics format, version 1 (decoded by static/app.js)


class NotFound(ScalestudyError):
    """A URL names a trial or file the run directory does not have."""


def metrics_after(ts: TrialStore, after: int) -> pl.DataFrame:
    """The trial's metric rows with step > `after`, reading only the parts that can hold them.

    A part can vanish between listing and reading (the trial compacts its parts when it ends, a
    resumed trial truncates them), so the listing is retried; unreadable parts raise StoreError.
    """
    for _ in range(3):
        parts = [p for p in ts.metric_parts() if (r := part_range(p)) is None or r[1] > after]
        try:
            frame = read_ordered(parts)
        except FileNotFoundError:
            continue
        except (OSError, pl.exceptions.PolarsError) as err:
            raise StoreError(
                f"{ts.metrics_dir}: unreadable metrics ({err}); the trial's steps cannot be shown "
                "until the bad part is removed or the trial is re-run"
            ) from None
        if not frame.height or frame["step"][0] > after:  # steps ascend: nothing to drop
            return frame
        return frame.filter(pl.col("step") > after)
    raise StoreError(f"{ts.metrics_dir}: metric parts kept changing while being read; try again")


def encode_columns(frame: pl.DataFrame, columns: list[str], header: dict[str, Any]) -> bytes:
    """`MAGIC`, uint32 header length, JSON header padded to 8 bytes, then one float64 column after
    another (null → NaN, booleans → 0/1). Columns the frame lacks are left out of the header."""
    present = [c for c in columns if c in frame.columns]
    values = (
        frame.select(pl.col(c).cast(pl.Float64).fill_null(float("nan")) for c in present)
        .to_numpy(order="fortran").astype("<f8", copy=False)
        if present and frame.height else np.zeros((0, 0), "<f8")
    )
    meta = json.dumps({**header, "rows": frame.height, "columns": present}).encode()
    meta += b" " * (-(len(MAGIC) + 4 + len(meta)) % 8)
    return MAGIC + len(meta).to_bytes(4, "little") + meta + values.tobytes(order="F")


def jsonable(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN and the browser's parser rejects it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def file_problem(ts: TrialStore) -> str | None:
    """Why the trial's JSON files cannot be read, or None."""
    try:
        ts.config()
        ts.state()
        ts.summary()
    except ScalestudyError as err:
        return str(err)
    return None


@dataclass
class SpikeTally:
    """The running figures of one kind of spike (flag column, ratio column)."""

    count: int = 0
    max_ratio: float | None = None
    first_step: int | None = None

    def add(self, rows: pl.DataFrame, flag: str, ratio: str) -> None:
        spikes = rows.filter(pl.col(flag)) if flag in rows.columns else rows.clear()
        ratios = rows[ratio].cast(pl.Float64).drop_nulls().drop_nans() if ratio in rows.columns else None
        self.count += spikes.height
        if ratios is not None and ratios.len():
            self.max_ratio = max(self.max_ratio or 0.0, float(ratios.max()))
        if spikes.height and self.first_step is None:
            self.first_step = int(spikes["step"][0])


@dataclass
class LiveSpikes:
    """Spike figures of a trial still writing metrics (grad-norm and loss spikes), updated from the
    parts added since last time."""

    parts: set[str] = field(default_factory=set)
    last_step: int = 0
    grad: SpikeTally = field(default_factory=SpikeTally)
    loss: SpikeTally = field(default_factory=SpikeTally)

    def update(self, ts: TrialStore) -> LiveSpikes:
        names = {p.name for p in ts.metric_parts()}
        state = self if self.parts <= names else LiveSpikes()  # truncated or compacted: start over
        rows = metrics_after(ts, state.last_step)
        if rows.height:
            state.grad.add(rows, "is_spike", "spike_ratio")
            state.loss.add(rows, "is_loss_spike", "loss_spike_ratio")
            state.last_step = int(rows["step"][-1])
        state.parts = names
        return state

    def figures(self) -> dict[str, Any]:
        """The overview's spike columns, as a finished trial's summary names them."""
        return {"spike_count": self.grad.count, "max_spike_ratio": self.grad.max_ratio,
                "first_spike_step": self.grad.first_step, "loss_spike_count": self.loss.count,
                "max_loss_spike_ratio": self.loss.max_ratio,
                "first_loss_spike_step": self.loss.first_step}


@dataclass
class StudyInfo:
    axes: list[str]
    trial_ids: set[str] | None  # None: unknown (no readable study.yaml), every trial is shown
    problem: str | None


def read_study(store: RunStore) -> StudyInfo:
    if not (store.manifest_path.exists() or store.study_path.exists()):
        return StudyInfo([], None, f"{store.manifest_path} does not exist yet: `scalestudy run` "
                         "writes it first; this page fills in when it does")
    try:
        manifest = store.manifest()
    except ScalestudyError as err:
        return StudyInfo([], None, f"the run's manifest is unreadable, trials shown without their "
                         f"axes: {err}")
    return StudyInfo(manifest.axes, set(manifest.trial_ids), None)


class Dashboard:
    """Reads one run directory for the web page; safe to call from several request threads.

    Rows come from `store.trial_row`, as in results.parquet, but are cached per trial by the
    versions of its JSON files, and the manifest by its version: a poll of 200 trials then re-reads
    only the trials that wrote something.
    """

    def __init__(self, root: Path) -> None:
        self.store = RunStore(root)
        self._lock = threading.Lock()
        self._ids: frozenset[str] = frozenset()
        self._study: tuple[tuple[Any, ...], StudyInfo] | None = None
        self._rows: dict[str, tuple[tuple[Any, ...], dict[str, Any], str | None]] = {}
        self._live: dict[str, LiveSpikes] = {}
        self._evals: dict[str, tuple[tuple[int, int] | None, dict[str, float]]] = {}
        # Per trial, its parquet files whose footers were read, by version.
        self._readable: dict[str, dict[Path, tuple[int, int] | None]] = {}
        self._problems: dict[str, str] = {}  # trial id → why its metrics cannot be read
        self._curves: tuple[tuple[Any, ...], pl.DataFrame] | None = None

    def trial(self, trial_id: str) -> TrialStore:
        """The trial's store, only for an id the run directory lists (so a URL never names a path).

        The listing is re-read only for an id not seen before: a poll of 20 traces would otherwise
        list every trial directory 20 times every 2 s.
        """
        if trial_id not in self._ids:
            self._ids = frozenset(self.store.trial_ids())
            if trial_id not in self._ids:
                raise NotFound(f"no trial {trial_id!r} in {self.store.root}")
        return self.store.trial(trial_id)

    def _study_info(self) -> StudyInfo:
        version = (file_version(self.store.manifest_path), file_version(self.store.study_path))
        if self._study is None or self._study[0] != version:
            self._study = (version, read_study(self.store))
        return self._study[1]

    def _row(self, ts: TrialStore) -> tuple[dict[str, Any], str | None]:
        """The trial's results row and why its JSON files cannot be read (None when they can)."""
        version = tuple(file_version(p) for p in (ts.config_path, ts.state_path, ts.summary_path))
        cached = self._rows.get(ts.trial_id)
        if cached is None or cached[0] != version:
            row = trial_row(ts)
            cached = self._rows[ts.trial_id] = (
                version, row, file_problem(ts) if row["status"] == Status.FAILED else None)
        return cached[1], cached[2]

    def _parquet_problem(self, ts: TrialStore) -> str | None:
        """The first metrics/evals file whose footer cannot be read; each file is checked once per
        version, so polling costs a stat per file."""
        files = ts.metric_parts() + ([ts.evals_path] if ts.evals_path.exists() else [])
        checked = self._readable.get(ts.trial_id, {})
        readable = self._readable[ts.trial_id] = {}  # only files that still exist stay remembered
        for path in files:
            try:
                version = file_version(path)
                if version is not None and checked.get(path) != version:
                    pl.read_parquet_schema(path)
                readable[path] = version
            except (OSError, pl.exceptions.PolarsError) as err:
                return f"{path}: unreadable ({err})"
        return None

    def rows(self) -> tuple[list[dict[str, Any]], StudyInfo]:
        """Every trial's row (contract columns, config keys, `in_study`, `problem`)."""
        with self._lock:
            study = self._study_info()
            rows = []
            for trial_id in self.store.trial_ids():
                ts = self.store.trial(trial_id)
                cached, problem = self._row(ts)
                row = {**cached, "in_study": study.trial_ids is None or trial_id in study.trial_ids}
                problem = problem or self._parquet_problem(ts) or self._problems.get(trial_id)
                if problem is None and row["status"] not in RESULTS:
                    problem = self._live_figures(ts, row)
                rows.append({**row, "problem": problem})
        return rows, study

    def overview(self) -> dict[str, Any]:
        rows, study = self.rows()
        shown = [{c: row.get(c) for c in (*OVERVIEW_COLUMNS, *study.axes, "problem")} for row in rows]
        counts: dict[str, int] = {}
        for row in shown:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        return jsonable({"run": self.store.root.name, "axes": study.axes, "trials": shown,
                         "counts": counts, "broken": sum(r["problem"] is not None for r in shown),
                         "problem": study.problem})

    def _live_figures(self, ts: TrialStore, row: dict[str, Any]) -> str | None:
        """Fill a summary-less trial's spike and accuracy figures from its history so far."""
        try:
            live = self._live[ts.trial_id] = self._live.get(ts.trial_id, LiveSpikes()).update(ts)
            accuracy = self._accuracy(ts)
        except (ScalestudyError, OSError, pl.exceptions.PolarsError) as err:
            return str(err)
        row.update(**live.figures(), **accuracy)
        return None

    def _accuracy(self, ts: TrialStore) -> dict[str, float]:
        """Latest and best zero-shot top-1 so far, re-read only when evals.parquet changes."""
        version = file_version(ts.evals_path)
        cached = self._evals.get(ts.trial_id)
        if cached is None or cached[0] != version:
            evals = ts.evals()
            figures = ({"zeroshot_top1": evals["zeroshot_top1"][-1],
                        "best_zeroshot_top1": evals["zeroshot_top1"].max()}
                       if evals.height and "zeroshot_top1" in evals.columns else {})
            cached = self._evals[ts.trial_id] = (version, figures)
        return cached[1]

    def detail(self, trial_id: str) -> dict[str, Any]:
        """Config, state, summary and evaluations of one trial; what cannot be read is a problem."""
        ts = self.trial(trial_id)
        out: dict[str, Any] = {"trial_id": trial_id, "problems": []}
        for name, read in (("trial", ts.config),
                           ("state", lambda: ts.state().model_dump(mode="json", exclude_none=True)),
                           ("summary", ts.summary),
                           ("evals", lambda: ts.evals().to_dicts())):
            try:
                out[name] = read()
            except (ScalestudyError, OSError, pl.exceptions.PolarsError) as err:
                out[name] = None
                out["problems"].append(str(err))
        return jsonable(out)

    def metrics(self, trial_id: str, after: int, columns: list[str]) -> bytes:
        ts = self.trial(trial_id)
        try:
            frame = metrics_after(ts, after)
        except StoreError as err:
            with self._lock:
                self._problems[trial_id] = str(err)
            raise
        with self._lock:
            self._problems.pop(trial_id, None)
        try:
            status = ts.state().status.value
        except StoreError:
            status = Status.FAILED.value  # as the results frame shows an unreadable state.json
        last = int(frame["step"][-1]) if frame.height else after
        return encode_columns(frame, columns, {"trial_id": trial_id, "after": after,
                                               "last_step": last, "status": status})

    def scaling(self, x: str, y: str, by: str) -> dict[str, Any]:
        """The report's curves (analysis.aggregate): per value of `by`, the mean of `y` over seeds
        against `x` with std and Student-t CI (null with one seed), from the finished in-study
        trials as they are now."""
        if y not in SCALING_METRICS:
            raise NotFound(f"cannot plot {y!r}: y is one of {', '.join(SCALING_METRICS)}")
        rows, _ = self.rows()
        frame = curve_trials(pl.DataFrame(rows, infer_schema_length=None)) if rows else pl.DataFrame()
        if not frame.height or any(c not in frame.columns for c in (x, y, by)):
            return {"x": x, "y": y, "by": by, "curves": [], "chance": None}
        frame = frame.filter(pl.col("in_study")).with_columns(pl.col(y).cast(pl.Float64))
        # Recomputed only when its inputs change: a poll every 2 s must not redo the statistics.
        inputs = (x, y, by, tuple(frame.select(by, x, y).rows()))
        if self._curves is None or self._curves[0] != inputs:
            self._curves = (inputs, seed_stats(frame, [by, x], y))
        stats = self._curves[1]
        chance = frame["zeroshot_chance"].drop_nulls() if "zeroshot_chance" in frame.columns else []
        return jsonable({
            "x": x, "y": y, "by": by, "level": LEVEL,
            "curves": [{"name": str(key), "points": group.select(
                x, "mean", "std", "n", "ci_low", "ci_high").rows()}
                for (key,), group in stats.group_by(by, maintain_order=True)],
            "chance": chance[0] if len(chance) and y.startswith("zeroshot") else None,
        })
