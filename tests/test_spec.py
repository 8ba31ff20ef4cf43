"""Study validation: one test per rule, each naming the key and the fix in its message."""

from __future__ import annotations

import pytest

from scalestudy.cli import main
from scalestudy.errors import SpecError
from scalestudy.load import apply_override, load_study, parse_yaml, validate_study
from tests.conftest import tiny_study


def errors_of(raw: dict) -> str:
    with pytest.raises(SpecError) as caught:
        validate_study(raw, "s.yaml")
    return str(caught.value)


def test_an_empty_base_is_a_valid_study_with_every_default():
    study = validate_study({"name": "x", "base": None}, "s.yaml")
    assert study.base.loss.kind == "sigmoid"
    assert study.base.train.batch_size > 0


def test_an_unknown_key_is_an_error_that_lists_the_allowed_keys():
    message = errors_of({"name": "x", "base": {"loss": {"knd": "sigmoid"}}})
    assert "base.loss.knd" in message
    assert "unknown key" in message and "kind" in message


def test_a_wrong_type_names_the_key_and_the_value():
    message = errors_of({"name": "x", "base": {"train": {"batch_size": "many"}}})
    assert "base.train.batch_size" in message and "'many'" in message


@pytest.mark.parametrize("size", [0, -8])
def test_a_batch_size_that_is_not_positive_is_rejected(size):
    assert "base.train.batch_size" in errors_of({"name": "x", "base": {"train": {"batch_size": size}}})


def test_an_unknown_loss_kind_says_which_kinds_exist():
    message = errors_of({"name": "x", "base": {"loss": {"kind": "hinge"}}})
    assert "base.loss.kind" in message and "softmax" in message and "sigmoid" in message


def test_a_bias_init_on_the_softmax_loss_is_rejected_because_it_has_no_bias():
    message = errors_of({"name": "x", "base": {"loss": {"kind": "softmax", "bias_init": -10}}})
    assert "loss.bias_init" in message and "only applies to loss.kind=sigmoid" in message


@pytest.mark.parametrize("option", [{"use_bias": False}, {"negative_weight": "balanced"},
                                    {"negative_mask_ratio": 0.5}])
def test_sigmoid_only_loss_options_are_rejected_for_softmax(option):
    message = errors_of({"name": "x", "base": {"loss": {"kind": "softmax", **option}}})
    assert f"loss.{next(iter(option))}" in message


def test_a_bias_init_without_a_bias_is_rejected():
    message = errors_of({"name": "x", "base": {"loss": {"use_bias": False, "bias_init": -5}}})
    assert "loss.use_bias=false" in message


def test_an_unknown_bias_init_rule_is_rejected():
    assert "base.loss.bias_init" in errors_of({"name": "x", "base": {"loss": {"bias_init": "log"}}})


def test_heads_must_divide_the_width():
    assert "model.heads" in errors_of({"name": "x", "base": {"model": {"width": 64, "heads": 5}}})


def test_the_patch_size_must_tile_the_image():
    message = errors_of({"name": "x", "base": {"data": {"image_size": 32}, "model": {"patch_size": 7}}})
    assert "model.patch_size" in message


def test_an_empty_sweep_list_is_rejected():
    message = errors_of({"name": "x", "sweep": {"grid": {"train.batch_size": []}}})
    assert "train.batch_size" in message and "empty" in message


def test_zip_lists_of_different_lengths_are_rejected():
    message = errors_of({"name": "x", "sweep": {"zip": {"train.batch_size": [32, 64],
                                                         "train.seed": [0]}}})
    assert "equal lengths" in message


def test_a_key_in_both_grid_and_zip_is_rejected():
    message = errors_of({"name": "x", "sweep": {"grid": {"train.seed": [0]},
                                                "zip": {"train.seed": [1]}}})
    assert "train.seed" in message


def test_a_study_name_must_be_usable_as_a_directory_name():
    assert "name" in errors_of({"name": "../escape"})


def test_unavailable_data_kinds_are_rejected_with_the_working_alternative():
    assert "data.kind=shapes" in errors_of({"name": "x", "base": {"data": {"kind": "csv"}}})


def test_a_yaml_syntax_error_names_the_line():
    with pytest.raises(SpecError, match="line 4"):
        parse_yaml("name: x\nbase:\n  train: {batch_size: 1}\n   oops: : 2\n", "s.yaml")


def test_a_set_on_a_key_that_does_not_exist_is_rejected():
    with pytest.raises(SpecError, match="unknown key 'bogus'"):
        apply_override({"name": "x"}, "train.bogus=1")


def test_a_set_on_a_swept_key_replaces_the_sweep_axis(write_study):
    path = write_study(tiny_study(grid={"train.batch_size": [16, 32], "loss.kind": ["softmax"]}))
    study = load_study(path, ["train.batch_size=64"])
    assert study.base.train.batch_size == 64
    assert "train.batch_size" not in study.sweep.grid


def test_a_set_value_is_validated_like_the_file(write_study):
    path = write_study(tiny_study())
    with pytest.raises(SpecError, match="base.optim.beta2"):
        load_study(path, ["optim.beta2=1.5"])


@pytest.mark.parametrize(
    "text, sets",
    [
        ("name: x\nbase: {loss: {knd: sigmoid}}\n", []),
        ("name: x\nbase: [unclosed\n", []),
        ("name: x\nbase: {train: {batch_size: 'many'}}\n", []),
        ("name: x\nbase: {train: {batch_size: 0}}\n", []),
        ("name: x\nbase: {loss: {kind: hinge}}\n", []),
        ("name: x\nsweep: {grid: {train.batch_size: []}}\n", []),
        ("name: x\n", ["loss.knd=sigmoid"]),
    ],
)
def test_every_bad_input_exits_2_with_one_message_and_creates_no_run_directory(
    tmp_path, capsys, text, sets
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "runs"
    argv = ["run", str(path), "--out", str(out)] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()
