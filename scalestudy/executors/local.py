"""Local executor: each trial in its own worker process (`python -m scalestudy.trial TRIAL_DIR`),
as many at once as this machine's CPUs and GPUs allow.

A process per trial isolates crashes and memory and makes "kill one trial" mean what it says.

The machine's GPUs form a pool (`ResourcePool`): a trial holds its `resources.gpus` of them while
it runs and its process sees exactly those (CUDA_VISIBLE_DEVICES), so no two trials train on one
GPU unless both asked for a share of one (a fraction below 1; shares are packed onto as few GPUs
as fit them, as Ray packs `num_gpus` fractions). A trial whose GPUs are busy waits; a later trial
that fits starts meanwhile. The GPUs are CUDA_VISIBLE_DEVICES's entries when it is set, else what
`nvidia-smi -L` lists: the driver never imports torch, which costs it seconds. On a machine without
GPUs, trials that ask for some run without an assignment after one warning: `train.device: auto`
trains them on the CPU, `train.device: cuda` fails inside the trial.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scalestudy.errors import UsageError
from scalestudy.executors import process
from scalestudy.executors.base import watch
from scalestudy.spec import ResourcesSpec, StudySpec
from scalestudy.store import Rows, RunStore, Status, Trial

POLL_S = 0.5
NVIDIA_SMI_TIMEOUT_S = 30.0
SHARES = ResourcesSpec.GPU_SHARES  # one GPU, in the units fractional resources.gpus are counted in


def default_parallel(trials: list[Trial]) -> int:
    cpus = max((t.config.resources.cpus for t in trials), default=1)
    return max(1, (os.cpu_count() or 1) // cpus)


# --- which GPUs this machine has -----------------------------------------------------------------


def parse_visible_devices(value: str) -> list[str]:
    """The devices CUDA_VISIBLE_DEVICES names, as CUDA reads it: indices or UUIDs separated by
    commas, up to the first invalid entry (`-1`, or an empty value, hides every GPU)."""
    devices = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


def parse_nvidia_smi(listing: str) -> list[str]:
    """The devices in `nvidia-smi -L`'s output: each GPU's index, or, for a GPU split into MIG
    instances, the instances' UUIDs (CUDA sees the instances, not the GPU)."""
    gpus: list[tuple[str, list[str]]] = []
    for line in listing.splitlines():
        if gpu := re.match(r"GPU (\d+):", line):
            gpus.append((gpu.group(1), []))
        elif (mig := re.search(r"^\s+MIG\b.*\(UUID: (MIG-[^)\s]+)\)", line)) and gpus:
            gpus[-1][1].append(mig.group(1))
    return [device for index, migs in gpus for device in (migs or [index])]


