"""Slurm executor: trials as job arrays through submitit, submitted detached.

`run` groups the trials by the Slurm resources they need, splits each group into arrays of at most
the cluster's MaxArraySize, submits every array held, records each trial's job in its state.json
(`backend`, `job_id`, `log`, `sbatch_script`) and releases the array, then returns; `run --wait`
blocks with live progress. Trials whose job is still queued or running are never submitted twice.

Every task runs the one trial entry point, `run_trial(trial_dir, backend="slurm")`, inside
`TrialJob`, a submitit Checkpointable:

- USR2, submitit's preemption/timeout signal (Slurm sends it `executor.slurm.signal_delay_s`
  before the time limit): the trial saves a checkpoint at the end of its current step and the job
  is requeued; the new attempt resumes from that checkpoint. At most `executor.slurm.max_requeues`
  times; after that the trial stays `preempted` and `scalestudy run` resumes it.
- SIGTERM (scancel; a preemption that sends no user signal): the trial checkpoints and stops as
  `preempted`, not requeued.
- `scalestudy cancel RUN_DIR`: scancel, then each cancelled trial is `failed` with "cancelled" in
  its error. Plain `run` leaves it; `run --retry-failed` resumes it from its last checkpoint.

GPUs: a job gets whole GPUs, one task (rank) per GPU. A trial with more than one needs
`executor.slurm.gpus_per_node` and fills whole nodes of it; a GPU share (0 < resources.gpus < 1)
cannot run on Slurm. Both are refused, naming the fix, by `plan` and `run` before anything is
submitted (`resource_problem`).

submitit's folder is RUN_DIR/slurm: the sbatch script of each array (`<array id>_submission.sh`) and
one log per task (`<job id>_<rank>_log.out`, stdout and stderr together) are readable there.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import submitit

from scalestudy import allocator
from scalestudy.errors import SchedulerError, SpecError
from scalestudy.executors.base import watch
from scalestudy.load import profile_dirs, read_slurm_profile
from scalestudy.spec import ResourcesSpec, SlurmExecutorSpec, StudySpec
from scalestudy.store import ENDS, RunStore, Status, Trial, TrialStore

SLURM_DIR = "slurm"
# Slurm's own default when slurm.conf sets no MaxArraySize (indices 0..1000).
DEFAULT_MAX_ARRAY_SIZE = 1001
COMMAND_TIMEOUT_S = 60.0

# Job states (squeue/sacct words). A live job still holds or will hold a node; an ended one never
# runs again. PREEMPTED without a requeue is an end; a requeued job shows PENDING again.
LIVE = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
    "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD",
})
ENDED = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
    "ENDED",  # gone from squeue, and sacct is not available to say how
})
UNKNOWN = "UNKNOWN"  # gone from squeue, and sacct has no row yet (slurmdbd records a moment later)
# Ended this way, the trial lost only the steps since its last checkpoint: resumable, not failed.
RESUMABLE_ENDS = frozenset({"TIMEOUT", "PREEMPTED", "NODE_FAIL"})

# `wait` reads the store every WAIT_TICK_S (trials record their own ends) and asks Slurm only every
# SLURM_POLL_S, about jobs that may have died without a word: gentle on a shared scheduler.
WAIT_TICK_S = 1.0
SLURM_POLL_S = 5.0
# After scancel a task gets SIGTERM (it checkpoints) and is killed KillWait later (30 s by default).
CANCEL_WAIT_S = 60.0


# --- what to submit ------------------------------------------------------------------------------


def resource_problem(resources: ResourcesSpec, settings: SlurmExecutorSpec) -> str | None:
    """Why Slurm cannot run a trial with `resources` as asked (with the fix), or None.

    - A GPU share (0 < resources.gpus < 1): Slurm gives each job whole GPUs.
    - More than one GPU needs executor.slurm.gpus_per_node: without it the job would ask one node
      for all of them, which sbatch refuses on any cluster whose nodes have fewer, and only after
      the arrays before it were submitted. With it, the ranks fill whole nodes.
    """
    gpus, per_node = resources.gpus, settings.gpus_per_node
    if 0 < gpus < 1:
        return (f"resources.gpus={gpus:g} is a share of one GPU, but a Slurm job gets whole GPUs "
                "(scalestudy does not use the site-specific shard/mps GRES that share one); ask "
                "for resources.gpus=1, or run the study with --executor local or ray, which pack "
                "GPU shares onto one GPU")
    if gpus > 1 and per_node is None:
        return (f"resources.gpus={gpus} needs executor.slurm.gpus_per_node, the GPUs of one node "
                f"of your cluster, to place its {gpus} ranks on whole nodes (without it the job "
                f"asks one node for all {gpus} GPUs); set it (--set executor.slurm.gpus_per_node=N) "
                "or pick an executor.slurm.profile that sets it: "
                f"{profiles_with_gpus_per_node() or 'none found'}")
    if gpus and per_node and gpus > per_node and gpus % per_node:
        return (f"resources.gpus={gpus} does not fill whole nodes of executor.slurm.gpus_per_node="
                f"{per_node}; ask for at most {per_node} GPUs or a multiple of {per_node}")
    return None


def profiles_with_gpus_per_node() -> str:
    """The profiles that set gpus_per_node (shipped and $SCALESTUDY_SLURM_PROFILES), for messages:
    `gpu-a100 (8 per node), local (2 per node)`."""
    names = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    found = []
    for name in names:
        try:
            per_node = read_slurm_profile(name).get("gpus_per_node")
        except SpecError:
            continue  # a broken profile is reported when a study picks it
        if per_node:
            found.append(f"{name} ({per_node} per node)")
    return ", ".join(found)


def _trial_list(trials: list[Trial], shown: int = 3) -> str:
    ids = ", ".join(t.trial_id for t in trials[:shown])
    return ids + (f" and {len(trials) - shown} more" if len(trials) > shown else "")


def job_parameters(resources: ResourcesSpec, settings: SlurmExecutorSpec) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one trial: one Slurm task per data-parallel rank."""
    problem = resource_problem(resources, settings)
    if problem:
        raise SpecError(problem)
    ranks = resources.world_size
    nodes = 1
    per_node = settings.gpus_per_node
    if resources.gpus and per_node and resources.gpus > per_node:
        nodes = int(resources.gpus) // per_node
    params: dict[str, Any] = {
        "nodes": nodes,
        "ntasks_per_node": ranks // nodes,
        # resources.cpus is the whole trial's; each rank's task gets its share.
        "cpus_per_task": max(1, resources.cpus // ranks),
        "time": settings.time_min,
        "signal_delay_s": settings.signal_delay_s,
        "array_parallelism": settings.array_parallelism,
        "stderr_to_stdout": True,  # one log per task: the traceback sits next to the progress
    }
    if resources.gpus:
        params["gpus_per_node"] = int(resources.gpus) // nodes
    if settings.mem_gb is not None:
        params["mem"] = f"{math.ceil(settings.mem_gb * 1024)}M"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(settings, key):
            params[key] = getattr(settings, key)
    # The allocator is preloaded by the job script: the task's Python cannot change its own malloc.
    try:
        preload = allocator.setup_line(resources.allocator, os.environ)
    except ValueError as err:
        raise SpecError(str(err)) from None
    setup = [*settings.setup, *([preload] if preload else [])]
    if setup:
        params["setup"] = setup
    if settings.sbatch:
        params["additional_parameters"] = dict(settings.sbatch)
    return params


@dataclass(frozen=True)
class ArrayPlan:
    """One job array: trials that need the same Slurm resources, at most MaxArraySize of them."""

    parameters: dict[str, Any]
    trials: list[Trial]

    @property
    def array(self) -> str:
        """The `--array` value submitit writes for these trials."""
        n = len(self.trials)
        return f"0-{n - 1}%{min(n, self.parameters['array_parallelism'])}"

    def sbatch_flags(self) -> list[str]:
        """The #SBATCH options of the array, as `--name=value`, for `plan`."""
        shown = {k: v for k, v in self.parameters.items()
                 if k not in ("setup", "additional_parameters", "array_parallelism",
                              "signal_delay_s", "stderr_to_stdout")}
        shown["signal"] = f"USR2@{self.parameters['signal_delay_s']}"
        shown.update(self.parameters.get("additional_parameters", {}))
        if len(self.trials) > 1:
            shown["array"] = self.array
        return [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in shown.items()]


def by_resources(trials: list[Trial]) -> list[list[Trial]]:
    """The trials grouped by the Slurm resources they need, study order kept within a group."""

    def need(trial: Trial) -> tuple[int, float, int, str]:
        r = trial.config.resources
        return r.cpus, r.gpus, r.workers, r.allocator

    return [list(group) for _, group in groupby(sorted(trials, key=need), key=need)]


def check_resources(trials: list[Trial], settings: SlurmExecutorSpec) -> None:
    """SpecError listing every group of trials that Slurm cannot run as asked
    (`resource_problem`): `validate`, `plan` and `run` fail before anything is submitted."""
    problems = [f"{problem} (trials {_trial_list(group)})"
                for group in by_resources(trials)
                if (problem := resource_problem(group[0].config.resources, settings))]
    if problems:
        raise SpecError("\n".join(problems))


def plan_arrays(
    trials: list[Trial], settings: SlurmExecutorSpec, max_array_size: int
) -> list[ArrayPlan]:
    """Group trials by the resources they need (study order kept within a group), then split each
    group into arrays of at most `max_array_size` tasks (indices 0..MaxArraySize−1)."""
    check_resources(trials, settings)
    arrays = []
    for members in by_resources(trials):
        parameters = job_parameters(members[0].config.resources, settings)
        for start in range(0, len(members), max_array_size):
            arrays.append(ArrayPlan(parameters, members[start:start + max_array_size]))
    return arrays


def describe(trials: list[Trial], study: StudySpec) -> dict[str, Any]:
    """What `run --executor slurm` would submit: arrays, their sbatch options, an hours bound."""
    settings = study.executor.slurm
    limit = cluster_max_array_size()
    arrays = plan_arrays(trials, settings, limit or DEFAULT_MAX_ARRAY_SIZE)
    hours = settings.time_min / 60
    return {
        "max_array_size": limit or DEFAULT_MAX_ARRAY_SIZE,
        "max_array_size_source": (
            "scontrol show config" if limit else "Slurm's default (no cluster reachable)"),
        "arrays": [{"trials": [t.trial_id for t in a.trials], "sbatch": a.sbatch_flags(),
                    "setup": a.parameters.get("setup", [])} for a in arrays],
        # Upper bounds: each attempt may run to the time limit; requeues add up to max_requeues more.
        "gpu_hours_max": sum(t.config.resources.gpus for t in trials) * hours,
        "cpu_hours_max": sum(t.config.resources.cpus for t in trials) * hours,
        "time_min": settings.time_min,
        "max_requeues": settings.max_requeues,
        "gpus_per_node": settings.gpus_per_node,
        "gpu_trials": sum(t.config.resources.gpus > 0 for t in trials),
    }


def format_description(plan: dict[str, Any]) -> str:
    lines = [f"Slurm: {len(plan['arrays'])} job array(s), MaxArraySize {plan['max_array_size']} "
             f"(from {plan['max_array_size_source']})"]
    for i, array in enumerate(plan["arrays"], 1):
        lines.append(f"  array {i}: {len(array['trials'])} trials  {' '.join(array['sbatch'])}")
        lines += [f"    setup: {line}" for line in array["setup"]]
    if plan["gpu_trials"] and plan["gpus_per_node"]:
        per_node = plan["gpus_per_node"]
        lines.append(f"  GPU placement: nodes of executor.slurm.gpus_per_node={per_node} GPUs; a trial "
                     f"with more resources.gpus runs on resources.gpus / {per_node} whole nodes, "
                     "one task (rank) per GPU")
    lines.append(
        f"  at most {plan['gpu_hours_max']:.1f} GPU-hours and {plan['cpu_hours_max']:.1f} CPU-hours "
        f"(every trial running to the {plan['time_min']} min limit once; each of up to "
        f"{plan['max_requeues']} requeues can add as much again)"
    )
    return "\n".join(lines)


# --- the cluster ---------------------------------------------------------------------------------


def slurm_command(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command; a missing command or an unreachable controller says so."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise SchedulerError(
            f"`{args[0]}` is not on PATH: run on a Slurm login node (to try Slurm on this "
            "machine: bash cluster/slurm/slurm-local.sh start)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(
            f"`{' '.join(args)}` did not answer in {COMMAND_TIMEOUT_S:.0f} s; is slurmctld up?"
        ) from None


def checked(args: list[str]) -> str:
    proc = slurm_command(args)
    if proc.returncode != 0:
        raise SchedulerError(f"`{' '.join(args)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def cluster_max_array_size() -> int | None:
    """MaxArraySize from `scontrol show config`, or None when no cluster answers."""
    try:
        proc = slurm_command(["scontrol", "show", "config"])
    except SchedulerError:
        return None
    if proc.returncode != 0:
        return None
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", proc.stdout, re.MULTILINE)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


def expand_job_ids(field: str) -> list[str]:
    """sacct's JobID field as single ids: `12_[0-3,7%2]` → 12_0 … 12_3, 12_7."""
    match = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", field)
    if not match:
        return [field]
    main, ranges = match.groups()
    ids = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        ids += [f"{main}_{i}" for i in range(int(low), int(high or low) + 1)]
    return ids


def query_job_states(job_ids: list[str]) -> dict[str, str]:
    """Each job's state: squeue's while it is in the queue, else sacct's (else UNKNOWN/ENDED)."""
    mains = sorted({job.split("_")[0] for job in job_ids})
    squeue = ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(mains)]
    proc = slurm_command(squeue)
    # slurmctld forgets ended jobs after MinJobAge; asking only about those is an "error".
    if proc.returncode != 0 and "Invalid job id" not in proc.stderr:
        raise SchedulerError(f"`{' '.join(squeue)}` failed: {proc.stderr.strip()}")
    states = dict(line.split("|", 1) for line in proc.stdout.split()) if proc.returncode == 0 else {}
    missing = [job for job in job_ids if job not in states]
    if missing:
        proc = slurm_command(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(mains)])
        if proc.returncode != 0:  # no accounting: a job that left the queue has ended, reason unknown
            return {job: states.get(job, "ENDED") for job in job_ids}
        recorded: dict[str, str] = {}
        for line in proc.stdout.split("\n"):
            if "|" in line:
                field, state = line.split("|", 1)
                for job in expand_job_ids(field):
                    recorded[job] = state.split()[0]  # "CANCELLED by 0" → CANCELLED
        states.update({job: recorded.get(job, UNKNOWN) for job in missing})
    return {job: states[job] for job in job_ids}


