"""The small exception hierarchy: every error a user can cause says what is wrong and how to fix it.

`ScalestudyError` and its subclasses are reported by the CLI as one line, without a traceback, with
their `exit_code`: 2 when the user's input is wrong (nothing was written), 1 when the input was
fine but something outside it failed (a scheduler, a cluster). The rest are signals between the
trial loop and the executors, not user errors.
"""

from __future__ import annotations


class ScalestudyError(Exception):
    """Base class: an error scalestudy reports to the user without a traceback."""

    exit_code = 1


class SpecError(ScalestudyError):
    """The study file, a `--set` override or a sweep is invalid. Nothing has been written."""

    exit_code = 2


class UsageError(ScalestudyError):
    """The command line asks for something that cannot be done (missing run dir, bad flag value)."""

    exit_code = 2


class MissingExtra(UsageError):
    """The command needs an optional dependency that is not installed (`pip install scalestudy[X]`)."""

    def __init__(self, extra: str, module: str, what: str) -> None:
        super().__init__(
            f"{what} needs the optional dependency {module!r}, which is not installed; install it "
            f"with `pip install 'scalestudy[{extra}]'` (or `make install` in a checkout)"
        )


class StoreError(ScalestudyError):
    """A run directory is missing or unreadable."""

    exit_code = 2


class ConfigChanged(ScalestudyError):
    """A trial already in the run directory was computed with a config that differs from the
    study's now (a default changed between versions); nothing was run."""

    exit_code = 2


class SchedulerError(ScalestudyError):
    """The scheduler or cluster (Slurm, Ray) failed or refused work; the study itself is valid."""

    exit_code = 1


class RayClusterError(UsageError):
    """The Ray cluster cannot run this study as it is asked to (auth mode, resources, a run
    directory the nodes do not share, software): the user changes the command or the cluster."""


class NotFittable(ValueError):
    """The data cannot support a saturating power-law fit; the message says why and what to add."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the trial checkpoints where it is and stops as `preempted`."""


class DivergedError(Exception):
    """Training produced a non-finite loss or gradient norm at `step`; the trial ends as `diverged`
    (a result, its history kept), not as a failure."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"diverged at step {step}: {what}")
        self.step = step


class TrialKilled(Exception):
    """The trial process was stopped from outside (a signal, the OOM killer, a node draining).

    Raised inside a Ray task so that Ray retries it like a dead worker (`retry_exceptions`).
    """
