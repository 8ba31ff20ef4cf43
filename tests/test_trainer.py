"""`Trainer.step` in this process on a fixed tiny config: what one optimisation step must do, in a
second or two, so `make test-fast` catches a broken loop — an optimizer that does not step, a
loss other than the configured one, clipping that rewrites the recorded norm or never reaches the
optimizer, a locked tower or a fixed temperature that moves, a non-finite step that updates the
model, monitors that are off but still recorded.

Each known answer comes from the definition: the loss from the loss functions on the same batch,
the clipped gradient as the raw one times clip / ‖g‖, AdamW's first moments as (1 − β1)·g.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from scalestudy.expand import expand
from scalestudy.load import validate_study
from scalestudy.losses import sigmoid_loss, softmax_loss
from scalestudy.store import RunStore
from scalestudy.store.schema import STEP_SCHEMA
from scalestudy.train.data import normalize
from scalestudy.train.loop import Trainer, run_trial
from scalestudy.train.ranks import Ranks
from tests.conftest import tiny_study

# Constant LR from step 1 (no warm-up), so calling step(1) again repeats one batch at one LR.
CONSTANT = {"schedule": "constant", "warmup_fraction": 0.0}

# The per-step columns every trial records, and those only monitor.extended adds.
ALWAYS = {"step", "examples_seen", "loss", "grad_norm", "lr", "temperature", "bias", "is_spike",
          "spike_ratio", "is_loss_spike", "loss_spike_ratio", "step_time_s", "dup_caption_rate"}
EXTENDED = {"grad_norm_image", "grad_norm_text", "logit_pos_mean", "logit_neg_mean", "rms_max",
            "rms_max_name", "rms_patch_embed", "rms_temperature", "rms_bias", "update_norm",
            "param_norm"}
# Added by the loop to every row at a flush (the window's device step time, null on a CPU, and
# the peak memory so far), and by fp16 trials (train.precision).
FLUSHED = {"device_step_time_s", "peak_memory_gib"}
FP16 = {"grad_overflow"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # A trial runs torch on resources.cpus threads (1 in the tiny study); a thread team on a busy
    # 2-core machine makes these tiny steps ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(tmp_path: Path, **sections: dict[str, Any]) -> Trainer:
    """A trainer of the tiny study (tests/conftest.py) with these sections merged in."""
    base = {**sections, "optim": {**CONSTANT, **sections.get("optim", {})}}
    [trial] = expand(validate_study(tiny_study(grid={}, base=base), "s.yaml"))
    return Trainer.build(trial, Ranks(), torch.device("cpu"), tmp_path)


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def row(trainer: Trainer, step: int) -> dict[str, Any]:
    """The step's row as the loop hands it to the store (step_time_s is the loop's to add)."""
    rows = trainer.rows()
    host, metrics = trainer.step(step)
    rows.append({**host, "step_time_s": 0.0}, metrics)
    [drained] = rows.drain()
    return drained


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_repeating_one_batch_lowers_its_loss_and_moves_every_trainable_tensor(tmp_path, kind):
    trainer = build(tmp_path, loss={"kind": kind})
    before = parameters(trainer)
    losses = [float(trainer.step(1)[1]["loss"]) for _ in range(8)]
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed(before, parameters(trainer)) == trainable
    # Measured (train.seed 0, 1, 2): 8 AdamW steps at lr 1e-3 on one batch take the loss to
    # 0.44–0.48× (sigmoid) and 0.43–0.52× (softmax) of its first value; seed 0 runs here.
    assert losses[-1] < 0.6 * losses[0]
    assert all(math.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_the_first_step_records_the_configured_loss_of_the_untrained_model_on_the_first_batch(
    tmp_path, kind
):
    trainer = build(tmp_path, loss={"kind": kind})
    trial, model, dataset = trainer.trial, trainer.model, trainer.dataset
    batch = dataset.train_batch(1, trial.config.train.batch_size)
    with torch.no_grad():
        image, text = model(normalize(batch.images, dataset.mean, dataset.std),
                            trainer.tokenizer(batch.captions))
        scale = torch.tensor(trial.derived.temperature_init)
        expected = (softmax_loss(image, text, scale) if kind == "softmax"
                    else sigmoid_loss(image, text, scale, torch.tensor(trial.derived.bias_init)))
    host, metrics = trainer.step(1)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["temperature"]) == pytest.approx(trial.derived.temperature_init, rel=1e-6)
    assert host["lr"] == trial.derived.lr and host["examples_seen"] == 32


CLIP = 1e-3


def test_clipping_records_the_pre_clip_norm_and_hands_the_optimizer_the_clipped_gradient(tmp_path):
    free = build(tmp_path)
    clipped = build(tmp_path, optim={"grad_clip": CLIP})
    _, free_metrics = free.step(1)
    _, clipped_metrics = clipped.step(1)
    raw = {name: p.grad.double() for name, p in free.model.named_parameters() if p.grad is not None}
    norm = math.sqrt(sum(float(g.square().sum()) for g in raw.values()))
    assert norm > 100 * CLIP  # the clip bites
    assert float(clipped_metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(free_metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    beta1, beta2 = clipped.trial.config.optim.beta1, clipped.trial.config.optim.beta2
    for name, p in clipped.model.named_parameters():
        if name not in raw:
            continue
        want = raw[name] * CLIP / norm  # torch's clip_grad_norm_: g · clip / ‖g‖
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-4, atol=1e-12)
        state = clipped.optimizer.state[p]
        torch.testing.assert_close(state["exp_avg"].double(), (1 - beta1) * want, rtol=1e-4,
                                   atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq"].double(), (1 - beta2) * want.square(),
                                   rtol=1e-3, atol=1e-18)


@pytest.mark.parametrize("locked", ["image", "text"])
def test_a_locked_tower_never_changes_while_everything_else_trains(tmp_path, locked):
    trainer = build(tmp_path, model={f"lock_{locked}": True})
    before = parameters(trainer)
    for step in (1, 2, 3):
        _, metrics = trainer.step(step)
    frozen = {name for name in before if name.startswith(f"{locked}.")}
    assert frozen and changed(before, parameters(trainer)) == set(before) - frozen
    other = "text" if locked == "image" else "image"
    assert float(metrics[f"grad_norm_{locked}"]) == 0.0
    assert float(metrics[f"grad_norm_{other}"]) > 0.0


def test_a_fixed_temperature_stays_at_its_init_and_has_no_update_rms(tmp_path):
    trainer = build(tmp_path, loss={"kind": "sigmoid", "learn_temperature": False})
    init = trainer.trial.derived.temperature_init
    rows = [row(trainer, step) for step in (1, 2, 3, 4)]
    assert [r["temperature"] for r in rows] == pytest.approx([init] * 4, rel=1e-6)
    assert float(trainer.model.logit_scale().detach()) == pytest.approx(init, rel=1e-6)
    assert all("rms_temperature" not in r for r in rows)
    assert all(r["rms_bias"] is not None for r in rows)  # b still trains


def test_a_learnable_temperature_moves_from_its_init(tmp_path):
    trainer = build(tmp_path, loss={"kind": "sigmoid"})
    init = trainer.trial.derived.temperature_init
    rows = [row(trainer, step) for step in (1, 2, 3, 4)]
    assert rows[0]["temperature"] == pytest.approx(init, rel=1e-6)  # recorded before the update
    assert abs(float(trainer.model.logit_scale().detach()) - init) > 1e-3 * init
    assert all(r["rms_temperature"] is not None for r in rows)


def test_a_non_finite_step_and_every_step_after_it_leave_the_model_as_it_was(tmp_path):
    trainer = build(tmp_path, loss={"kind": "sigmoid"})
    trainer.step(1)
    bias = trainer.model.bias
    with torch.no_grad():
        bias.fill_(math.nan)  # the next loss and gradients are NaN
    before = parameters(trainer)
    _, metrics = trainer.step(2)
    assert math.isnan(float(metrics["loss"]))
    with torch.no_grad():
        bias.copy_(before["bias"].nan_to_num(-10.0))  # a finite model again
    repaired = parameters(trainer)
    _, metrics = trainer.step(3)
    assert math.isfinite(float(metrics["loss"]))
    # The gate is sticky: the host learns of the bad step only at its next flush, so every update
    # from the bad step on must already have been skipped on the device.
    assert changed(repaired, parameters(trainer)) == set()
    assert changed(before, repaired) == {"bias"}


def test_without_extended_monitors_a_step_records_only_the_always_on_columns(tmp_path):
    assert ALWAYS | EXTENDED | FLUSHED | FP16 == set(STEP_SCHEMA)
    plain = row(build(tmp_path, loss={"kind": "sigmoid"}, monitor={"extended": False}), 1)
    extended = row(build(tmp_path, loss={"kind": "sigmoid"}), 1)
    assert set(plain) == ALWAYS
    assert set(extended) == ALWAYS | EXTENDED
    for column in ALWAYS - {"step_time_s"}:
        assert plain[column] == extended[column], column


@pytest.mark.train
def test_without_extended_monitors_the_stored_history_has_only_the_always_on_columns(tmp_path):
    [trial] = expand(validate_study(tiny_study(grid={}, base={"monitor": {"extended": False}}),
                                    "s.yaml"))
    ts = RunStore(tmp_path).add_trial(trial)
    run_trial(str(ts.path))
    metrics = ts.metrics()
    assert ts.state().status == "done"
    assert set(metrics.columns) == ALWAYS | FLUSHED
    assert metrics.height == trial.derived.steps
    assert metrics.select(sorted((ALWAYS | {"peak_memory_gib"}) - {"bias", "spike_ratio", "loss_spike_ratio"})
                          ).null_count().sum_horizontal().item() == 0
