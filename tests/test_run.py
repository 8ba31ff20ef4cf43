"""Real tiny studies end to end through the CLI: run, re-run, kill, resume, status, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from scalestudy.cli import main
from scalestudy.store import RunStore
from tests.conftest import tiny_study

pytestmark = pytest.mark.train
CONTRACT_STEP_COLUMNS = {"step", "examples_seen", "loss", "grad_norm", "lr", "temperature", "bias",
                         "is_spike", "step_time_s"}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def state_of(trial_dir: Path) -> dict:
    try:
        return json.loads((trial_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_tiny_study_runs_end_to_end_and_a_second_run_trains_nothing(write_study, tmp_path, capsys):
    path = write_study(tiny_study())
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out)]) == 0
    store = RunStore(out / "tiny")
    results = pl.read_parquet(store.results_path)
    assert results.height == 2
    assert set(results["status"]) == {"done"}
    assert set(results["loss.kind"]) == {"softmax", "sigmoid"}
    assert results["zeroshot_chance"].to_list() == [1 / 40] * 2
    for row in results.iter_rows(named=True):
        metrics = store.trial(row["trial_id"]).metrics()
        assert CONTRACT_STEP_COLUMNS <= set(metrics.columns)
        assert metrics["step"].to_list() == list(range(1, row["steps"] + 1))
        bias = metrics["bias"]
        assert bias.null_count() == (metrics.height if row["loss.kind"] == "softmax" else 0)
        assert store.trial(row["trial_id"]).evals()["step"].to_list() == [8, 16]

    attempts = {t: store.trial(t).state().attempts for t in store.trial_ids()}
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert "2 already finished, 0 to run" in capsys.readouterr().out
    assert {t: store.trial(t).state().attempts for t in store.trial_ids()} == attempts

    assert main(["status", str(store.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in rows} == {"done"} and "train.batch_size" in rows[0]
    assert main(["report", str(store.root)]) == 0
    for name in ("accuracy_vs_batch.png", "grad_norm.png", "index.html", "index.md"):
        assert (store.report_dir / name).stat().st_size > 0


def test_a_killed_trial_resumes_on_the_next_run_with_no_duplicated_steps(write_study, tmp_path):
    study = tiny_study(grid={"loss.kind": ["sigmoid"]},
                       base={"train": {"examples_seen": 32 * 400, "batch_size": 32,
                                       "checkpoint_every": 10, "eval_every": 100}})
    path = write_study(study)
    out = tmp_path / "runs"
    driver = subprocess.Popen([sys.executable, "-m", "scalestudy.cli", "run", str(path), "--out",
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (out / "tiny" / "trials").exists()
                 and any((out / "tiny" / "trials").iterdir()), 60, "the trial directory")
        trial_dir = next((out / "tiny" / "trials").iterdir())
        wait_for(lambda: state_of(trial_dir).get("step", 0) >= 40, 120, "40 steps")
        os.kill(state_of(trial_dir)["pid"], signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        driver.kill()
    assert state_of(trial_dir)["status"] == "preempted"
    assert "killed by SIGKILL" in state_of(trial_dir)["error"]

    assert main(["run", str(path), "--out", str(out)]) == 0
    state = state_of(trial_dir)
    assert state["status"] == "done" and state["attempts"] == 2
    steps = RunStore(out / "tiny").trial(trial_dir.name).metrics()["step"].to_list()
    assert steps == list(range(1, 401))


def test_a_trial_that_raises_is_failed_with_its_traceback_and_the_run_exits_1(write_study, tmp_path,
                                                                           capsys):
    # train.device=cuda on a machine without a GPU is a real failure inside the trial.
    path = write_study(tiny_study(grid={"train.device": ["cpu", "cuda"]},
                                  base={"resources": {"gpus": 1}}))
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU, so train.device=cuda does not fail")
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out)]) == 1
    results = pl.read_parquet(out / "tiny" / "results.parquet").sort("train.device")
    assert results["status"].to_list() == ["done", "failed"]
    assert "torch sees no GPU" in results["error"][1] and "Traceback" in results["error"][1]
    assert "failed" in capsys.readouterr().err
    # A failed trial is not retried unless asked.
    assert main(["run", str(path), "--out", str(out)]) == 1
    assert "--retry-failed" in capsys.readouterr().out
