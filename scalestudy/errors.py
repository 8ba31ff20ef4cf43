"""The small exception hierarchy: every error a user can cause says what is wrong and how to fix it."""

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


class StoreError(ScalestudyError):
    """A run directory is missing or unreadable."""

    exit_code = 2


class DivergedError(ScalestudyError):
    """Training produced a non-finite loss or gradient; the trial ends as `diverged`."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(f"diverged at step {step}: {what}")
        self.step = step
