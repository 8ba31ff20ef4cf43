"""Experiment trackers (`monitor.sinks`), read back from what they wrote: TensorBoard event files,
W&B offline run files and an MLflow file store, against the run directory (the source of truth)."""

from __future__ import annotations

import json
import multiprocessing
import socket
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from scalestudy.cli import main
from scalestudy.errors import SpecError
from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.reconcile import differences
from scalestudy.sinks.trackers import Guarded, TensorBoardSink, TrackedTrial, tracker_sinks
from scalestudy.store import RunStore
from scalestudy.train import ranks as rk
from scalestudy.train.loop import run_trial, train
from tests.conftest import tiny_study

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture
def trackers(tmp_path, monkeypatch) -> Path:
    """W&B offline into a temp WANDB_DIR, MLflow into a local file store; returns that folder."""
    root = tmp_path / "trackers"
    (root / "wandb").mkdir(parents=True)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root / "wandb"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{root / 'mlruns'}")
    # MLflow 3 keeps the file store only on request; it is the store that needs no server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    yield root
    import wandb

    wandb.teardown()  # the W&B service an in-process trial started


def with_sinks(sinks: list[str], **train: Any) -> dict[str, Any]:
    return tiny_study(base={"monitor": {"sinks": sinks}, "train": train})


# --- reading back what each tracker wrote ---------------------------------------------------------

