"""Ray executor: each trial is one Ray task that runs `python -m scalestudy.trial TRIAL_DIR`.

`executor.ray.address=local` (the default) starts a private Ray for the run and stops it after;
`auto` or `HOST:PORT` joins a running cluster. A trial's `resources.cpus` and `resources.gpus`
become the task's `num_cpus` and `num_gpus`, so Ray packs trials onto the nodes as they fit: a
fraction below 1 shares one GPU with other fractional tasks; a whole number above 1 is one task
on one node that starts its data-parallel ranks there (scalestudy.train.ranks). The trial process
sees exactly the GPUs Ray assigned (CUDA_VISIBLE_DEVICES), none for a CPU trial.

Why the task starts the trial as a subprocess instead of calling `run_trial` in the Ray worker:
- Ray reuses workers across tasks and torch reads OMP_NUM_THREADS only at its first import, so
  thread pools leak between trials with different CPU counts; two 2-thread trials on 2 cores ran
  about 10× slower (measured with Ray 2.60 on a 2-core machine: 49–65 s instead of 5.5 s). A fresh
  process gets exactly the CPUs Ray assigned to the task, as OMP_NUM_THREADS and through the
  trial's own `torch.set_num_threads(resources.cpus)`.
- SIGTERM → checkpoint → `preempted` is the trial's own signal handling, which needs the main
  thread of its own process; the same code path as the local executor, so a trial behaves the
  same on both. A trial that crashes its interpreter takes only its own process down.
- The price, one Python + torch import per trial, is what the local executor pays as well.

Faults: a trial that raises records `failed` itself and is not retried; a dead Ray
worker, or a trial process killed by a signal, is retried `executor.ray.max_retries` times (the
trial resumes from its checkpoint) and then `failed` with the reason. Ctrl-C cancels the tasks:
queued trials stay `pending`, running ones checkpoint and become `preempted`.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scalestudy.errors import RayClusterError, SchedulerError, TrialKilled
from scalestudy.executors import process
from scalestudy.executors.base import watch
from scalestudy.spec import RayExecutorSpec, StudySpec
from scalestudy.store import Rows, RunStore, Status, Trial, TrialStore, atomic_write_text

POLL_S = 0.5
# A node that cannot answer a trivial task in this long is not one trials can run on either.
PROBE_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------
# Inside the Ray worker


def listen_for_cancel() -> None:
    """Let Ray's cancel reach this task: it raises KeyboardInterrupt through Python's SIGINT
    handler (`_thread.interrupt_main`), which does nothing while SIGINT is ignored, as it is in
    every worker of a cluster started with SIGINT ignored (`nohup ray start --head &` in a script:
    a shell without job control starts background jobs so). Ctrl-C would then leave the trials
    running until the driver gave up and killed them, losing their work since the last checkpoint."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL)):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_trial_process(trial_dir: str) -> int:
    """Task body: run the trial as a child process; return its exit status (0 done, 1 failed).

    Raises TrialKilled when the child was stopped by a signal (Ray retries the task). On a
    cancel (Ray raises KeyboardInterrupt here) the child checkpoints and exits as `preempted`.
    """
    listen_for_cancel()
    context = ray.get_runtime_context()
    cpus = int(context.get_assigned_resources().get("CPU", 1))
    trial = TrialStore(Path(trial_dir))
    trial.update_state(ray_task_id=context.get_task_id(), ray_node_id=context.get_node_id())
    # The GPUs Ray gave this task (one for a fractional num_gpus, shared with other tasks), set
    # explicitly: Ray 2.60 leaves a task without GPUs the worker's CUDA_VISIBLE_DEVICES rather
    # than an empty one (ray-project/ray#54868), and a CPU trial must see no GPU.
    gpus = [str(gpu) for gpu in context.get_accelerator_ids().get("GPU", [])]
    try:
        env = process.trial_env(os.environ, cpus, gpus, trial.read_trial().config.resources.allocator)
    except ValueError as err:  # an allocator this node lacks (the driver checked its own machine)
        trial.update_state(status=Status.FAILED, error=f"on {socket.gethostname()}: {err}",
                           finished_at=time.time())
        return process.EXIT_FAILED
    # A session of its own: the child's signals come from this task only. SIGKILL when the worker
    # dies: Ray may already retry the trial elsewhere, so it must not go on writing.
    child = process.start_trial(trial_dir, "ray", env, trial.log_path, signal.SIGKILL,
                                new_session=True)
    try:
        # Short sleeps, not one blocking wait: Ray's cancel interrupts Python code only between
        # bytecodes, so a blocking wait would hold Ctrl-C until the trial ended.
        while child.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        process.stop(child)
        raise
    if child.returncode < 0 or child.returncode == process.EXIT_PREEMPTED:
        how = process.killed_by(child.returncode) or "SIGTERM (it checkpointed)"
        raise TrialKilled(f"trial process {child.pid} on {socket.gethostname()} was stopped by "
                          f"{how}; log: {trial.log_path}")
    return child.returncode


