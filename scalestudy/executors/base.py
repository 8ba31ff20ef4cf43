"""The one small interface every backend implements."""

from __future__ import annotations

from typing import Protocol

from scalestudy.expand import Trial
from scalestudy.spec import StudySpec
from scalestudy.store import RunStore


class Executor(Protocol):
    """Runs trials through the one trial entry point; never trains anything itself."""

    name: str

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        """Run (or submit) `trials`, each already added to `store`; return when they have stopped.

        Keeps results.parquet current as trials finish. KeyboardInterrupt leaves every trial's
        state true (interrupted trials are `preempted` and resume on the next run).
        """
        ...
