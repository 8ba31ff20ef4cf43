"""Local executor: each trial in its own worker process (`python -m scalestudy.trial TRIAL_DIR`).

A process per trial isolates crashes and memory and makes "kill one trial" mean what it says.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from scalestudy.expand import Trial
from scalestudy.progress import Progress
from scalestudy.results import write_results
from scalestudy.spec import StudySpec
from scalestudy.store import RunStore

POLL_S = 0.5
# After Ctrl-C, workers get this long to save a checkpoint before they are killed.
GRACE_S = 30.0


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM (→ checkpoint, `preempted`) if the driver dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def default_parallel(study: StudySpec, trials: list[Trial]) -> int:
    cpus = max((t.config.resources.cpus for t in trials), default=1)
    return max(1, (os.cpu_count() or 1) // cpus)


class LocalExecutor:
    name = "local"

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        parallel = study.executor.local.max_parallel or default_parallel(study, trials)
        queue = list(trials)
        running: dict[str, subprocess.Popen[bytes]] = {}
        progress = Progress(store, [t.trial_id for t in trials])
        try:
            while queue or running:
                while queue and len(running) < parallel:
                    trial = queue.pop(0)
                    running[trial.trial_id] = self._start(store, trial)
                for tid, proc in list(running.items()):
                    if proc.poll() is not None:
                        del running[tid]
                        self._settle(store, tid, proc.returncode)
                        write_results(store)
                progress.tick()
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self._stop(store, running)
            raise
        finally:
            progress.close()

    def _start(self, store: RunStore, trial: Trial) -> subprocess.Popen[bytes]:
        ts = store.trial(trial.trial_id)
        env = dict(os.environ, OMP_NUM_THREADS=str(trial.config.resources.cpus))
        with open(ts.log_path, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "scalestudy.trial", str(ts.path), "--backend", self.name],
                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
            )

    @staticmethod
    def _settle(store: RunStore, trial_id: str, returncode: int) -> None:
        """Make state.json true after a worker that could not record its own end (a kill)."""
        ts = store.trial(trial_id)
        if returncode < 0 and ts.state().get("status") == "running":
            ts.update_state(
                status="preempted",
                error=f"worker killed by signal {-returncode}; resumes from its last checkpoint "
                f"(log: {ts.log_path})",
            )

    def _stop(self, store: RunStore, running: dict[str, subprocess.Popen[bytes]]) -> None:
        # The workers share our process group, so Ctrl-C reached them too; they checkpoint and exit.
        deadline = time.time() + GRACE_S
        for proc in running.values():
            proc.send_signal(signal.SIGTERM)
        for tid, proc in running.items():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._settle(store, tid, proc.returncode)
        write_results(store)