def probe_node(run_dir: str, token: str) -> dict[str, Any]:
    """Task body of the pre-flight check: can this node read and write the run directory?"""
    node = ray.get_runtime_context().get_node_id()
    marker = Path(run_dir) / f".ray-probe-{token}"
    answer: dict[str, Any] = {"host": socket.gethostname(), "python": sys.executable,
                              "scalestudy": importlib.util.find_spec("scalestudy") is not None}
    try:
        answer["sees_run_dir"] = marker.read_text() == token
        (marker.parent / f"{marker.name}.{node}").write_text(token)
        answer["writes_run_dir"] = True
    except OSError as err:
        answer.setdefault("sees_run_dir", False)
        answer.update(writes_run_dir=False, error=str(err))
    return answer


# ---------------------------------------------------------------------------------------------
# On the driver


def init_kwargs(spec: RayExecutorSpec) -> dict[str, Any]:
    """Arguments of `ray.init` for the configured address."""
    if spec.address == "local":
        # address="local" always starts a private Ray: a bare ray.init() would silently join any
        # cluster `ray start` left running on this machine . No dashboard: it costs ~1 GiB.
        return {"address": "local", "num_cpus": spec.num_cpus, "include_dashboard": False,
                "log_to_driver": False}
    if spec.address != "auto" and not os.environ.get("RAY_AUTH_MODE"):
        # Ray 2.60 leaves auth off for an explicit address unless told, and a cluster started
        # with token auth then fails after 20 s with a bare ConnectionError .
        raise RayClusterError(
            f"executor.ray.address={spec.address}: set RAY_AUTH_MODE to the cluster's auth mode "
            "first: RAY_AUTH_MODE=token (the token comes from ~/.ray/auth_token or RAY_AUTH_TOKEN) "
            "or RAY_AUTH_MODE=disabled for a cluster started with auth disabled"
        )
    return {"address": spec.address, "log_to_driver": False}


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def unfit_trials(trials: Iterable[Trial], nodes: list[dict[str, Any]]) -> list[str]:
    """One line per trial that no node is big enough for (Ray would queue it forever)."""
    sizes = [(n["Resources"].get("CPU", 0), n["Resources"].get("GPU", 0)) for n in nodes]
    lines = []
    for trial in trials:
        need = trial.config.resources
        if not any(cpu >= need.cpus and gpu >= need.gpus for cpu, gpu in sizes):
            lines.append(f"trial {trial.trial_id} needs resources.cpus={need.cpus}, "
                         f"resources.gpus={need.gpus}")
    return lines


def check_fits(trials: list[Trial], nodes: list[dict[str, Any]], autoscaling: bool) -> None:
    unfit = unfit_trials(trials, nodes)
    if not unfit:
        return
    sizes = ", ".join(f"{n['NodeManagerAddress']} (CPU {n['Resources'].get('CPU', 0):g}, "
                      f"GPU {n['Resources'].get('GPU', 0):g})" for n in nodes)
    message = f"{'; '.join(unfit)}, but the largest Ray nodes are: {sizes}"
    if autoscaling:
        # A joined cluster may add nodes on demand (cluster/ray/cluster.yaml): say so and wait.
        print(f"warning: {message}; those trials wait for the autoscaler to add a node",
              file=sys.stderr)
        return
    raise RayClusterError(f"{message}; lower resources.cpus/gpus, set executor.ray.num_cpus, "
                          "or join a bigger cluster with --address")


