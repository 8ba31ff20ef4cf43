"""The run directory as the one contract: ids that survive new spec keys, stored trials checked
against their new resolution, and a read side that needs neither the study nor its data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
from pathlib import Path

import polars as pl
import pytest
import yaml
from PIL import Image
from pydantic import Field, create_model

from scalestudy import cli
from scalestudy.analysis.synthetic import write_synthetic_run
from scalestudy.cli import main
from scalestudy.dashboard.data import Dashboard
from scalestudy.errors import ConfigChanged
from scalestudy.expand import derive, expand, trial_id
from scalestudy.load import validate_study
from scalestudy.reconcile import adopt_earlier_ids, check_unchanged
from scalestudy.spec import TrainSpec, TrialConfig
from scalestudy.store import RunStore, Status, Trial, TrialState, files, results_frame
from scalestudy.store.files import atomic_write_text
from tests.conftest import tiny_study

def with_new_train_key(default: int) -> type[TrialConfig]:
    """TrialConfig as a later version might have it: `train.new_knob` added with a default."""
    train = create_model("TrainSpecWithKnob", __base__=TrainSpec,
                         new_knob=(int, Field(default, description="a key added later")))
    return create_model("TrialConfigWithKnob", __base__=TrialConfig,
                        train=(train, Field(default_factory=train, description="train")))


def test_adding_a_key_with_a_default_leaves_every_trial_id_unchanged():
    later = with_new_train_key(default=7)
    for values in ({}, {"loss": {"kind": "softmax"}}, {"train": {"batch_size": 32, "seed": 3}},
                   {"optim": {"lr": 0.01}, "model": {"width": 32}}):
        assert trial_id(later.model_validate(values)) == trial_id(TrialConfig.model_validate(values))
    # Set away from its default, the new key is part of the identity.
    assert trial_id(later.model_validate({"train": {"new_knob": 8}})) != trial_id(TrialConfig())


def test_a_trial_id_is_pinned_for_a_fixed_config():
    # A change of the id scheme re-keys every run directory: it must never happen by accident.
    config = TrialConfig.model_validate({"loss": {"kind": "softmax"}, "train": {"batch_size": 32},
                                         "resources": {"cpus": 4}})
    # sha256 of the non-default keys as canonical JSON, first 12 hex digits:
    # sha256(b'{"loss":{"kind":"softmax"},"train":{"batch_size":32}}')
    assert trial_id(config) == "d640c28a318a"
    assert trial_id(TrialConfig()) == "44136fa355b3"  # sha256(b"{}")


def stored_trial(store: RunStore, config: TrialConfig, **config_changes: dict) -> Trial:
    """Write a trial as an earlier version would have: the same id, its own stored values."""
    trial = Trial(trial_id=trial_id(config), config=config, derived=derive(config), swept={})
    stored = trial.model_dump(mode="json")
    for section, values in config_changes.items():
        stored["config"][section].update(values)
    ts = store.trial(trial.trial_id)
    ts.path.mkdir(parents=True)
    ts.config_path.write_text(json.dumps(stored))
    ts.update_state(status=Status.DONE)
    return trial


def test_a_changed_default_stops_run_naming_the_trial_key_values_and_the_ways_on(tmp_path):
    store = RunStore(tmp_path / "run")
    trial = stored_trial(store, TrialConfig(), optim={"lr": 0.002})  # the old default, say
    with pytest.raises(ConfigChanged) as raised:
        check_unchanged(store, [trial], retrain_changed=False, command="scalestudy run s.yaml")
    message = str(raised.value)
    assert trial.trial_id in message and "optim.lr was 0.002, the study now gives 0.001" in message
    assert "--set optim.lr=0.002" in message and "--retrain-changed" in message
    assert store.trial(trial.trial_id).state().status == Status.DONE  # nothing was touched


def test_retrain_changed_sets_the_old_trial_aside_and_never_deletes_it(tmp_path):
    store = RunStore(tmp_path / "run")
    trial = stored_trial(store, TrialConfig(), optim={"lr": 0.002})
    assert check_unchanged(store, [trial], retrain_changed=True, command="-") == [trial.trial_id]
    assert trial.trial_id not in store.trial_ids()
    [kept] = list(store.superseded_dir.iterdir())
    assert json.loads((kept / "config.json").read_text())["config"]["optim"]["lr"] == 0.002


def test_a_key_new_in_the_spec_is_not_a_change_of_a_stored_trial(tmp_path):
    later = with_new_train_key(default=7)
    config = later.model_validate({"train": {"batch_size": 32}})
    trial = Trial(trial_id=trial_id(config), config=config, derived=derive(config), swept={})
    store = RunStore(tmp_path / "run")
    ts = store.trial(trial.trial_id)
    ts.path.mkdir(parents=True)
    stored = {**trial.model_dump(mode="json"), "config": config.model_dump(mode="json")}
    assert stored["config"]["train"].pop("new_knob") == 7  # written before the key existed
    ts.config_path.write_text(json.dumps(stored))
    assert check_unchanged(store, [trial], retrain_changed=False, command="-") == []


def earlier_scheme_id(config: TrialConfig) -> str:
    """How ids were made before: a hash of the whole config dump (minus resources)."""
    canonical = json.dumps(config.model_dump(mode="json", exclude={"resources"}), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@pytest.mark.train
def test_a_run_adopts_trials_stored_under_the_earlier_id_scheme_and_trains_nothing(write_study, tmp_path):
    path = write_study(tiny_study())
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out)]) == 0
    store = RunStore(out / "tiny")
    before = results_frame(store).select("trial_id", "final_loss", "zeroshot_top1")
    for tid in store.trial_ids():  # rename every trial as the earlier version named it
        old = earlier_scheme_id(store.trial(tid).read_trial().config)
        shutil.move(store.trial(tid).path, store.trial(old).path)
        stored = json.loads(store.trial(old).config_path.read_text())
        store.trial(old).config_path.write_text(json.dumps({**stored, "trial_id": old}))
    trials = expand(validate_study(tiny_study(), "s"))
    assert sorted(new for _, new in adopt_earlier_ids(store, trials)) == sorted(before["trial_id"])
    assert main(["run", str(path), "--out", str(out)]) == 0
    after = results_frame(store).select("trial_id", "final_loss", "zeroshot_top1")
    assert after.sort("trial_id").equals(before.sort("trial_id"))
    assert all(store.trial(t).state().attempts == 1 for t in store.trial_ids())  # no re-training


def write_csv_data(folder: Path, count: int = 80) -> Path:
    folder.mkdir()
    lines = ["image,caption"]
    for i in range(count):
        colour = ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, "PNG")
        (folder / f"{i}.png").write_bytes(buffer.getvalue())
        lines.append(f"{i}.png,a swatch of colour number {i}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


@pytest.mark.train
def test_the_read_side_works_on_a_run_directory_moved_away_from_its_data(write_study, tmp_path, monkeypatch):
    csv = write_csv_data(tmp_path / "data")
    study = tiny_study(base={"data": {"kind": "csv", "csv": str(csv), "eval_images": 16},
                             "train": {"examples_seen": 128}})
    out = tmp_path / "runs"
    assert main(["run", str(write_study(study)), "--out", str(out)]) == 0
    before = results_frame(RunStore(out / "tiny"))
    shutil.rmtree(tmp_path / "data")
    moved = tmp_path / "elsewhere" / "copy"
    shutil.move(out / "tiny", moved)

    def never(*args, **kwargs):
        raise AssertionError("the read side loaded, validated or expanded the study")

    for name in ("load_study", "expand"):
        monkeypatch.setattr(cli, name, never)
    monkeypatch.setattr("scalestudy.load.validate_study", never)
    assert main(["status", str(moved)]) == 0
    assert main(["status", str(moved), "--json"]) == 0
    assert main(["report", str(moved)]) == 0
    assert (moved / "report" / "index.html").exists()
    overview = Dashboard(moved).overview()
    assert overview["problem"] is None and {r["status"] for r in overview["trials"]} == {"done"}
    assert results_frame(RunStore(moved)).equals(before)


def test_run_of_a_200_trial_study_expands_it_once_and_the_read_side_never(tmp_path, monkeypatch):
    study = {"name": "big", "base": {"train": {"examples_seen": 64 * 20, "batch_size": 64}},
             "sweep": {"grid": {"loss.kind": ["softmax", "sigmoid"], "optim.lr": [1e-4, 1e-3],
                                "train.seed": list(range(50))}}}
    write_synthetic_run(tmp_path, study, steps=20)  # 200 finished trials
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(study))
    calls = []
    real = cli.expand

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, "expand", counted)
    monkeypatch.setattr("scalestudy.expand.expand", counted)
    assert main(["run", str(tmp_path / "big.yaml"), "--out", str(tmp_path)]) == 0
    assert len(calls) == 1
    assert main(["status", str(tmp_path / "big")]) == 0
    assert len(calls) == 1


def test_state_json_is_typed_and_an_unknown_field_is_a_programming_error(tmp_path):
    ts = RunStore(tmp_path).trial("abc")
    ts.path.mkdir(parents=True)
    ts.update_state(status=Status.RUNNING, step=3)
    assert ts.state() == TrialState.model_validate(json.loads(ts.state_path.read_text()))
    assert ts.state().status is Status.RUNNING and ts.state().status == "running"
    with pytest.raises(TypeError, match="stauts"):
        ts.update_state(stauts="done")


def test_a_trial_whose_config_cannot_be_read_is_a_failed_row_not_an_exception(tmp_path):
    store = RunStore(tmp_path)
    for tid, text in (("broken", "{not json"), ("wrongshape", json.dumps({"config": 3}))):
        store.trial(tid).path.mkdir(parents=True)
        store.trial(tid).config_path.write_text(text)
    rows = results_frame(store).sort("trial_id")
    assert rows["status"].to_list() == ["failed", "failed"]
    assert all(error for error in rows["error"].to_list())


def test_checkpoints_are_written_atomically_and_load_to_the_cpu(tmp_path):
    import torch

    ts = RunStore(tmp_path).trial("t")
    ts.path.mkdir(parents=True)
    ts.save_checkpoint({"step": 1, "w": torch.ones(2)})
    assert not [p for p in ts.path.iterdir() if p.name.endswith(".tmp")]
    loaded = ts.load_checkpoint()
    assert loaded["step"] == 1 and loaded["w"].device.type == "cpu"


def test_files_the_store_writes_are_readable_by_the_group_as_the_umask_allows(tmp_path):
    # Atomic writes go through a private temp file; the result must not stay private, or a run
    # directory on a group share cannot be read by the rest of the group.
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    atomic_write_text(tmp_path / "b.txt", "x")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o666 & ~files.umask()


def test_status_report_and_dashboard_name_a_missing_or_foreign_directory(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    for command in ("status", "report", "dashboard", "cancel"):
        for where in (tmp_path / "absent", tmp_path / "plain"):
            assert main([command, str(where)]) == 2
            err = capsys.readouterr().err
            assert str(where) in err and "Traceback" not in err
    assert not list((tmp_path / "plain").iterdir())  # nothing written


@pytest.mark.train
def test_results_rows_carry_every_summary_figure(write_study, tmp_path):
    out = tmp_path / "runs"
    assert main(["run", str(write_study(tiny_study())), "--out", str(out)]) == 0
    frame = pl.read_parquet(out / "tiny" / "results.parquet")
    assert {"zeroshot_top5", "loss_spike_count", "in_study", "derived.steps"} <= set(frame.columns)
