"""Backends that run trials. Each is imported only when chosen (Ray and submitit are heavy)."""

from __future__ import annotations

import importlib

from scalestudy.errors import UsageError
from scalestudy.executors.base import Executor

# name → "module:Class"; the spec's executor.kind lists the same names.
BACKENDS = {"local": "scalestudy.executors.local:LocalExecutor"}


def get_executor(name: str) -> Executor:
    if name not in BACKENDS:
        raise UsageError(f"unknown executor {name!r}; choose one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    executor: Executor = getattr(importlib.import_module(module), cls)()
    return executor
