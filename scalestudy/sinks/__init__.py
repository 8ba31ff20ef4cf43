"""Where a trial's metrics go: a small protocol, the store's implementation, and a fan-out.

The trial loop hands every sink the same calls: `log(step, metrics)` once per recorded step with
the step's host values (bare keys: `loss`, `grad_norm`, …), once per evaluation with `eval/`-prefixed
keys, and once at the end with the trial's `summary/` figures; `flush()` after each batch of rows;
`close()` when the trial stops. The run directory (scalestudy.store.sink.StoreSink) is the source
of truth and keeps every step; other sinks (experiment trackers) mirror what they can.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

EVAL = "eval/"
SUMMARY = "summary/"


class MetricsSink(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` of `step` (keys namespaced as the module says)."""
        ...

    def flush(self) -> None:
        """Make everything logged so far durable/visible."""
        ...

    def close(self) -> None:
        """The trial stopped (finished, diverged, failed or preempted)."""
        ...


def split(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The keys of `metrics` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


class Sinks:
    """Several sinks as one: each call goes to every sink in order."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
