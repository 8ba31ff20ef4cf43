"""Training batches for a run of steps: built in the trial's process, or in DataLoader workers.

`train_batches(dataset, batch_size, rows, start, end, workers=…)` yields (step, Batch) for steps
start + 1 … end in order, each this rank's `rows` of that step's global batch, uint8 images. A batch
is a pure function of (seed, step) (scalestudy.train.data's Dataset), so where it is built changes
nothing in it: resume is exact and ranks slice the same global batch whatever data.workers is.

With workers = 0 every batch is `dataset.train_batch(step, …)` in the trial's own process (real
data decodes the next step in a background thread), or comes from a run of steps a dataset builds
at once (`BuildsRuns`: the shapes data renders a run's images in one call, each batch bit for bit
the one `train_batch` gives). With workers > 0 a torch DataLoader runs over a map-style "dataset
of steps" (`StepDataset`: index = step, batch_size=None, the sampler the steps left to train):
each worker process builds whole batches, with one torch thread so it does not compete with the
training step's threads, and up to 2 × workers batches are built ahead. Workers ignore SIGTERM
and SIGINT (the trial's process checkpoints on them, then ends its workers). On a GPU the batches
arrive in pinned memory, so `images.to(device, non_blocking=True)` is a real asynchronous copy.
A worker that raises, dies or stalls for `timeout_s` ends the trial with a `DataWorkersFailed`
naming the step and the cause, never a hang; what a worker skips (unreadable images) is counted
in the trial's dataset (`ReportsSkips`), each image once however many workers met it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from scalestudy.train.data import Batch, Dataset


class DataWorkersFailed(RuntimeError):
    """A data loader worker process raised, died, or sent no batch in time; the trial stops."""


class StepRows(NamedTuple):
    """What a worker sends back for one step (a named tuple, so DataLoader pins its tensors)."""

    step: int
    images: torch.Tensor | None  # None: a batch of pool indices only (cached image features)
    captions: list[str]
    labels: torch.Tensor
    index: torch.Tensor | None  # each row's item of a finite pool (Batch.index)
    skips: Any  # the worker's dataset's skip_report() (None for a dataset that skips nothing)


@runtime_checkable
class ReportsSkips(Protocol):
    """A dataset that can skip samples while it builds a batch (scalestudy.train.realdata's
    unreadable images): a worker reports them, the trial's process counts them."""

    def skip_report(self) -> Any:
        """What this process skipped since its last report (picklable; empty when nothing)."""
        ...

    def add_skip_report(self, report: Any) -> None:
        """Count (without logging again) what another process reported."""
        ...


