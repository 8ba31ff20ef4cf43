"""Local executor: each trial in its own worker process (`python -m scalestudy.trial TRIAL_DIR`).

A process per trial isolates crashes and memory and makes "kill one trial" mean what it says.
"""

from __future__ import annotations

import os
import signal
import subprocess

from scalestudy.executors import process
from scalestudy.executors.base import watch
from scalestudy.spec import StudySpec
from scalestudy.store import Rows, RunStore, Status, Trial

POLL_S = 0.5


def default_parallel(trials: list[Trial]) -> int:
    cpus = max((t.config.resources.cpus for t in trials), default=1)
    return max(1, (os.cpu_count() or 1) // cpus)


class LocalExecutor:
    name = "local"

    def run(self, store: RunStore, trials: list[Trial], study: StudySpec) -> None:
        parallel = study.executor.local.max_parallel or default_parallel(trials)
        queue = list(trials)
        running: dict[str, subprocess.Popen[bytes]] = {}

        def poll() -> tuple[int, int]:
            while queue and len(running) < parallel:
                trial = queue.pop(0)
                running[trial.trial_id] = self._start(store, trial)
            settled = 0
            for tid, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[tid]
                    self._settle(store, tid, proc.returncode)
                    settled += 1
            return settled, len(queue) + len(running)

        try:
            watch(store, [t.trial_id for t in trials], poll, POLL_S)
        except KeyboardInterrupt:
            self._stop(store, running)
            raise

    def _start(self, store: RunStore, trial: Trial) -> subprocess.Popen[bytes]:
        ts = store.trial(trial.trial_id)
        env = dict(os.environ, OMP_NUM_THREADS=str(trial.config.resources.cpus))
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