def check_shared_storage(run_dir: Path) -> None:
    """Before any trial starts: every node that can run trials must see and write `run_dir`."""
    token = secrets.token_hex(8)
    marker = run_dir / f".ray-probe-{token}"
    atomic_write_text(marker, token)
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_node)
    nodes = [n for n in alive_nodes() if n["Resources"].get("CPU", 0) > 0]
    refs = {
        n["NodeManagerAddress"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(str(run_dir), token)
        for n in nodes
    }
    try:
        answers = dict(zip(refs, ray.get(list(refs.values()), timeout=PROBE_TIMEOUT_S)))
    except GetTimeoutError:
        raise SchedulerError(
            f"Ray nodes {', '.join(refs)} did not answer a trivial task within "
            f"{PROBE_TIMEOUT_S:.0f} s; check `ray status` on the cluster"
        ) from None
    finally:
        for path in run_dir.glob(f".ray-probe-{token}*"):
            path.unlink(missing_ok=True)
    problems = [problem for address, answer in answers.items()
                if (problem := storage_problem(address, answer, run_dir))]
    if problems:
        raise RayClusterError("\n".join(problems))


def storage_problem(address: str, answer: dict[str, Any], run_dir: Path) -> str | None:
    where = f"Ray node {address} ({answer['host']})"
    if not answer["sees_run_dir"] or not answer["writes_run_dir"]:
        why = answer.get("error", "a marker the driver wrote there is missing")
        return (f"{where} cannot {'see' if not answer['sees_run_dir'] else 'write'} the run "
                f"directory {run_dir} ({why}): trials write their results there, so it must be "
                "on storage every node mounts at the same path (e.g. NFS); pass --out on that "
                "storage")
    if not answer["scalestudy"]:
        return (f"{where}: scalestudy is not importable by the workers' Python "
                f"({answer['python']}); install it there (pip install -e '<this repository>[ray]')")
    return None


def settled_state(
    outcome: int | BaseException, status: Status | str, max_retries: int
) -> dict[str, Any] | None:
    """The state.json fields a finished task implies, or None when the trial's own record is true.

    `outcome` is the task's return value (the trial's exit status) or what `ray.get` raised;
    `status` is what state.json says now.
    """
    status = Status(status)
    if isinstance(outcome, (TaskCancelledError, GetTimeoutError)):
        # Cancelled (GetTimeoutError: still stopping when we gave up waiting): a queued task never
        # started (still `pending`); a running one stopped at, or resumes from, a checkpoint.
        if status != Status.RUNNING:
            return None
        return {"status": Status.PREEMPTED, "error": "stopped with the study; resumes from its "
                "last checkpoint"}
    if status.is_result:
        return None
    tries = f"{max_retries + 1} attempt(s) (executor.ray.max_retries={max_retries})"
    if isinstance(outcome, RayTaskError) and isinstance(outcome.cause, TrialKilled):
        return {"status": Status.FAILED, "error": f"{outcome.cause}; gave up after {tries}"}
    if isinstance(outcome, RayError):
        # WorkerCrashedError, NodeDiedError, …: the trial's process went with its worker.
        reason = str(outcome).strip().splitlines()[0]
        return {"status": Status.FAILED, "error": f"Ray worker died: {reason}; gave up after {tries}"}
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome != process.EXIT_OK and status != Status.FAILED:
        # The trial could not even record its failure (e.g. scalestudy not importable).
        return {"status": Status.FAILED, "error": f"trial process exited with status {outcome} "
                "without recording a result; see log.txt"}
    return None


class RayExecutor:
    name = "ray"

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        spec = study.executor.ray
        kwargs = init_kwargs(spec)
        try:
            ray.init(**kwargs)
        except Exception as err:  # noqa: BLE001 - Ray raises bare Exception (30 s start-up limit)
            what = ("start a private Ray" if spec.address == "local"
                    else f"join the Ray cluster at {spec.address}")
            raise SchedulerError(f"could not {what}: {err}") from err
        try:
            run_dir = store.root.resolve()
            check_fits(trials, alive_nodes(), autoscaling=spec.address != "local")
            check_shared_storage(run_dir)
            self._run(store, run_dir, trials, spec)
        finally:
            # Disconnects from a joined cluster; stops the private one (never `ray stop`, which
            # would stop every Ray cluster of the user on the machine).
            ray.shutdown()

    def _run(self, store: RunStore, run_dir: Path, trials: list[Trial],
             spec: RayExecutorSpec) -> None:
        task = ray.remote(run_trial_process)
        refs = {
            task.options(
                num_cpus=t.config.resources.cpus, num_gpus=t.config.resources.gpus,
                max_retries=spec.max_retries, retry_exceptions=[TrialKilled],
                name=f"trial-{t.trial_id}",
            ).remote(str(run_dir / "trials" / t.trial_id)): t.trial_id
            for t in trials
        }
        pending = list(refs)

        def poll() -> tuple[int, int]:
            # ray.wait is the loop's sleep: it returns as soon as a task ends, or after POLL_S.
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in ready:
                self._settle(store, refs[ref], ref, spec.max_retries)
                pending.remove(ref)  # only once settled: an interrupt settles the rest
            return len(ready), len(pending)

        try:
            watch(store, [t.trial_id for t in trials], poll, interval_s=0)
        except BaseException:
            # Ctrl-C (or SIGTERM, which ray.init turns into SystemExit): stop the study's work.
            self._cancel(store, {ref: refs[ref] for ref in pending}, spec.max_retries)
            raise

    @staticmethod
    def _settle(store: RunStore, trial_id: str, ref: ray.ObjectRef, max_retries: int) -> None:
        try:
            outcome: int | BaseException = ray.get(ref, timeout=process.GRACE_S)
        except RayError as err:
            outcome = err
        trial = store.trial(trial_id)
        fields = settled_state(outcome, trial.state().status, max_retries)
        if fields:
            trial.update_state(**fields)

    def _cancel(self, store: RunStore, pending: dict[ray.ObjectRef, str], max_retries: int) -> None:
        """Queued tasks are dropped (their trials stay `pending`); running ones checkpoint."""
        for ref in pending:
            ray.cancel(ref)
        _, left = ray.wait(list(pending), num_returns=len(pending), timeout=process.GRACE_S + 5)
        for ref in left:
            ray.cancel(ref, force=True)
        for ref, trial_id in pending.items():
            self._settle(store, trial_id, ref, max_retries)
        Rows(store).write()
