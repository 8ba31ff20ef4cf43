"""The trial process, as the local and Ray executors start, watch and stop it.

Both run the one trial entry point (`python -m scalestudy.trial TRIAL_DIR`) as a child process:
a process per trial isolates crashes and memory, gets exactly its own torch threads (torch reads
OMP_NUM_THREADS only at its first import, so a reused worker would leak thread pools between
trials), and owns its main thread for SIGTERM → checkpoint → `preempted`.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from scalestudy import allocator
from scalestudy.allocator import Allocator

# The trial entry point's exit statuses (scalestudy.trial).
EXIT_OK, EXIT_FAILED, EXIT_PREEMPTED = 0, 1, 3
# A stopped trial gets this long to save a checkpoint before it is killed.
GRACE_S = 30.0


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: on Linux the child gets `sig` the moment its parent dies (PR_SET_PDEATHSIG).

    The local executor asks for SIGTERM (the trial checkpoints, `preempted`); the Ray task for
    SIGKILL (Ray may already retry the trial elsewhere, and a trial still saving would be a second
    writer of its directory).
    """

    def arm() -> None:
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except OSError:
            pass

    return arm


def trial_env(environ: Mapping[str, str], cpus: int, gpus: Sequence[str] | None,
              malloc: Allocator) -> dict[str, str]:
    """The trial process's environment: `environ`, with `cpus` torch threads, the allocator
    `malloc` preloaded (resources.allocator; scalestudy.allocator) and, unless `gpus` is None,
    exactly the GPUs `gpus` visible (CUDA_VISIBLE_DEVICES; empty for a CPU trial, so it never
    touches a GPU it did not ask for). A named allocator that is not installed here raises
    ValueError naming the fix.

    OMP_NUM_THREADS is explicit because torch reads it only at its first import, and Ray does not
    override a value the driver already had. `gpus` is None only where nothing assigns GPUs (a
    machine without any): the trial then sees what its parent sees.
    """
    # TOKENIZERS_PARALLELISM: Hugging Face tokenizers (model.tokenizer: bpe|file) would start a
    # thread per core beside the trial's torch threads, and warn after every fork.
    env = dict(environ, OMP_NUM_THREADS=str(cpus), TOKENIZERS_PARALLELISM="false")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    allocator.preload(env, malloc)
    return env


def start_trial(trial_dir: Path | str, backend: str, env: dict[str, str], log: Path,
                parent_death: signal.Signals, new_session: bool = False) -> subprocess.Popen[bytes]:
    """Start the trial process, its output appended to `log` after one line that says where it
    runs and with which threads, GPUs and preloaded allocator (as the Slurm executor's tasks print
    theirs)."""
    with open(log, "ab") as out:
        out.write(f"scalestudy: {backend} trial process on {socket.gethostname()}, LD_PRELOAD="
                  f"{env.get('LD_PRELOAD', '(unset)')}, OMP_NUM_THREADS="
                  f"{env.get('OMP_NUM_THREADS')}, CUDA_VISIBLE_DEVICES="
                  f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}\n".encode())
        out.flush()
        return subprocess.Popen(
            [sys.executable, "-m", "scalestudy.trial", str(trial_dir), "--backend", backend],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
            preexec_fn=die_with_parent(parent_death),
        )


def stop(process: subprocess.Popen[bytes], grace_s: float = GRACE_S) -> int:
    """SIGTERM (the trial saves a checkpoint and exits as `preempted`), SIGKILL after `grace_s`;
    returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def killed_by(returncode: int) -> str | None:
    """The name of the signal that ended a process, or None when it exited by itself."""
    return signal.Signals(-returncode).name if returncode < 0 else None
