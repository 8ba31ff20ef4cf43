"""Exact resume: a trial killed with SIGKILL and run again ends with the same history, step by
step, as one that was never interrupted — for each loss, masked negatives, two data-parallel
ranks — and a kill in the middle of a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from scalestudy.expand import expand
from scalestudy.load import validate_study
from scalestudy.store import RunStore, Status
from tests.conftest import tiny_study

STEPS = 240
KILL_AFTER = 60  # steps recorded before the kill; the last checkpoint is at step 50


def state_of(trial_dir: Path) -> dict:
    try:
        return json.loads((trial_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def trial_process(trial_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "scalestudy.trial", str(trial_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_step(trial_dir: Path, step: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while (state_of(trial_dir).get("step") or 0) < step:
        assert proc.poll() is None, "the trial ended before it could be killed"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


CASES = {
    "sigmoid": {"loss": {"kind": "sigmoid"}},
    "softmax": {"loss": {"kind": "softmax"}},
    "masked-negatives": {"loss": {"kind": "sigmoid", "negative_mask_ratio": 0.5}},
    "two-ranks": {"loss": {"kind": "sigmoid"}, "resources": {"workers": 2, "cpus": 2}},
}


@pytest.mark.train
@pytest.mark.parametrize("case", CASES)
def test_a_trial_killed_and_run_again_ends_with_the_uninterrupted_history(case, tmp_path):
    base = {"train": {"examples_seen": 32 * STEPS, "batch_size": 32, "checkpoint_every": 25,
                      "eval_every": 50}, **CASES[case]}
    [trial] = expand(validate_study(tiny_study(grid={}, base=base), "s.yaml"))
    straight = RunStore(tmp_path / "straight").add_trial(trial)
    interrupted = RunStore(tmp_path / "interrupted").add_trial(trial)
    assert trial_process(straight.path).wait(timeout=300) == 0

    proc = trial_process(interrupted.path)
    wait_for_step(interrupted.path, KILL_AFTER, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert state_of(interrupted.path)["status"] == Status.RUNNING  # killed: it could not say otherwise
    assert trial_process(interrupted.path).wait(timeout=300) == 0

    assert state_of(interrupted.path)["attempts"] == 2
    compare = pl.exclude("step_time_s", "device_step_time_s", "peak_memory_gib")  # timing and memory are the machine's
    assert interrupted.metrics()["step"].to_list() == list(range(1, STEPS + 1))
    assert straight.metrics().select(compare).equals(interrupted.metrics().select(compare))
    assert straight.evals().equals(interrupted.evals())


def test_a_kill_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    ts = RunStore(tmp_path).trial("t")
    ts.path.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from scalestudy.store import TrialStore
        ts = TrialStore({str(ts.path)!r})
        ts.save_checkpoint({{"step": 50, "w": torch.arange(4.0)}})
        real_save = torch.save
        def dies_half_way(payload, path):
            real_save(payload, path)
            with open(path, "r+b") as f:  # the write got half-way, then the process died
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dies_half_way
        ts.save_checkpoint({{"step": 75, "w": torch.zeros(4)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    loaded = ts.load_checkpoint()
    assert loaded["step"] == 50 and loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