def machine_gpus(environ: Mapping[str, str]) -> tuple[list[str], str]:
    """This machine's GPUs for trials, and where that answer comes from (for messages)."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        value = environ["CUDA_VISIBLE_DEVICES"]
        return parse_visible_devices(value), f"CUDA_VISIBLE_DEVICES={value!r}"
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False,
                                 timeout=NVIDIA_SMI_TIMEOUT_S)
    except FileNotFoundError:
        return [], "no nvidia-smi on PATH and CUDA_VISIBLE_DEVICES unset"
    except subprocess.TimeoutExpired:
        return [], f"`nvidia-smi -L` did not answer in {NVIDIA_SMI_TIMEOUT_S:.0f} s"
    if listing.returncode != 0:
        why = (listing.stderr or listing.stdout).strip().splitlines()[:1]
        return [], f"`nvidia-smi -L` failed: {why[0] if why else f'exit status {listing.returncode}'}"
    return parse_nvidia_smi(listing.stdout), "nvidia-smi -L"


# --- who runs, on which GPUs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    trial_id: str
    # The devices the trial's process sees (empty for a CPU trial); None: no GPU assignment at
    # all, on a machine without GPUs (the process sees what the executor sees).
    gpus: tuple[str, ...] | None


class ResourcePool:
    """This machine's trial slots and GPUs, and what each running trial holds. Bookkeeping only
    (no processes), so the rules stand on their own:

    - every trial takes one of `slots` (the CPU bound);
    - `gpus` = n ≥ 1: n GPUs of its own that nobody holds any share of, lowest first;
    - 0 < `gpus` < 1: that share of one GPU, on the fullest GPU it still fits on (best fit), so
      shares pack together and whole GPUs stay free for whole-GPU trials; shares are counted in
      1/GPU_SHARES units, so three trials of 1/3 fit one GPU, as on Ray;
    - `gpus` = 0: no GPU (its process sees none);
    - without devices (a machine without GPUs) nothing is held back for GPUs and nothing assigned.
    """

    def __init__(self, slots: int, devices: Sequence[str]) -> None:
        self.slots = slots
        self.devices = tuple(devices)
        self._free = [SHARES] * len(self.devices)  # unheld shares of each device
        self._held: dict[str, list[tuple[int, int]]] = {}  # trial → (device, shares) it holds

    def fits_at_all(self, gpus: float) -> bool:
        """Whether a trial asking for `gpus` can ever start here (once the others have ended)."""
        return not self.devices or gpus <= len(self.devices)

    def place(self, trial_id: str, gpus: float) -> Placement | None:
        """Take a slot and `gpus` for `trial_id`; None (and nothing taken) when it must wait."""
        if trial_id in self._held:
            raise ValueError(f"trial {trial_id} already holds its resources")
        if len(self._held) >= self.slots:
            return None
        if gpus == 0 or not self.devices:
            grant: list[tuple[int, int]] = []
        elif gpus >= 1:
            whole = [i for i, free in enumerate(self._free) if free == SHARES][:int(gpus)]
            if len(whole) < gpus:
                return None
            grant = [(i, SHARES) for i in whole]
        else:
            need = round(gpus * SHARES)
            fitting = [i for i, free in enumerate(self._free) if free >= need]
            if not fitting:
                return None
            grant = [(min(fitting, key=lambda i: (self._free[i], i)), need)]
        for i, shares in grant:
            self._free[i] -= shares
        self._held[trial_id] = grant
        if gpus > 0 and not self.devices:
            return Placement(trial_id, None)
        return Placement(trial_id, tuple(self.devices[i] for i, _ in grant))

    def release(self, trial_id: str) -> None:
        """The trial has ended: its slot and GPU shares are free again."""
        for i, shares in self._held.pop(trial_id):
            self._free[i] += shares

    def admit(self, waiting: Sequence[tuple[str, float]]) -> list[Placement]:
        """Place the waiting (trial id, gpus) in order while slots last. One whose GPUs are busy
        waits, and later ones that fit start meanwhile (backfilling, as Ray schedules): GPUs do
        not idle behind a trial that waits for more of them, which smaller trials may overtake."""
        placed = []
        for trial_id, gpus in waiting:
            if len(self._held) >= self.slots:
                break
            if (placement := self.place(trial_id, gpus)) is not None:
                placed.append(placement)
        return placed


def pool_for(trials: list[Trial], slots: int, environ: Mapping[str, str]) -> ResourcePool:
    """The pool the trials run from. Looks for GPUs only when some trial asks for them; a trial
    that needs more GPUs than the machine has is an error before anything starts."""
    wanted = [t for t in trials if t.config.resources.gpus > 0]
    if not wanted:
        return ResourcePool(slots, [])
    devices, source = machine_gpus(environ)
    pool = ResourcePool(slots, devices)
    if not devices:
        print(f"warning: {len(wanted)} trial(s) ask for resources.gpus > 0 but this machine has no "
              f"GPU ({source}): they run without a GPU assignment, as many at once as the CPUs "
              "allow; train.device=auto trains them on the CPU, train.device=cuda fails",
              file=sys.stderr)
        return pool
    unfit = [t for t in wanted if not pool.fits_at_all(t.config.resources.gpus)]
    if unfit:
        raise UsageError(
            "; ".join(f"trial {t.trial_id} needs resources.gpus={t.config.resources.gpus:g}"
                      for t in unfit)
            + f", but this machine has {len(devices)} GPU(s) ({source}: {', '.join(devices)}); "
            "lower resources.gpus, or run the study where nodes are bigger (--executor ray or slurm)"
        )
    return pool


class LocalExecutor:
    name = "local"

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        slots = study.executor.local.max_parallel or default_parallel(trials)
        pool = pool_for(trials, slots, os.environ)
        queue = {t.trial_id: t for t in trials}  # study order
        running: dict[str, subprocess.Popen[bytes]] = {}

        def poll() -> tuple[int, int]:
            for placement in pool.admit([(tid, t.config.resources.gpus) for tid, t in queue.items()]):
                trial = queue.pop(placement.trial_id)
                running[trial.trial_id] = self._start(store, trial, placement.gpus)
            settled = 0
            for tid, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[tid]
                    pool.release(tid)
                    self._settle(store, tid, proc.returncode)
                    settled += 1
            return settled, len(queue) + len(running)

        try:
            watch(store, [t.trial_id for t in trials], poll, POLL_S)
        except KeyboardInterrupt:
            self._stop(store, running)
            raise

    def _start(self, store: RunStore, trial: Trial,
               gpus: tuple[str, ...] | None) -> subprocess.Popen[bytes]:
        ts = store.trial(trial.trial_id)
        resources = trial.config.resources
        env = process.trial_env(os.environ, resources.cpus, gpus, resources.allocator)
        return process.start_trial(ts.path, self.name, env, ts.log_path, signal.SIGTERM)

    @staticmethod
    def _settle(store: RunStore, trial_id: str, returncode: int) -> None:
        """Make state.json true after a worker that could not record its own end (a kill)."""
        ts = store.trial(trial_id)
        killer = process.killed_by(returncode)
        if killer and ts.state().status == Status.RUNNING:
            ts.update_state(
                status=Status.PREEMPTED,
                error=f"worker killed by {killer}; resumes from its last checkpoint "
                f"(log: {ts.log_path})",
            )

    def _stop(self, store: RunStore, running: dict[str, subprocess.Popen[bytes]]) -> None:
        # The workers share our process group, so Ctrl-C reached them too; they checkpoint and exit.
        for proc in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for tid, proc in running.items():
            self._settle(store, tid, process.stop(proc))
        Rows(store).write()
