"""Every loss variant a study can select trains for real, and the chunked loss trains the same model."""

from __future__ import annotations

import pytest

from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.store import RunStore
from scalestudy.train.loop import run_trial
from tests.conftest import tiny_study


def train(write_study, tmp_path, loss: dict, name: str):
    study = tiny_study(grid={"train.seed": [0]}, base={"loss": loss})
    trial = expand(load_study(write_study(study, f"{name}.yaml")))[0]
    ts = RunStore(tmp_path / name).add_trial(trial)
    summary = run_trial(str(ts.path))
    assert ts.state().status == "done"
    return ts, summary


@pytest.mark.parametrize(
    "loss",
    [
        {"kind": "sigmoid", "use_bias": False},
        {"kind": "sigmoid", "bias_init": "neg_log_batch"},
        {"kind": "sigmoid", "use_bias": False, "negative_weight": "balanced"},
        {"kind": "sigmoid", "negative_mask_ratio": 0.5},
    ],
    ids=["no-bias", "neg-log-batch-bias", "balanced-negatives", "masked-negatives"],
)
def test_each_sigmoid_variant_trains_to_the_end(write_study, tmp_path, loss):
    ts, summary = train(write_study, tmp_path, loss, "variant")
    metrics = ts.metrics()
    assert metrics["loss"].is_finite().all()
    if loss.get("use_bias") is False:
        assert metrics["bias"].null_count() == metrics.height
    if loss.get("bias_init") == "neg_log_batch":
        assert ts.read_trial().derived.bias_init == pytest.approx(-3.4657, abs=1e-3)  # -log 32


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_a_chunked_loss_trains_the_same_model_as_the_full_matrix(write_study, tmp_path, kind):
    full, _ = train(write_study, tmp_path, {"kind": kind}, "full")
    chunked, _ = train(write_study, tmp_path, {"kind": kind, "chunk_size": 5}, "chunked")
    a, b = full.metrics(), chunked.metrics()
    assert a["loss"].to_numpy() == pytest.approx(b["loss"].to_numpy(), rel=1e-4)
    assert a["grad_norm"].to_numpy() == pytest.approx(b["grad_norm"].to_numpy(), rel=1e-3)
