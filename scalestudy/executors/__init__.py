"""Backends that run trials. Each is imported only when chosen (Ray and submitit are heavy)."""

from __future__ import annotations

import importlib

from scalestudy.errors import UsageError
from scalestudy.executors.base import BatchExecutor, Executor
from scalestudy.store import RunStore

# name → "module:Class"; the spec's executor.kind lists the same names.
BACKENDS = {
    "local": "scalestudy.executors.local:LocalExecutor",
    "ray": "scalestudy.executors.ray:RayExecutor",
    "slurm": "scalestudy.executors.slurm:SlurmExecutor",
}


def get_executor(name: str) -> Executor:
    if name not in BACKENDS:
        raise UsageError(f"unknown executor {name!r}; choose one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    executor: Executor = getattr(importlib.import_module(module), cls)()
    return executor


def batch_jobs(store: RunStore) -> list[tuple[BatchExecutor, list[str]]]:
    """The batch-scheduler backends that hold jobs of this run directory, each with its trials
    (those whose state.json names a job of that backend)."""
    by_backend: dict[str, list[str]] = {}
    for tid in store.trial_ids():
        state = store.trial(tid).state()
        if state.get("job_id") and state.get("backend") in BACKENDS:
            by_backend.setdefault(state["backend"], []).append(tid)
    found = []
    for name, trial_ids in by_backend.items():
        executor = get_executor(name)
        if isinstance(executor, BatchExecutor):
            found.append((executor, trial_ids))
    return found