# --- what runs on the cluster --------------------------------------------------------------------


class TrialJob(submitit.helpers.Checkpointable):
    """One Slurm task of one trial. Runs the trial entry point in a worker thread, so the main
    thread stays free for submitit's USR2 handler, which calls `checkpoint`."""

    def __init__(self, trial_dir: str, max_requeues: int) -> None:
        self.trial_dir = trial_dir
        self.max_requeues = max_requeues
        self.requeues = 0
        self._stop: threading.Event | None = None
        self._worker: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Pickled at submission and at every requeue: the running attempt's thread stays behind.
        return {k: v for k, v in self.__dict__.items() if k not in ("_stop", "_worker")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _stop=None, _worker=None)

    def __call__(self) -> str:
        # Imported here, on the compute node: plan, status and cancel never need torch.
        from scalestudy.errors import Preempted
        from scalestudy.train.loop import run_trial

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # torch.distributed's env:// rendezvous (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
            # hosted by the job's first node. CUDA_VISIBLE_DEVICES stays as Slurm set it: each rank
            # picks cuda:LOCAL_RANK among the node's GPUs.
            submitit.helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True
            )
        ts = TrialStore(self.trial_dir)
        state = ts.state()
        if state.status.is_result:
            return state.status.value  # a job requeued after its trial finished: nothing to do
        print(
            f"scalestudy: trial {ts.trial_id} attempt {state.attempts + 1} (last "
            f"recorded step {state.step or 0}), Slurm job {env.job_id} rank "
            f"{env.global_rank}/{env.num_tasks} "
            f"on {socket.gethostname()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '(unset)')}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}",
            flush=True,
        )
        stop = self._stop = threading.Event()
        outcome: list[BaseException] = []

        def train() -> None:
            try:
                run_trial(self.trial_dir, backend="slurm", stop=stop)
            except BaseException as err:  # noqa: BLE001 - handed to the main thread below
                outcome.append(err)

        # submitit ignores SIGTERM (it waits for USR2); a scancel should still save the progress.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        self._worker = threading.Thread(target=train, name=f"trial-{ts.trial_id}")
        self._worker.start()
        while self._worker.is_alive():
            self._worker.join(timeout=1.0)
        # The trial has ended: a late USR2 must not requeue it.
        signal.signal(getattr(signal, f"SIG{env.USR_SIG}"), signal.SIG_IGN)
        if outcome:
            if isinstance(outcome[0], Preempted) and env.global_rank != 0:
                return Status.PREEMPTED.value  # rank 0 decides about the requeue
            raise outcome[0]
        return ts.state().status.value

    def checkpoint(self) -> submitit.helpers.DelayedSubmission | None:
        """USR2 on rank 0: let the trial finish its step and save a checkpoint, then requeue."""
        if self._stop is not None and self._worker is not None:
            self._stop.set()
            self._worker.join()
        ts = TrialStore(self.trial_dir)
        if ts.state().status != Status.PREEMPTED:
            return None  # it ended by itself meanwhile (done, diverged, failed): nothing to resume
        if self.requeues >= self.max_requeues:
            ts.update_state(
                error=f"stopped by Slurm (preemption or time limit) {self.requeues + 1} times; "
                f"not requeued again (executor.slurm.max_requeues={self.max_requeues}); "
                "`scalestudy run` resumes it from its checkpoint"
            )
            return None
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self)


