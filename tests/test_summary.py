"""A trial's summary from a hand-made history, and the no-learning loss against the naive losses."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from scalestudy.expand import Trial, derive, trial_id
from scalestudy.losses import sigmoid_loss, softmax_loss
from scalestudy.spec import TrialConfig
from scalestudy.train.summary import no_learning_loss, steps_to_recover, summarize


def shared_logit_losses(kind: str, batch: int, logits: torch.Tensor, mask_seed: int = 0,
                        **negatives) -> torch.Tensor:
    """The naive loss with every pair's logit equal to s, for each s in `logits` (with
    negative_mask_ratio, the same mask, drawn from `mask_seed`, at every s)."""
    same = torch.nn.functional.normalize(torch.ones(batch, 4, dtype=torch.float64), dim=-1)
    one = torch.tensor(1.0, dtype=torch.float64)  # t = 1 and x·y = 1, so the logit is 1 + b
    if kind == "softmax":
        return torch.stack([softmax_loss(same, same, s) for s in logits])
    return torch.stack([sigmoid_loss(same, same, one, s - 1,
                                     generator=torch.Generator().manual_seed(mask_seed), **negatives)
                        for s in logits])


@pytest.mark.parametrize("batch", [2, 8, 32, 256])
def test_the_softmax_no_learning_loss_is_log_b_at_every_shared_logit(batch):
    losses = shared_logit_losses("softmax", batch, torch.linspace(-20, 20, 9, dtype=torch.float64))
    assert losses.tolist() == pytest.approx([math.log(batch)] * 9, rel=1e-12)
    assert no_learning_loss("softmax", batch) == math.log(batch)


def least_over_a_shared_logit(batch: int, **negatives) -> float:
    """min over s of the naive sigmoid loss with every logit s: a ternary search, since the loss
    (a sum of softplus terms) is convex in s."""
    low, high = torch.tensor(-30.0, dtype=torch.float64), torch.tensor(30.0, dtype=torch.float64)
    for _ in range(70):  # the bracket shrinks to 60·(2/3)⁷⁰ ≈ 3e-11
        a, b = low + (high - low) / 3, high - (high - low) / 3
        loss_a, loss_b = shared_logit_losses("sigmoid", batch, torch.stack([a, b]), **negatives)
        low, high = (low, b) if loss_a < loss_b else (a, high)
    return shared_logit_losses("sigmoid", batch, low.view(1), **negatives).item()


@pytest.mark.parametrize("batch", [2, 8, 64])
@pytest.mark.parametrize("negative_weight", [None, 0.25, "balanced"])
def test_the_sigmoid_no_learning_loss_is_the_least_naive_loss_over_a_shared_logit(batch, negative_weight):
    expected = no_learning_loss("sigmoid", batch, negative_weight)
    least = least_over_a_shared_logit(batch, negative_weight=negative_weight)
    assert least == pytest.approx(expected, rel=1e-12)
    # and nothing on a coarse grid goes below it
    grid = torch.arange(-15.0, 15.0, 0.5, dtype=torch.float64)
    on_grid = shared_logit_losses("sigmoid", batch, grid, negative_weight=negative_weight)
    assert on_grid.min().item() >= expected - 1e-12


def test_the_sigmoid_no_learning_loss_is_about_log_b_plus_one():
    # log B + (B − 1)·log(B / (B − 1)): at B = 8, 2.0794415 + 7·log(8/7) = 2.0794415 + 0.9347198 = 3.0141613
    assert no_learning_loss("sigmoid", 8) == pytest.approx(3.0141613, abs=1e-7)
    assert no_learning_loss("sigmoid", 4096) == pytest.approx(math.log(4096) + 1, abs=1e-3)
    assert no_learning_loss("sigmoid", 8, "balanced") == pytest.approx(2 * math.log(2))


def test_masking_negatives_lowers_the_no_learning_loss_by_its_expected_count():
    batch, ratio = 64, 0.5
    expected = no_learning_loss("sigmoid", batch, negative_mask_ratio=ratio)
    assert expected == pytest.approx(no_learning_loss("sigmoid", batch, negative_weight=ratio))
    # One mask keeps 2016 ± 32 of the 4032 negatives: the least loss moves by ≈ ±0.016 (1σ).
    lows = [least_over_a_shared_logit(batch, negative_mask_ratio=ratio, mask_seed=seed)
            for seed in range(3)]
    assert lows == pytest.approx([expected] * 3, abs=0.05)


def test_an_unknown_loss_kind_has_no_no_learning_loss():
    with pytest.raises(ValueError, match="'hinge'"):
        no_learning_loss("hinge", 8)


def test_steps_to_recover_counts_until_the_loss_is_back_at_its_pre_spike_median():
    losses = [2.0, 2.1, 1.9, 2.0, 5.0, 4.0, 3.0, 2.0, 1.9]
    assert steps_to_recover(losses, [5], first_step=1, window=4) == 3
    assert steps_to_recover(losses, [], first_step=1, window=4) is None
    assert steps_to_recover([2.0, 2.0, 9.0, 8.0], [3], first_step=1, window=4) == 1  # never: to the end


def make_trial(kind: str = "softmax", batch: int = 8, steps: int = 20) -> Trial:
    config = TrialConfig(loss={"kind": kind}, train={"batch_size": batch, "examples_seen": batch * steps},
                         monitor={"spike_window": 4, "loss_spike_window": 4})
    return Trial(trial_id=trial_id(config), config=config, derived=derive(config), swept={})


# Twenty steps with a grad-norm spike at step 12 and a loss spike at step 15.
LOSSES = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0, 2.0, 2.0, 2.0, 4.0, 3.0, 2.5, 1.9, 1.9, 1.9]


def history(losses: list[float] = LOSSES, dup: bool = True) -> pl.DataFrame:
    n = len(losses)
    columns = {
        "step": list(range(1, n + 1)),
        "loss": losses,
        "is_spike": [s == 12 for s in range(1, n + 1)],
        "spike_ratio": [None if s < 3 else 5.0 if s == 12 else 1.0 for s in range(1, n + 1)],
        "is_loss_spike": [s == 15 for s in range(1, n + 1)],
        "loss_spike_ratio": [None if s < 3 else 2.0 if s == 15 else 1.0 for s in range(1, n + 1)],
        "step_time_s": [0.5] * n,
    }
    if dup:
        columns["dup_caption_rate"] = [0.0 if s <= 10 else 0.1 for s in range(1, n + 1)]
    return pl.DataFrame(columns)


EVALS = pl.DataFrame({
    "step": [10, 18], "examples_seen": [80, 144],
    "zeroshot_top1": [0.30, 0.25], "zeroshot_top5": [0.6, 0.55],
    "retrieval_i2t_r1": [0.2, 0.22], "retrieval_t2i_r1": [0.25, 0.21],
    "zeroshot_top1_colour": [0.5, 0.45], "linear_probe_top1": [0.4, 0.42],
})


def test_summarize_a_hand_made_history():
    summary = summarize(history(), EVALS, make_trial(), diverged=False, wall_s=12.5, num_classes=40)
    assert summary == pytest.approx({
        "steps": 20, "examples_seen": 160, "step": 20,
        "final_loss": 2.32,  # mean of the last 10 losses
        "no_learning_loss": math.log(8),
        "stalled": True,  # 2.32 ≥ 0.98 · log 8 = 2.038
        # after the 2 warm-up steps, losses ≥ 2.038: steps 3–10 and 15–17, 11 of 18
        "collapsed_steps": 11, "collapse_fraction": 11 / 18,
        "zeroshot_top1": 0.25, "zeroshot_top5": 0.55, "zeroshot_chance": 1 / 40,
        "best_zeroshot_top1": 0.30, "retrieval_i2t_r1": 0.22, "retrieval_t2i_r1": 0.21,
        # grad-norm spike at 12: pre-spike median(2.3, 2.2, 2.1, 2.0) = 2.15, back below on 13
        "spike_count": 1, "spike_rate_per_1k": 50.0, "max_spike_ratio": 5.0, "first_spike_step": 12,
        "steps_to_recover": 1,
        # loss spike at 15: pre-spike median 2.0; 3.0, 2.5, then 1.9 on step 18
        "loss_spike_count": 1, "loss_spike_rate_per_1k": 50.0, "max_loss_spike_ratio": 2.0,
        "first_loss_spike_step": 15, "loss_steps_to_recover": 3,
        "dup_caption_rate": 0.05,
        "diverged": False, "wall_s": 12.5,
        "samples_per_s": 16.0,  # 20 steps × 8 pairs / 10 s of step time
        # the last evaluation's other figures, copied through
        "zeroshot_top1_colour": 0.45, "linear_probe_top1": 0.42,
    })


def test_a_trial_that_learned_is_not_stalled_and_one_that_diverged_is_neither():
    learned = [3.0] * 10 + [0.5] * 10
    assert summarize(history(learned), EVALS, make_trial(), False, 1.0, 40)["stalled"] is False
    diverged = summarize(history(learned), EVALS, make_trial(), True, 1.0, 40)
    assert diverged["stalled"] is None and diverged["final_loss"] is None
    # sigmoid at batch 8: no-learning loss 3.014; a loss of 10 (b stuck at −10) is stalled
    stuck = summarize(history([10.0] * 20), EVALS, make_trial("sigmoid"), False, 1.0, 40)
    assert stuck["stalled"] is True and stuck["no_learning_loss"] == pytest.approx(3.0141613)


def test_data_without_zero_shot_classes_or_evaluations_or_caption_counts_summarises():
    summary = summarize(history(dup=False), pl.DataFrame(), make_trial(), False, 1.0, num_classes=0)
    assert summary["zeroshot_chance"] is None
    assert summary["best_zeroshot_top1"] is None and summary["zeroshot_top1"] is None
    assert summary["dup_caption_rate"] is None
    assert "zeroshot_top1_colour" not in summary


def test_an_empty_history_summarises_to_no_figures():
    summary = summarize(history([])[:0], pl.DataFrame(), make_trial(), False, 0.0, 40)
    assert summary["step"] == 0 and summary["final_loss"] is None and summary["stalled"] is None
    assert summary["spike_count"] == summary["loss_spike_count"] == 0
    assert summary["spike_rate_per_1k"] is None and summary["samples_per_s"] is None