@runtime_checkable
class BuildsRuns(Protocol):
    """A dataset that builds several consecutive steps' batches at once, cheaper than one by one."""

    def train_batch_run(
        self, first: int, last: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> list[Batch]:
        """`train_batch` of steps first, first + 1, … (at least one, at most up to `last`)."""
        ...


class StepDataset(TorchDataset[StepRows]):
    """A map-style dataset whose index is the step: item s is `rows` of global batch s."""

    def __init__(self, dataset: Dataset, batch_size: int, rows: slice, images: bool = True) -> None:
        self.dataset, self.batch_size, self.rows, self.images = dataset, batch_size, rows, images

    def __getitem__(self, step: int) -> StepRows:
        batch = self.dataset.train_batch(step, self.batch_size, self.rows, images=self.images)
        skips = self.dataset.skip_report() if isinstance(self.dataset, ReportsSkips) else None
        return StepRows(step, batch.images, batch.captions, batch.labels, batch.index, skips)


def _as_built(rows: StepRows) -> StepRows:
    # Not DataLoader's default_convert, which would turn the skip report's tuples into lists.
    return rows


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGTERM/SIGINT reach the whole process group on preemption or Ctrl-C; the trial's process
    # handles them (checkpoint, then it ends its workers), so a worker must not die mid-batch.
    # The worker was born with them blocked (`_start_workers`): one that arrived before this point
    # waits pending, and is dropped when they are unblocked below with the disposition "ignore".
    # (DataLoader already gives each worker one torch thread.)
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_workers(loader: DataLoader) -> Iterator[StepRows]:
    """The loader's iterator, whose worker processes start with SIGTERM and SIGINT blocked (a
    child inherits its parent thread's signal mask), so a preemption signal to the process group
    while a worker is still starting cannot kill it before `_ignore_stop_signals` runs. In this
    process a signal that arrives meanwhile is only delayed, not lost: it is delivered on unblock."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _end_workers(batches: Iterator[StepRows]) -> None:
    """End the workers now: DataLoader's own shutdown (a sentinel, then SIGTERM), and SIGKILL for
    any that is still there: a worker stuck in a read, or one ignoring SIGTERM as ours do.

    `_workers` and `_shutdown_workers` are the DataLoader iterator's own (private) names; should a
    torch release rename them, dropping the iterator still ends healthy workers (its __del__).
    """
    workers = list(getattr(batches, "_workers", ()))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


def _failure(err: Exception, step: int, workers: int, timeout_s: float) -> DataWorkersFailed:
    """The trial's error for what DataLoader raised while the loop waited for `step`."""
    text = str(err)
    where = f"step {step}'s batch (data.workers={workers})"
    if "in DataLoader worker process" in text:
        # Raised inside a worker: it comes back with the worker's traceback; its last line says what.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return DataWorkersFailed(f"a data worker failed building {where}: {lines[-1]}")
    if text.startswith("DataLoader timed out"):
        return DataWorkersFailed(
            f"no batch came from the data workers for data.worker_timeout_s={timeout_s:g} s while "
            f"waiting for {where}: a worker is stuck (a stalled file read?); raise "
            "data.worker_timeout_s if one batch really takes that long, or set data.workers=0")
    # Anything else is the worker going away: DataLoader's own "exited unexpectedly" / "killed by
    # signal", or the broken pipe of a batch it was sending when it died.
    return DataWorkersFailed(
        f"a data worker process died while building {where} ({type(err).__name__}: {text.strip()}); "
        "out of memory? lower data.workers or the batch per rank")


def train_batches(
    dataset: Dataset, batch_size: int, rows: slice, start: int, end: int, workers: int = 0,
    pin_memory: bool = False, timeout_s: float = 600.0, images: bool = True,
) -> Iterator[tuple[int, Batch]]:
    """(step, this rank's rows of the global batch) for steps start + 1 … end, in order.

    `images=False` builds batches of pool indices without images (a locked tower's cached
    features stand in for them). Close the iterator (contextlib.closing) when the loop stops
    early, so the workers end at once.
    """
    steps = range(start + 1, end + 1)
    if workers == 0 or not steps:  # a trial resumed at its last step starts no worker
        step = start + 1
        while step <= end:
            run = (dataset.train_batch_run(step, end, batch_size, rows, images=images)
                   if isinstance(dataset, BuildsRuns)
                   else [dataset.train_batch(step, batch_size, rows, images=images)])
            for batch in run:
                yield step, batch
                step += 1
        return
    loader = DataLoader(
        StepDataset(dataset, batch_size, rows, images), batch_size=None, sampler=steps, num_workers=workers,
        collate_fn=_as_built, pin_memory=pin_memory, timeout=timeout_s, worker_init_fn=_ignore_stop_signals,
        # DataLoader draws its workers' base seed from this generator; without one it would draw
        # from the global RNG and shift the trial's random state by where the loader started.
        generator=torch.Generator().manual_seed(0),
    )
    batches = _start_workers(loader)
    try:
        for step in steps:
            try:
                got = next(batches)
            except Exception as err:
                raise _failure(err, step, workers, timeout_s) from err
            if got.step != step:
                raise DataWorkersFailed(f"the data workers sent step {got.step}'s batch when step {step} was due")
            if got.skips and isinstance(dataset, ReportsSkips):
                dataset.add_skip_report(got.skips)
            yield step, Batch(got.images, got.captions, got.labels, got.index)
    finally:
        _end_workers(batches)
