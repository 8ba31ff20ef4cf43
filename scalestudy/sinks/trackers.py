"""Experiment trackers as metrics sinks: TensorBoard, Weights & Biases and MLflow mirrors of a trial.

A study reads in each tracker the way it reads in the run directory:

- grouping: one tracker run per trial, named by its trial id, grouped by study (W&B group, MLflow
  experiment, TensorBoard log dir RUN_DIR/tensorboard/ with one sub-directory per trial);
- config: the resolved trial as flat dotted keys (`loss.kind`, `derived.steps`, …);
- tags: the trial's swept values (W&B tags `key=value`, MLflow tags, TensorBoard hparams);
- every numeric per-step key at its step, the evaluations (`eval/…`) at theirs, and the summary
  (`summary/…`: W&B run summary, MLflow metrics and TensorBoard scalars at the last step).

A resumed trial (after preemption, a Slurm requeue or a Ray retry) continues its tracker run: W&B
by a run id made from the study name and the trial id (resume="allow"), MLflow by finding the run
tagged with that study and trial id, TensorBoard by writing to the same log dir. The run directory
drops the steps after the checkpoint a trial resumes from; a tracker cannot, so the trial's next
attempt avoids showing a step twice as each tracker allows:

- TensorBoard marks the restart (purge_step): its readers hide the earlier attempt's points from
  that step on and show the resumed attempt's, as the run directory does. The event files still
  hold both.
- W&B and MLflow keep a step's first value: steps the tracker run already has are not sent again,
  so between the checkpoint and where the earlier attempt stopped they show the earlier attempt's
  values. A resumed trial recomputes those steps from the checkpoint's RNG state, so they are the
  same numbers (up to GPU nondeterminism). W&B offline cannot know which steps the run has; each
  attempt writes its own offline directory and `wandb sync` leaves W&B to drop repeated steps.

A trial started from scratch (no checkpoint: the run directory was reset) clears its TensorBoard log
dir; its W&B and MLflow runs continue, with the same keep-the-first-value rule.

Trackers are optional and must never cost a result: each is wrapped (`Guarded`) so that a missing
package, an unreachable server, bad credentials or an exception in `log` prints one warning to the
trial's log and turns that tracker off for the rest of the trial. The run directory records
everything regardless.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from scalestudy.errors import StoreError
from scalestudy.sinks import EVAL, SUMMARY, MetricsSink, split
from scalestudy.store import RunStore, Trial, flatten
from scalestudy.store.files import exclusive

# W&B project when $WANDB_PROJECT is unset (W&B's own default would be "uncategorized").
WANDB_PROJECT = "scalestudy"
# MLflow tags that identify a trial's run, so a resumed trial finds it.
STUDY_TAG, TRIAL_TAG = "scalestudy.study", "scalestudy.trial_id"
# MLflow's limits per log_batch call (REST API docs, "Request limits").
MLFLOW_METRICS_PER_BATCH, MLFLOW_PARAMS_PER_BATCH = 1000, 100
# W&B rejects longer tags.
WANDB_TAG_CHARS = 64
# TensorBoard writes one event file per writer; this prefix names them.
EVENT_FILES = "events.out.tfevents.*"


@dataclass(frozen=True)
class TrackedTrial:
    """What every tracker records about a trial, computed once."""

    study: str
    trial_id: str
    run_dir: Path
    trial_dir: Path
    config: dict[str, Any]
    tags: dict[str, Any]

    @classmethod
    def of(cls, trial: Trial, trial_dir: Path, study: str) -> TrackedTrial:
        config = {"trial_id": trial.trial_id,
                  **flatten(trial.config.model_dump(mode="json")),
                  **flatten(trial.derived.model_dump(mode="json"), "derived.")}
        return cls(study, trial.trial_id, trial_dir.parent.parent, trial_dir, config,
                   {k: _scalar(v) for k, v in trial.swept.items()})

    @property
    def wandb_id(self) -> str:
        """Deterministic, so every attempt of the trial (any host, any executor) finds its run; the
        study name is in it because two studies with one config share a trial id."""
        return f"{self.trial_id}-{hashlib.sha256(self.study.encode()).hexdigest()[:8]}"

    def tag_strings(self) -> dict[str, str]:
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.tags.items()}


def tracker_sinks(trial: Trial, trial_dir: str | Path, study_name: str | None = None) -> list[MetricsSink]:
    """The trackers `monitor.sinks` asks for, each wrapped so it cannot fail the trial.

    `study_name` defaults to the one in RUN_DIR/manifest.json (the trial dir is RUN_DIR/trials/<id>).
    """
    names = trial.config.monitor.sinks
    if not names:
        return []
    trial_dir = Path(trial_dir).resolve()
    tracked = TrackedTrial.of(trial, trial_dir, study_name or study_of(trial_dir))
    return [Guarded(name, lambda build=TRACKERS[name]: build(tracked)) for name in names]


def study_of(trial_dir: Path) -> str:
    """The study name from the run's manifest; without one (a trial directory made by hand) the run
    directory's name, which `run` makes the study name (RUN_DIR = OUT/<name>)."""
    run_dir = trial_dir.parent.parent
    try:
        return RunStore(run_dir).manifest().name
    except (StoreError, OSError):
        return run_dir.name


