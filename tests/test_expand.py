"""Expansion: grid sizes, zip, include/exclude, derived values, and ids that never drift."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalestudy.errors import SpecError
from scalestudy.expand import derive, expand, trial_id
from scalestudy.load import validate_study
from scalestudy.spec import TrialConfig

batch_sizes = st.lists(st.sampled_from([8, 16, 32, 64, 128, 256, 512]), min_size=1, max_size=5,
                       unique=True)
seeds = st.lists(st.integers(0, 1000), min_size=1, max_size=4, unique=True)


def study(**sweep):
    return validate_study({"name": "s", "sweep": sweep}, "s.yaml")


@given(batch_sizes, seeds)
@settings(max_examples=30, deadline=None)
def test_a_grid_has_one_trial_per_combination(sizes, seed_list):
    trials = expand(study(grid={"train.batch_size": sizes, "train.seed": seed_list,
                                "loss.kind": ["softmax", "sigmoid"]}))
    assert len(trials) == len(sizes) * len(seed_list) * 2
    assert len({t.trial_id for t in trials}) == len(trials)


@given(batch_sizes, seeds)
@settings(max_examples=30, deadline=None)
def test_expansion_is_deterministic_and_ids_are_stable(sizes, seed_list):
    spec = study(grid={"train.batch_size": sizes}, zip={"train.seed": seed_list[:1]})
    first, second = expand(spec), expand(spec)
    assert [t.trial_id for t in first] == [t.trial_id for t in second]
    assert all(t.trial_id == trial_id(t.config) for t in first)


def test_the_same_config_gets_the_same_id_in_a_bigger_study():
    small = expand(study(grid={"train.batch_size": [32, 64]}))
    big = expand(study(grid={"train.batch_size": [32, 64, 128], "train.seed": [0, 1]}))
    assert {t.trial_id for t in small} <= {t.trial_id for t in big}


def test_resources_do_not_change_a_trials_identity():
    a, b = TrialConfig(), TrialConfig(resources={"cpus": 4})
    assert trial_id(a) == trial_id(b)
    assert trial_id(a) != trial_id(TrialConfig(train={"seed": 1}))


def test_zip_pairs_values_in_lock_step():
    trials = expand(study(zip={"train.batch_size": [32, 64], "optim.lr": [1e-3, 2e-3]}))
    assert [(t.swept["train.batch_size"], t.swept["optim.lr"]) for t in trials] == [
        (32, 1e-3), (64, 2e-3)]


def test_include_adds_points_and_exclude_removes_matching_ones():
    trials = expand(study(grid={"train.batch_size": [32, 64], "loss.kind": ["softmax", "sigmoid"]},
                          include=[{"train.batch_size": 1024, "loss.kind": "sigmoid"}],
                          exclude=[{"train.batch_size": 64, "loss.kind": "softmax"}]))
    points = {(t.swept["train.batch_size"], t.swept["loss.kind"]) for t in trials}
    assert points == {(32, "softmax"), (32, "sigmoid"), (64, "sigmoid"), (1024, "sigmoid")}


def test_an_exclude_that_removes_everything_is_an_error():
    with pytest.raises(SpecError, match="remove every trial"):
        expand(study(grid={"train.seed": [0]}, exclude=[{"train.seed": 0}]))


def test_a_bad_sweep_value_names_its_axis_and_position():
    with pytest.raises(SpecError, match=r"sweep.grid.train.batch_size\[1\]"):
        expand(study(grid={"train.batch_size": [32, -1]}))


def test_a_sweep_over_an_unknown_key_is_an_error():
    with pytest.raises(SpecError, match="unknown key 'batchsize'"):
        expand(study(grid={"train.batchsize": [32]}))


@given(st.integers(1, 10**6), st.integers(1, 4096))
def test_steps_come_from_the_examples_seen_budget(examples, batch):
    derived = derive(TrialConfig(train={"examples_seen": examples, "batch_size": batch}))
    assert derived.steps == math.ceil(examples / batch)
    assert examples <= derived.examples_seen < examples + batch


@pytest.mark.parametrize("rule, expected", [("none", 1e-3), ("sqrt", 2e-3), ("linear", 4e-3)])
def test_the_lr_scales_with_batch_size_by_the_declared_rule(rule, expected):
    config = TrialConfig(train={"batch_size": 1024},
                         optim={"lr": 1e-3, "lr_scaling": rule, "lr_reference_batch": 256})
    assert derive(config).lr == pytest.approx(expected)


def test_loss_inits_default_to_the_papers_values():
    softmax = derive(TrialConfig(loss={"kind": "softmax"}))
    sigmoid = derive(TrialConfig(loss={"kind": "sigmoid"}))
    assert softmax.temperature_init == pytest.approx(1 / 0.07) and softmax.bias_init is None
    assert sigmoid.temperature_init == 10 and sigmoid.bias_init == -10


@pytest.mark.parametrize("batch", [16, 1024])
def test_a_neg_log_batch_bias_init_is_minus_the_log_of_the_batch_size(batch):
    derived = derive(TrialConfig(train={"batch_size": batch}, loss={"bias_init": "neg_log_batch"}))
    assert derived.bias_init == pytest.approx(-math.log(batch))


def test_a_sigmoid_loss_without_bias_has_no_bias_init():
    assert derive(TrialConfig(loss={"use_bias": False})).bias_init is None
