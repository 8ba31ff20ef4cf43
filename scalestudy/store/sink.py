"""The store as a metrics sink: per-step rows to metric parts, evaluations to evals.parquet, the
summary to summary.json, and the trial's progress (step, loss) to state.json at each flush."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from scalestudy.sinks import EVAL, SUMMARY, split
from scalestudy.store.run import TrialStore


class StoreSink:
    def __init__(self, store: TrialStore, steps: int) -> None:
        self.store = store
        self.steps = steps
        self.rows: list[dict[str, Any]] = []

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        evaluation, summary = split(metrics, EVAL), split(metrics, SUMMARY)
        if evaluation:
            self.flush()  # the steps before an evaluation are on disk before it is
            self.store.append_eval({"step": step, **evaluation})
        if summary:
            self.flush()
            self.store.compact_metrics()
            self.store.write_summary(summary)
        row = {k: v for k, v in metrics.items() if not k.startswith((EVAL, SUMMARY))}
        if row:
            self.rows.append({"step": step, **row})

    def flush(self) -> None:
        if not self.rows:
            return
        self.store.append_metrics(self.rows)
        last = self.rows[-1]
        self.store.update_state(step=last["step"], steps=self.steps, loss=last.get("loss"))
        self.rows = []

    def close(self) -> None:
        self.flush()