class Guarded:
    """A tracker that cannot fail the trial: its first error (building it, or in any call) prints one
    warning to stderr, which is the trial's log, and turns it off; the other sinks carry on."""

    def __init__(self, name: str, build: Callable[[], MetricsSink]) -> None:
        self.name = name
        self.sink: MetricsSink | None = None
        try:
            self.sink = build()
        except Exception as err:  # noqa: BLE001 - any failure of an optional tracker is only a warning
            self._fail(err)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._call(lambda sink: sink.log(step, metrics))

    def flush(self) -> None:
        self._call(lambda sink: sink.flush())

    def close(self) -> None:
        self._call(lambda sink: sink.close())
        self.sink = None

    def _call(self, action: Callable[[MetricsSink], None]) -> None:
        if self.sink is None:
            return
        try:
            action(self.sink)
        except Exception as err:  # noqa: BLE001
            broken, self.sink = self.sink, None
            self._fail(err)
            try:
                broken.close()  # release what it holds (threads, files); it has already warned
            except Exception:  # noqa: BLE001, S110
                pass

    def _fail(self, err: Exception) -> None:
        hint = (f" (install it: pip install 'scalestudy[{self.name}]')"
                if isinstance(err, ImportError) else "")
        print(f"warning: the {self.name} tracker is off for the rest of this trial: "
              f"{type(err).__name__}: {err}{hint}. The run directory still records every metric.",
              file=sys.stderr, flush=True)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The values trackers can plot: numbers and flags (as 0/1); None (not measured) is left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}


def kind_of(metrics: Mapping[str, Any]) -> str:
    """What a `log` call carries: "summary", "eval" or per-step "row" values."""
    if any(k.startswith(SUMMARY) for k in metrics):
        return "summary"
    return "eval" if any(k.startswith(EVAL) for k in metrics) else "row"


def _scalar(value: Any) -> Any:
    """A swept value as trackers take it: lists and mappings as JSON text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class TensorBoardSink:
    """Scalars in RUN_DIR/tensorboard/<trial id>/ (`tensorboard --logdir RUN_DIR/tensorboard`): the
    config as a text table, the swept values as HParams, every numeric key as a scalar."""

    def __init__(self, trial: TrackedTrial) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.trial = trial
        self.log_dir = trial.run_dir / "tensorboard" / trial.trial_id
        self.make_writer = SummaryWriter
        self.writer: Any = None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self.writer is None:
            self._open(step, kind_of(metrics))
        for key, value in numeric(metrics).items():
            self.writer.add_scalar(key, value, step)

    def _open(self, step: int, kind: str) -> None:
        """Opened at the first call, whose step says where this attempt starts: step 1 is a fresh
        start (the store was reset, so is this log dir); a later one resumes after a checkpoint."""
        if kind == "row" and step == 1:
            for old in self.log_dir.glob(EVENT_FILES):
                old.unlink()
        earlier = any(self.log_dir.glob(EVENT_FILES))
        # purge_step writes a restart marker: readers drop earlier points at or after it. An
        # attempt whose first call is an evaluation or the summary trained no step (it resumed at
        # the last one), so only what came after that step is stale.
        restart = step if kind == "row" else step + 1
        self.writer = self.make_writer(str(self.log_dir), purge_step=restart if earlier else None)
        if not earlier:
            from torch.utils.tensorboard.summary import hparams

            table = "\n".join(["| key | value |", "|---|---|",
                               *(f"| {k} | {v} |" for k, v in self.trial.config.items())])
            self.writer.add_text("config", table, step)
            # Only the session's hparams: with no experiment summary the HParams plugin compares
            # every run in the log dir and offers every scalar as a metric.
            _, session_start, _ = hparams(self.trial.tags, {})
            self.writer.file_writer.add_summary(session_start, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """A W&B run: project $WANDB_PROJECT (else `scalestudy`), group = study, name = trial id, id from
    both (resume="allow"); local files under $WANDB_DIR, else the trial directory."""

    def __init__(self, trial: TrackedTrial) -> None:
        import wandb

        tags = [f"{k}={v}"[:WANDB_TAG_CHARS] for k, v in trial.tag_strings().items()]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, group=trial.study,
            name=trial.trial_id, id=trial.wandb_id, resume="allow", config=trial.config, tags=tags,
            dir=None if os.environ.get("WANDB_DIR") else str(trial.trial_dir),
            job_type="trial", reinit="create_new",
            # The trial's output already goes to its log; W&B need not wrap stdout/stderr.
            settings=wandb.Settings(console="off", quiet=True),
        )
        # The step W&B expects next: a resumed run already has every step below it.
        self.resume_at = self.run.step
        self.ended = False

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        summary = split(metrics, SUMMARY)
        if summary:
            self.run.summary.update({f"{SUMMARY}{k}": v for k, v in summary.items()})
            self.ended = True
            return
        values = numeric(metrics)
        if values and step >= self.resume_at:
            self.run.log(values, step=step)

    def flush(self) -> None:
        """W&B streams by itself; a step's row is committed when a later step is logged."""

    def close(self) -> None:
        # A trial stopped before its summary (preempted, failed) shows as failed until it resumes.
        self.run.finish(exit_code=0 if self.ended else 1)


