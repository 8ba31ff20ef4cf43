"""Every loss variant a study can select trains for real and computes its own formula (its
first recorded loss is the variant's loss of the untrained model on the first batch, and differs
from the plain loss's), and the chunked loss trains the same model."""

from __future__ import annotations

import pytest
import torch

from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.losses import caption_groups
from scalestudy.store import RunStore
from scalestudy.train.data import normalize
from scalestudy.train.loop import Trainer, compute_loss, run_trial
from scalestudy.train.ranks import Ranks
from tests.conftest import tiny_study

pytestmark = pytest.mark.train


def train(write_study, tmp_path, loss: dict, name: str, data: dict | None = None):
    study = tiny_study(grid={"train.seed": [0]}, base={"loss": loss, "data": data or {}})
    trial = expand(load_study(write_study(study, f"{name}.yaml")))[0]
    ts = RunStore(tmp_path / name).add_trial(trial)
    summary = run_trial(str(ts.path))
    assert ts.state().status == "done"
    return ts, summary


def first_loss(trial, run_dir) -> float:
    """The trial's loss on its first batch with its untrained model, from the loss functions."""
    trainer = Trainer.build(trial, Ranks(), torch.device("cpu"), run_dir)
    batch = trainer.dataset.train_batch(1, trial.config.train.batch_size)
    images = normalize(batch.images, trainer.dataset.mean, trainer.dataset.std)
    with torch.no_grad():
        image, text = trainer.model(images, trainer.tokenizer(batch.captions))
        return float(compute_loss(trial, 1, image, text, trainer.model.logit_scale(),
                                  trainer.model.bias, False, caption_groups(batch.captions)))


SIGMOID, SOFTMAX = {"kind": "sigmoid"}, {"kind": "softmax"}
# At SigLIP's init (b = −10) a negative pair weighs ~5e-5, so dropping duplicate pairs would move
# the first loss less than float32 resolves; at b = 0 each weighs log 2.
AT_ZERO = {"kind": "sigmoid", "bias_init": 0.0}


@pytest.mark.parametrize(
    ("plain", "loss"),
    [
        (SIGMOID, {"kind": "sigmoid", "use_bias": False}),
        (SIGMOID, {"kind": "sigmoid", "bias_init": "neg_log_batch"}),
        (SIGMOID, {"kind": "sigmoid", "use_bias": False, "negative_weight": "balanced"}),
        (SIGMOID, {"kind": "sigmoid", "negative_mask_ratio": 0.5}),
        (AT_ZERO, {**AT_ZERO, "duplicates": "masked"}),
        (AT_ZERO, {**AT_ZERO, "duplicates": "positive"}),
        (SOFTMAX, {"kind": "softmax", "duplicates": "masked"}),
    ],
    ids=["no-bias", "neg-log-batch-bias", "balanced-negatives", "masked-negatives",
         "masked-duplicates", "positive-duplicates", "softmax-masked-duplicates"],
)
def test_each_loss_variant_computes_its_own_loss_and_trains_to_the_end(write_study, tmp_path,
                                                                        plain, loss):
    # The shapes data almost never repeats a caption; caption noise copies captions between rows,
    # so the first batch has duplicates for the duplicates variants to treat.
    data = {"caption_noise": 0.5} if "duplicates" in loss else {}
    reference, _ = train(write_study, tmp_path, plain, "plain", data)
    ts, summary = train(write_study, tmp_path, loss, "variant", data)
    metrics = ts.metrics()
    assert metrics["loss"].is_finite().all()
    recorded = metrics["loss"][0]
    assert recorded == pytest.approx(first_loss(ts.read_trial(), tmp_path), rel=1e-5)
    assert abs(recorded - reference.metrics()["loss"][0]) > 1e-3 * abs(recorded)
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