def tensorboard_run(log_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    run.Reload()
    return run


def scalars(run, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in run.Scalars(tag)]


def float32(pairs: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, value) pairs as TensorBoard stores them (scalars are float32)."""
    return [(step, torch.tensor(value, dtype=torch.float32).item()) for step, value in pairs]


def raw_steps(log_dir: Path, tag: str) -> list[int]:
    """The steps of `tag` in the event files as written, before any reader's restart handling."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [event.step for path in sorted(log_dir.glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load()
            for value in event.summary.value if value.tag == tag]


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks of 7-byte-headed chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if room < 7 or (length, kind) == (0, 0):  # the rest of the block is padding
            pos += room
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Each attempt's offline run of `run_id`: its run record, history rows by step, and summary."""
    attempts = []
    for folder in sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id}")):
        run, history, summary = None, {}, {}
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                history[row["_step"]] = row
            elif kind == "summary":
                summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json)
                                for u in record.summary.update})
        attempts.append({"run": run, "history": history, "summary": summary})
    return attempts


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def mlflow_runs(study: str) -> dict[str, Any]:
    client = mlflow_client()
    experiment = client.get_experiment_by_name(study)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow_client().get_metric_history(run_id, key))


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.train
def test_each_tracker_holds_every_steps_grad_norm_the_config_the_swept_tags_and_the_summary(
    write_study, tmp_path, trackers
):
    assert main(["run", str(write_study(with_sinks(ALL))), "--out", str(tmp_path / "runs")]) == 0
    store = RunStore(tmp_path / "runs" / "tiny")
    runs = mlflow_runs("tiny")
    assert sorted(runs) == sorted(store.trial_ids())
    for trial_id in store.trial_ids():
        ts = store.trial(trial_id)
        trial, summary = ts.read_trial(), ts.summary()
        kind = trial.swept["loss.kind"]
        grad_norms = list(zip(ts.metrics()["step"].to_list(), ts.metrics()["grad_norm"].to_list()))
        assert [step for step, _ in grad_norms] == list(range(1, 17))
        assert "warning" not in ts.log_path.read_text()

        tb = tensorboard_run(store.root / "tensorboard" / trial_id)
        assert scalars(tb, "grad_norm") == float32(grad_norms)
        assert [s for s, _ in scalars(tb, "eval/zeroshot_top1")] == [8, 16]
        assert scalars(tb, "summary/final_loss") == float32([(16, summary["final_loss"])])
        config = tb.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
        assert f"| loss.kind | {kind} |" in config and "| derived.steps | 16 |" in config
        from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

        hparams = HParamsPluginData.FromString(
            tb.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        assert dict(hparams.session_start_info.hparams)["loss.kind"].string_value == kind

        [wb] = wandb_run(trackers / "wandb", TrackedTrial.of(trial, ts.path, "tiny").wandb_id)
        assert (wb["run"].run_group, wb["run"].display_name, list(wb["run"].tags)) == \
            ("tiny", trial_id, [f"loss.kind={kind}"])
        config = {u.key: json.loads(u.value_json) for u in wb["run"].config.update}
        assert config["loss.kind"] == kind and config["model.width"] == 16
        assert config["derived.steps"] == 16
        assert [(s, row["grad_norm"]) for s, row in sorted(wb["history"].items())] == grad_norms
        assert wb["history"][16]["eval/zeroshot_top1"] == summary["zeroshot_top1"]
        assert wb["summary"]["summary/final_loss"] == summary["final_loss"]

        run = runs[trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.params["loss.kind"] == kind and run.data.params["model.width"] == "16"
        assert run.data.tags["loss.kind"] == kind
        assert history(run.info.run_id, "grad_norm") == grad_norms
        assert history(run.info.run_id, "summary/final_loss") == [(16, summary["final_loss"])]


class CrashAt:
    """A sink that raises at `step`: the trial dies there, after its last checkpoint, with the
    trackers (later in the sink list) holding the steps up to that one."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if step == self.step:
            raise RuntimeError(f"crashed at step {step}")

    def flush(self) -> None: ...

    def close(self) -> None: ...


@pytest.mark.train
def test_a_trial_resumed_after_a_crash_continues_its_tracker_runs_and_shows_each_step_once(
    write_study, tmp_path, trackers
):
    study = with_sinks(ALL, checkpoint_every=4, eval_every=8)
    study["sweep"] = {"grid": {"loss.kind": ["sigmoid"]}}
    path = write_study(study)
    trial = expand(load_study(path))[0]
    store = RunStore(tmp_path / "runs" / "tiny")
    ts = store.add_trial(trial)
    with pytest.raises(RuntimeError, match="crashed at step 6"):
        train(ts, trial, threading.Event(), rk.Ranks(), torch.device("cpu"), extra_sinks=[CrashAt(6)])
    tb_dir = store.root / "tensorboard" / trial.trial_id
    assert raw_steps(tb_dir, "grad_norm") == [1, 2, 3, 4, 5]  # one step past the checkpoint (4)
    run_trial(str(ts.path))  # resumes from step 4; the store drops step 5 first

    assert ts.state().status == "done"
    grad_norms = list(zip(ts.metrics()["step"].to_list(), ts.metrics()["grad_norm"].to_list()))
    assert [step for step, _ in grad_norms] == list(range(1, 17))
    # TensorBoard: the files hold step 5 from both attempts; its reader shows the resumed one's.
    assert raw_steps(tb_dir, "grad_norm") == [1, 2, 3, 4, 5, *range(5, 17)]
    assert scalars(tensorboard_run(tb_dir), "grad_norm") == float32(grad_norms)
    # MLflow: the same run, step 5 not sent twice (the resumed trial recomputed the same value).
    [run] = mlflow_runs("tiny").values()
    assert run.info.status == "FINISHED"
    assert history(run.info.run_id, "grad_norm") == grad_norms
    assert [s for s, _ in history(run.info.run_id, "eval/zeroshot_top1")] == [8, 16]
    # W&B offline: each attempt wrote its own offline run under the one run id.
    attempts = wandb_run(trackers / "wandb", TrackedTrial.of(trial, ts.path, "tiny").wandb_id)
    assert len(attempts) == 2
    assert {(a["run"].run_group, a["run"].display_name) for a in attempts} == {("tiny", trial.trial_id)}
    assert sorted(attempts[1]["history"]) == list(range(5, 17))
    assert attempts[1]["summary"]["summary/final_loss"] == ts.summary()["final_loss"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.train
def test_trackers_that_are_not_installed_or_unreachable_warn_once_and_the_trial_still_ends_done(
    write_study, tmp_path, trackers, monkeypatch
):
    # wandb cannot be imported (as when its extra is not installed)…
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    monkeypatch.setenv("PYTHONPATH", f"{shadow.parent}:{__import__('os').environ.get('PYTHONPATH', '')}")
    # …and the MLflow server is not there (no retries, so the test does not wait on backoff).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    study = with_sinks(["wandb", "mlflow", "tensorboard"])
    study["sweep"] = {"grid": {"loss.kind": ["sigmoid"]}}
    assert main(["run", str(write_study(study)), "--out", str(tmp_path / "runs")]) == 0

    store = RunStore(tmp_path / "runs" / "tiny")
    [trial_id] = store.trial_ids()
    ts = store.trial(trial_id)
    assert ts.state().status == "done" and ts.metrics().height == 16
    warnings = [line for line in ts.log_path.read_text().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "the wandb tracker is off" in warnings[0]
    assert "pip install 'scalestudy[wandb]'" in warnings[0]
    assert "the mlflow tracker is off" in warnings[1]
    # The tracker that works is unaffected.
    tb = tensorboard_run(store.root / "tensorboard" / trial_id)
    assert [s for s, _ in scalars(tb, "grad_norm")] == list(range(1, 17))


def test_a_tracker_that_raises_in_log_warns_once_and_is_off_for_the_rest_of_the_trial(
    write_study, tmp_path, capsys
):
    trial = expand(load_study(write_study(with_sinks(["tensorboard"]))))[0]
    ts = RunStore(tmp_path / "runs" / "tiny").add_trial(trial)
    (ts.path.parent.parent / "tensorboard").write_text("a file where the log dir should go")
    sink = Guarded("tensorboard", lambda: TensorBoardSink(TrackedTrial.of(trial, ts.path, "tiny")))
    for step in (1, 2, 3):
        sink.log(step, {"loss": 1.0, "grad_norm": 0.5})
        sink.flush()
    sink.close()
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "the tensorboard tracker is off for the rest of this trial" in err


def test_a_trial_started_over_from_step_one_clears_its_earlier_tensorboard_events(write_study, tmp_path):
    # No checkpoint: the run directory forgot the earlier attempt, and so does its log dir.
    trial = expand(load_study(write_study(with_sinks(["tensorboard"]))))[0]
    ts = RunStore(tmp_path / "runs" / "tiny").add_trial(trial)
    for steps in ((1, 2, 3), (1, 2)):
        sink = TensorBoardSink(TrackedTrial.of(trial, ts.path, "tiny"))
        for step in steps:
            sink.log(step, {"loss": float(step), "grad_norm": 0.5})
        sink.close()
    log_dir = ts.path.parent.parent / "tensorboard" / trial.trial_id
    assert raw_steps(log_dir, "loss") == [1, 2]
    assert len(tensorboard_run(log_dir).Tensors("config/text_summary")) == 1


def test_tracker_runs_are_named_by_trial_and_told_apart_by_study(write_study, tmp_path):
    trial = expand(load_study(write_study(with_sinks(["wandb"]))))[0]
    one = TrackedTrial.of(trial, tmp_path / "a" / "trials" / trial.trial_id, "study-a")
    again = TrackedTrial.of(trial, tmp_path / "b" / "trials" / trial.trial_id, "study-a")
    other = TrackedTrial.of(trial, tmp_path / "c" / "trials" / trial.trial_id, "study-b")
    assert one.wandb_id == again.wandb_id != other.wandb_id
    assert one.wandb_id.startswith(trial.trial_id)
    assert one.tags == trial.swept and one.config["train.batch_size"] == 32


def _start_mlflow_run(barrier: Any, trial: TrackedTrial) -> None:
    from scalestudy.sinks.trackers import MlflowSink

    barrier.wait()
    MlflowSink(trial).close()


def test_trials_starting_together_share_one_mlflow_experiment_in_a_file_store(write_study, trackers):
    """The file store does not enforce unique experiment names; without the lock, trials that
    start at the same moment on an empty store split a study across experiments of the same name,
    or fail creating the store's default experiment."""
    trials = expand(load_study(write_study(tiny_study())))
    store = RunStore(trackers.parent / "runs" / "tiny")
    tracked = [replace(TrackedTrial.of(t, store.add_trial(t).path, "tiny"), trial_id=f"{t.trial_id}-{i}")
               for t in trials for i in range(4)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(tracked))
    workers = [context.Process(target=_start_mlflow_run, args=(barrier, t)) for t in tracked]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0] * len(workers)
    experiments = mlflow_client().search_experiments(filter_string="name = 'tiny'")
    assert len(experiments) == 1
    assert sorted(mlflow_runs("tiny")) == sorted(t.trial_id for t in tracked)


def test_monitor_sinks_default_to_none_and_reject_unknown_or_repeated_trackers(write_study, tmp_path):
    trials = expand(load_study(write_study(tiny_study())))
    assert all(t.config.monitor.sinks == [] for t in trials)
    ts = RunStore(tmp_path / "runs" / "tiny").add_trial(trials[0])
    assert tracker_sinks(trials[0], ts.path) == []
    with pytest.raises(SpecError, match=r"base\.monitor\.sinks\.0.*tensorboard"):
        load_study(write_study(with_sinks(["tensorbord"])))
    with pytest.raises(SpecError, match="monitor.sinks names wandb more than once"):
        load_study(write_study(with_sinks(["wandb", "mlflow", "wandb"])))


def test_turning_a_tracker_on_keeps_every_trial_id_and_changes_no_stored_trial(write_study):
    plain = expand(load_study(write_study(tiny_study(), "plain.yaml")))
    tracked = expand(load_study(write_study(with_sinks(ALL), "tracked.yaml")))
    assert [t.trial_id for t in tracked] == [t.trial_id for t in plain]
    stored = plain[0].model_dump(mode="json")
    assert differences(stored, tracked[0]) == []