class MlflowSink:
    """An MLflow run at $MLFLOW_TRACKING_URI (MLflow's default without it): experiment = study,
    run name = trial id, params = config, tags = swept values; metrics sent in batches at flush."""

    def __init__(self, trial: TrackedTrial) -> None:
        from mlflow import get_tracking_uri
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self.Metric = Metric
        # A tracking server enforces unique experiment names, so a trial that loses the race to
        # create the study's finds the winner's. MLflow's file store does not: two trials starting
        # together would each create an experiment of that name and split the study, or both
        # create the store's default experiment and one fail. There both hold a lock beside it.
        uri = get_tracking_uri()
        root = file_store_root(uri)
        with exclusive(root / ".scalestudy.lock", "opening the MLflow file store") if root else nullcontext():
            self.client = MlflowClient(uri)
            experiment = self._experiment(trial.study)
        found = self.client.search_runs(
            [experiment],
            filter_string=f"tags.`{STUDY_TAG}` = '{trial.study}' and tags.`{TRIAL_TAG}` = '{trial.trial_id}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        # The last step the run already has, per kind: a resumed trial does not send them again.
        self.has_through = {"row": 0, "eval": 0}
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            for kind, key in (("row", "loss"), ("eval", f"{EVAL}examples_seen")):
                history = self.client.get_metric_history(self.run_id, key)
                self.has_through[kind] = max((m.step for m in history), default=0)
        else:
            self.run_id = self.client.create_run(
                experiment, run_name=trial.trial_id,
                tags={STUDY_TAG: trial.study, TRIAL_TAG: trial.trial_id},
            ).info.run_id
        params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in trial.config.items()]
        tags = [RunTag(k, v) for k, v in trial.tag_strings().items()]
        for i in range(0, max(len(params), len(tags)), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_PARAMS_PER_BATCH],
                                  tags=tags[i:i + MLFLOW_PARAMS_PER_BATCH])
        self.pending: list[Any] = []
        self.ended = False

    def _experiment(self, name: str) -> str:
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return str(existing.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except Exception:  # another trial created it first (the error type varies by store)
            existing = self.client.get_experiment_by_name(name)
            if existing is None:
                raise
            return str(existing.experiment_id)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        kind = kind_of(metrics)
        if kind != "summary" and step <= self.has_through[kind]:
            return
        self.ended = self.ended or kind == "summary"
        now = int(time.time() * 1000)
        self.pending += [self.Metric(k, v, now, step) for k, v in numeric(metrics).items()]

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        for i in range(0, len(pending), MLFLOW_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i:i + MLFLOW_METRICS_PER_BATCH])

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED" if self.ended else "KILLED")


def file_store_root(uri: str) -> Path | None:
    """The folder of an MLflow file store (`file:` URI or a bare path), or None for other stores."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


TRACKERS: dict[str, Callable[[TrackedTrial], MetricsSink]] = {
    "tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MlflowSink,
}
