"""Spike detection on synthetic series."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalestudy.train.monitors import SpikeDetector

positive = st.floats(0.01, 100.0, allow_nan=False)


def flags(series, threshold=3.0, window=10):
    detector = SpikeDetector(threshold, window)
    return [detector.update(v)[0] for v in series]


@given(positive, st.integers(1, 200))
def test_a_constant_series_never_spikes(value, length):
    assert not any(flags([value] * length))


@given(positive, st.integers(0, 50))
def test_one_jump_above_threshold_times_the_median_is_a_spike(level, before):
    series = [level] * (10 + before) + [level * 3.5] + [level] * 5
    assert flags(series) == [False] * (10 + before) + [True] + [False] * 5


@given(st.lists(positive, min_size=1, max_size=80), st.floats(0.01, 1000.0))
def test_spike_flags_do_not_depend_on_the_scale_of_the_series(series, scale):
    plain, scaled = SpikeDetector(3.0, 10), SpikeDetector(3.0, 10)
    for value in series:
        flag, ratio = plain.update(value)
        scaled_flag, scaled_ratio = scaled.update(value * scale)
        assert (ratio is None) == (scaled_ratio is None)
        if ratio is not None:
            assert scaled_ratio == pytest.approx(ratio, rel=1e-9)
            if abs(ratio - 3.0) > 1e-6:  # exactly at the threshold, rounding may go either way
                assert flag == scaled_flag


def test_nothing_is_flagged_while_the_window_is_warming_up():
    assert flags([1.0, 100.0, 1.0, 100.0], window=10) == [False] * 4


def test_a_non_finite_value_is_not_a_spike_and_does_not_poison_the_median():
    detector = SpikeDetector(3.0, 4)
    for value in [1.0, 1.0, 1.0, math.nan, math.inf]:
        assert detector.update(value)[0] is False
    assert detector.update(5.0) == (True, 5.0)


def test_the_detector_resumes_exactly_from_its_state():
    series = [1.0, 1.2, 0.9, 1.1, 5.0, 1.0, 1.3, 7.0]
    whole = SpikeDetector(3.0, 4)
    expected = [whole.update(v) for v in series]
    first = SpikeDetector(3.0, 4)
    head = [first.update(v) for v in series[:4]]
    resumed = SpikeDetector(3.0, 4)
    resumed.load_state_dict(first.state_dict())
    assert head + [resumed.update(v) for v in series[4:]] == expected


def test_logit_means_match_the_full_logit_matrix():
    import torch

    from scalestudy.train.monitors import logit_means

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=-1)
    t, b = torch.tensor(3.0), torch.tensor(-2.0)
    logits = t * x @ y.t() + b
    off = ~torch.eye(7, dtype=torch.bool)
    positive, negative = logit_means(x, y, t, b)
    assert positive == pytest.approx(logits.diagonal().mean().item(), rel=1e-5)
    assert negative == pytest.approx(logits[off].mean().item(), rel=1e-5)


def test_adam_staleness_is_large_when_a_gradient_jumps_far_above_its_history():
    import torch

    from scalestudy.train.monitors import adam_staleness

    param = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.95))
    readings = []
    for grad_scale in [1.0] * 20 + [30.0]:
        param.grad = torch.full((100,), grad_scale)
        readings.append(adam_staleness(opt))
        opt.step()
    assert readings[0] is None
    assert readings[-2] == pytest.approx(1.0, rel=0.05)  # steady gradients: g² ≈ v̂
    assert readings[-1] > 20


def test_steps_to_recover_counts_until_the_loss_is_back_at_its_pre_spike_median():
    from scalestudy.train.summary import steps_to_recover

    losses = [2.0, 2.1, 1.9, 2.0, 5.0, 4.0, 3.0, 2.0, 1.9]
    assert steps_to_recover(losses, [5], first_step=1, window=4) == 3
    assert steps_to_recover(losses, [], first_step=1, window=4) is None
