"""The one small interface every backend implements, and the watch loop they share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from scalestudy.progress import Progress
from scalestudy.spec import StudySpec
from scalestudy.store import Rows, RunStore, Trial


class Executor(Protocol):
    """Runs trials through the one trial entry point; never trains anything itself."""

    name: str

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        """Run (or submit) `trials`, each already added to `store`; return when they have stopped.

        Keeps results.parquet current as trials finish. KeyboardInterrupt leaves every trial's
        state true (interrupted trials are `preempted` and resume on the next run).
        """
        ...


@runtime_checkable
class BatchExecutor(Executor, Protocol):
    """A backend that hands trials to a batch scheduler: `run` submits and returns, the jobs
    outlive it, and each trial's state.json names its job (`backend`, `job_id`, `log`)."""

    def wait(self, store: RunStore, trial_ids: list[str], timeout_s: float | None = None) -> None:
        """Block until none of `trial_ids` has a job queued or running, showing live progress;
        TimeoutError after `timeout_s`."""
        ...

    def job_states(self, store: RunStore, trial_ids: list[str]) -> dict[str, str]:
        """The scheduler's state of each trial's job (trials never submitted are left out).

        Makes state.json true on the way: a trial whose job ended without the trial recording
        its end (killed, out of memory, node failure) gets the reason from the scheduler.
        """
        ...

    def cancel(self, store: RunStore, trial_ids: list[str]) -> list[str]:
        """Cancel the queued or running jobs of `trial_ids`; returns the trials cancelled."""
        ...


def watch(store: RunStore, trial_ids: list[str], poll: Callable[[], tuple[int, int]],
          interval_s: float, timeout_s: float | None = None) -> None:
    """The executors' shared loop: `poll()` advances the backend and returns (trials that settled
    since the last call, trials still left); results.parquet is rewritten when some settled,
    progress is shown every tick, and the loop returns when none is left.

    `interval_s` is the sleep between polls (0 when `poll` itself waits, as `ray.wait` does).
    TimeoutError after `timeout_s`.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    rows = Rows(store)
    progress = Progress(store, trial_ids)
    try:
        while True:
            settled, left = poll()
            if settled:
                rows.write()
            progress.tick()
            if not left:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{left} trials still queued or running after {timeout_s:.0f} s")
            time.sleep(interval_s)
    finally:
        progress.close()