# --- the executor --------------------------------------------------------------------------------


def _settle(ts: TrialStore, job_state: str) -> None:
    """Record the end of a trial whose job ended before the trial could record it (killed by
    scancel, the time limit, the OOM killer, a node failure)."""
    state = ts.state()
    if state.status not in (Status.PENDING, Status.RUNNING) or job_state not in ENDED:
        return
    job, log = state.job_id, state.log
    if job_state == "CANCELLED":
        _mark_cancelled(ts)
    elif job_state in RESUMABLE_ENDS:
        ts.update_state(status=Status.PREEMPTED, slurm_state=job_state, error=(
            f"Slurm job {job} ended {job_state}; `scalestudy run` resumes it from its last "
            f"checkpoint (log: {log})"))
    else:
        ts.update_state(status=Status.FAILED, slurm_state=job_state, finished_at=time.time(), error=(
            f"Slurm job {job} ended {job_state} before the trial recorded its end; see its log: "
            f"{log}\n{_tail(log)}"))


def _mark_cancelled(ts: TrialStore) -> None:
    state = ts.state()
    resume = f"its checkpoint at step {state.step}" if state.step else "the start"
    ts.update_state(status=Status.FAILED, slurm_state="CANCELLED", finished_at=time.time(), error=(
        f"cancelled (Slurm job {state.job_id}); `scalestudy run --retry-failed` resumes it "
        f"from {resume} (log: {state.log})"))


