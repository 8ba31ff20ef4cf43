"""Backends that run trials. Each is imported only when chosen (Ray and submitit are heavy, and
optional: `pip install 'scalestudy[ray]'` / `'scalestudy[slurm]'`)."""

from __future__ import annotations

import importlib

from scalestudy.errors import MissingExtra, UsageError
from scalestudy.executors.base import BatchExecutor, Executor
from scalestudy.store import RunStore

# name → ("module:Class", the optional extra it needs, the module that extra provides)
BACKENDS = {
    "local": ("scalestudy.executors.local:LocalExecutor", None, None),
    "ray": ("scalestudy.executors.ray:RayExecutor", "ray", "ray"),
    "slurm": ("scalestudy.executors.slurm:SlurmExecutor", "slurm", "submitit"),
}


def get_executor(name: str) -> Executor:
    if name not in BACKENDS:
        raise UsageError(f"unknown executor {name!r}; choose one of {', '.join(BACKENDS)}")
    target, extra, needs = BACKENDS[name]
    module, _, cls = target.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if extra is None or err.name != needs:
            raise
        raise MissingExtra(extra, needs, f"the {name} executor") from None
    executor: Executor = getattr(loaded, cls)()
    return executor


def batch_jobs(store: RunStore) -> list[tuple[BatchExecutor, list[str]]]:
    """The batch-scheduler backends that hold jobs of this run directory, each with its trials
    (those whose state.json names a job of that backend)."""
    by_backend: dict[str, list[str]] = {}
    for tid in store.trial_ids():
        state = store.trial(tid).state()
        if state.job_id and state.backend in BACKENDS:
            by_backend.setdefault(state.backend, []).append(tid)
    found = []
    for name, trial_ids in by_backend.items():
        executor = get_executor(name)
        if isinstance(executor, BatchExecutor):
            found.append((executor, trial_ids))
    return found
