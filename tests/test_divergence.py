"""Divergence end to end: a trial whose loss turns non-finite ends `diverged`, keeps its history up
to and including the bad step and none after, records the evaluation of the model from before the
bad step, and every view of the run directory (status, status --json, results.parquet, the report)
counts it as diverged.

Two ways in. An absurd LR (1e10: AdamW moves every weight by about that much on step 1, so the
second forward pass overflows) diverges for real, through `scalestudy run`; it ends at step 2,
with the model after step 1 already useless. To check that the evaluation is of the model from
before the bad step, a healthy trial gets a NaN loss injected at a chosen step instead, between
two evaluations, so the model before it is one the earlier evaluation and checkpoint hold too.
"""

from __future__ import annotations

import json
import math
from typing import Any

import polars as pl
import pytest
import torch

import scalestudy.train.loop as loop
from scalestudy.cli import main
from scalestudy.expand import expand
from scalestudy.load import validate_study
from scalestudy.store import RunStore, Status
from scalestudy.train.loop import Trainer, run_trial
from scalestudy.train.ranks import Ranks
from tests.conftest import tiny_study

pytestmark = pytest.mark.train

# The absurd LR, and the one the healthy twin trains at; a constant LR so step 1 is at full size.
ABSURD, SANE = 1e10, 1e-3
CONSTANT = {"schedule": "constant", "warmup_fraction": 0.0}


def test_an_absurd_lr_ends_the_trial_diverged_and_status_results_and_report_say_so(
    write_study, tmp_path, capsys
):
    study = tiny_study("absurd", grid={"optim.lr": [SANE, ABSURD]},
                       base={"optim": CONSTANT, "train": {"eval_every": 0, "checkpoint_every": 0}})
    out = tmp_path / "runs"
    assert main(["run", str(write_study(study)), "--out", str(out)]) == 0  # diverged is a result
    run_dir = out / "absurd"
    store = RunStore(run_dir)
    by_lr = {store.trial(t).read_trial().config.optim.lr: store.trial(t) for t in store.trial_ids()}
    diverged, healthy = by_lr[ABSURD], by_lr[SANE]

    assert diverged.state().status == Status.DIVERGED and healthy.state().status == Status.DONE
    assert "step 2" in diverged.state().error
    metrics = diverged.metrics()
    assert metrics["step"].to_list() == [1, 2]  # up to and including the bad step, none after
    assert math.isfinite(metrics["loss"][0]) and math.isnan(metrics["loss"][1])
    assert diverged.evals()["step"].to_list() == [2]  # the model from before step 2, evaluated
    summary = diverged.summary()
    assert summary["diverged"] is True and summary["step"] == 2 and summary["final_loss"] is None

    results = pl.read_parquet(store.results_path).filter(pl.col("trial_id") == diverged.trial_id)
    assert results.select("status", "diverged", "step", "final_loss").row(0) == (
        "diverged", True, 2, None)

    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    [line] = [line for line in text.splitlines() if line.startswith(diverged.trial_id)]
    assert line.split()[1] == "diverged"
    assert "diverged: 1" in text and "done: 1" in text

    assert main(["status", str(run_dir), "--json"]) == 0
    rows: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    [row] = [r for r in rows if r["trial_id"] == diverged.trial_id]
    assert (row["status"], row["diverged"], row["step"]) == ("diverged", True, 2)

    assert main(["report", str(run_dir)]) == 0
    findings = (run_dir / "report" / "index.md").read_text()
    assert "2 trials: 1 done, 1 diverged, 0 failed" in findings
    assert "Seeds diverged in 1 setting(s)" in findings


# The injected bad step falls between evaluations (every 6 steps) and after a checkpoint (step
# 12), so the steps after it up to the flush at the next evaluation (step 18) run on the device,
# their updates skipped, before the host sees it.
BAD, EVERY = 13, 6


def test_the_evaluation_at_the_bad_step_is_of_the_model_from_before_it(write_study, tmp_path,
                                                                       monkeypatch):
    base = {"optim": CONSTANT, "loss": {"kind": "sigmoid"},
            "train": {"examples_seen": 32 * 40, "eval_every": EVERY, "checkpoint_every": 2 * EVERY}}
    [trial] = expand(validate_study(tiny_study(grid={}, base=base), "s.yaml"))
    ts = RunStore(tmp_path / "run").add_trial(trial)
    real = loop.compute_loss

    def nan_at_the_bad_step(trial: Any, step: int, *args: Any) -> torch.Tensor:
        loss = real(trial, step, *args)
        return loss * math.nan if step == BAD else loss  # NaN loss and NaN gradients

    monkeypatch.setattr(loop, "compute_loss", nan_at_the_bad_step)
    summary = run_trial(str(ts.path))

    assert ts.state().status == Status.DIVERGED and summary["diverged"] is True
    metrics = ts.metrics()
    assert metrics["step"].to_list() == list(range(1, BAD + 1))
    assert metrics["loss"].head(BAD - 1).is_finite().all() and math.isnan(metrics["loss"][-1])
    evals = ts.evals()
    assert evals["step"].to_list() == [EVERY, 2 * EVERY, BAD]
    at_bad = evals.row(-1, named=True)
    before = evals.row(-2, named=True)  # the model after step 12, which step 13 did not change
    scores = [c for c in evals.columns if c not in ("step", "examples_seen")]
    assert {c: at_bad[c] for c in scores} == {c: before[c] for c in scores}

    # The checkpoint of step 12 holds the parameters from before the bad step: evaluated afresh,
    # they score exactly what the trial recorded at the bad step.
    checkpoint = ts.load_checkpoint()
    assert checkpoint["step"] == 2 * EVERY
    trainer = Trainer.build(ts.read_trial(), Ranks(), torch.device("cpu"), tmp_path / "run")
    trainer.load_state_dict(checkpoint)
    fresh = {k.removeprefix("eval/"): v for k, v in trainer.evaluate(BAD).items()}
    assert {c: fresh[c] for c in scores} == {c: at_bad[c] for c in scores}
    assert summary["zeroshot_top1"] == at_bad["zeroshot_top1"]