def _tail(log: str | None, lines: int = 20) -> str:
    try:
        return "\n".join(Path(log or "").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class SlurmExecutor:
    name = "slurm"

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        """Submit the trials that have no job queued or running; return at once."""
        settings = study.executor.slurm
        jobs = self.job_states(store, [t.trial_id for t in trials])
        queued = [t.trial_id for t in trials if jobs.get(t.trial_id) in LIVE]
        todo = [t for t in trials if t.trial_id not in queued]
        if queued:
            trials_word = "trial" if len(queued) == 1 else "trials"
            print(f"{len(queued)} {trials_word} already queued or running in Slurm, not submitted again")
        limit = cluster_max_array_size()
        if limit is None:
            raise SchedulerError("no Slurm cluster answers `scontrol show config`; run on a login "
                             "node (locally: bash cluster/slurm/slurm-local.sh start)")
        arrays = plan_arrays(todo, settings, limit)
        submitted = [self._submit(store, array, settings, study.name) for array in arrays]
        if submitted:
            print(f"submitted {len(todo)} trials as {len(submitted)} Slurm job(s) "
                  f"({', '.join(submitted)}); scripts and logs in {store.root / SLURM_DIR}\n"
                  f"follow: scalestudy status {store.root}    stop: scalestudy cancel {store.root}")

    def _submit(
        self, store: RunStore, array: ArrayPlan, settings: SlurmExecutorSpec, study_name: str
    ) -> str:
        try:
            executor = submitit.SlurmExecutor(
                folder=store.root / SLURM_DIR, max_num_timeout=settings.max_requeues,
                python=settings.python,
            )
        except RuntimeError as err:  # no srun on PATH
            raise SchedulerError(f"{err}; run on a Slurm login node") from None
        parameters = dict(array.parameters, job_name=f"scalestudy-{study_name}")
        # Held until every trial's state.json names its job: a task that started earlier would
        # have its `running` overwritten by the `pending` written here.
        parameters["additional_parameters"] = {
            **parameters.get("additional_parameters", {}), "hold": True}
        executor.update_parameters(**parameters)
        trial_jobs = [TrialJob(str(store.trial(t.trial_id).path), settings.max_requeues)
                      for t in array.trials]
        try:
            jobs = executor.submit_array(trial_jobs)
        except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError) as err:
            raise SchedulerError(f"sbatch refused {len(trial_jobs)} trials: {err}") from None
        array_id = jobs[0].job_id.split("_")[0]
        try:
            for trial, job in zip(array.trials, jobs):
                store.trial(trial.trial_id).update_state(
                    status=Status.PENDING, backend=self.name, job_id=job.job_id,
                    log=str(job.paths.stdout), sbatch_script=str(job.paths.submission_file),
                    submitted_at=time.time(), error=None,
                )
        finally:
            checked(["scontrol", "release", array_id])
        return array_id

    def job_states(self, store: RunStore, trial_ids: list[str]) -> dict[str, str]:
        jobs = {}
        for tid in trial_ids:
            state = store.trial(tid).state()
            if state.backend == self.name and state.job_id:
                jobs[tid] = str(state.job_id)
        if not jobs:
            return {}
        states = query_job_states(list(jobs.values()))
        for tid, job in jobs.items():
            _settle(store.trial(tid), states[job])
        return {tid: states[job] for tid, job in jobs.items()}

    def wait(self, store: RunStore, trial_ids: list[str], timeout_s: float | None = None) -> None:
        """Block until none of `trial_ids` has a job queued or running; Ctrl-C only stops waiting."""
        jobs: dict[str, str] = {}
        polled, ended = 0.0, -1

        def poll() -> tuple[int, int]:
            # The store every WAIT_TICK_S (trials record their own ends), Slurm every SLURM_POLL_S.
            nonlocal jobs, polled, ended
            if time.monotonic() - polled >= SLURM_POLL_S:
                jobs, polled = self.job_states(store, trial_ids), time.monotonic()
            waiting = [tid for tid in trial_ids if store.trial(tid).state().status not in ENDS
                       and jobs.get(tid) in LIVE | {UNKNOWN}]
            settled = len(trial_ids) - len(waiting) - ended
            ended = len(trial_ids) - len(waiting)
            return settled, len(waiting)

        try:
            watch(store, trial_ids, poll, WAIT_TICK_S, timeout_s)
        except KeyboardInterrupt:
            print(f"\nstopped waiting; the jobs keep running in Slurm (scalestudy status "
                  f"{store.root}; scalestudy cancel {store.root})", file=sys.stderr)

    def cancel(self, store: RunStore, trial_ids: list[str]) -> list[str]:
        jobs = self.job_states(store, trial_ids)
        live = [tid for tid in trial_ids if jobs.get(tid) in LIVE]
        if not live:
            return []
        job_ids = [str(store.trial(tid).state().job_id) for tid in live]
        checked(["scancel", *job_ids])
        # Trials checkpoint on SIGTERM; mark them once their tasks are gone, so no dying task's
        # last write lands after ours.
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline and any(
            s in LIVE for s in query_job_states(job_ids).values()
        ):
            time.sleep(1.0)
        for tid in live:
            if store.trial(tid).state().status in (Status.PENDING, Status.RUNNING, Status.PREEMPTED):
                _mark_cancelled(store.trial(tid))
        return live
