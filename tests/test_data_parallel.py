"""A data-parallel trial (real gloo ranks on this machine) trains the same model as one process."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.store import RunStore
from scalestudy.train import ranks as rk
from scalestudy.train.loop import run_trial
from tests import _dist_workers
from tests.conftest import tiny_study

pytestmark = pytest.mark.train


@pytest.mark.parametrize(("kind", "chunk"), [("sigmoid", None), ("softmax", None), ("sigmoid", 8)])
def test_a_two_worker_trial_matches_its_single_process_twin(write_study, tmp_path, kind, chunk):
    base = {"train": {"examples_seen": 32 * 12, "batch_size": 32, "checkpoint_every": 6,
                      "eval_every": 6}, "resources": {"cpus": 2}, "loss": {"chunk_size": chunk}}
    single = expand(load_study(write_study(tiny_study(grid={"loss.kind": [kind]}, base=base))))[0]
    twin = single.model_copy(update={"config": single.config.model_copy(
        update={"resources": single.config.resources.model_copy(update={"workers": 2})})})
    assert twin.trial_id == single.trial_id  # resources are not part of the identity

    summaries = {}
    for name, trial in (("single", single), ("workers2", twin)):
        ts = RunStore(tmp_path / name).add_trial(trial)
        summaries[name] = run_trial(str(ts.path))
        assert ts.state().status == "done"
    one = RunStore(tmp_path / "single").trial(single.trial_id)
    two = RunStore(tmp_path / "workers2").trial(single.trial_id)
    columns = ["step", "loss", "grad_norm", "temperature", "update_norm", "param_norm"]
    a, b = one.metrics().select(columns), two.metrics().select(columns)
    assert a["step"].to_list() == b["step"].to_list() == list(range(1, 13))
    for column in columns[1:]:
        # Adam's first steps divide each gradient entry by its own magnitude, so entries near zero
        # turn float32 summation-order noise (gloo all-reduce vs one matmul) into ~1e-4 relative
        # differences of the update norm; every other column agrees to 1e-4.
        rel = 1e-3 if column == "update_norm" else 1e-4
        assert a[column].to_numpy() == pytest.approx(b[column].to_numpy(), rel=rel, abs=1e-6), column
    assert one.evals()["step"].to_list() == two.evals()["step"].to_list() == [6, 12]
    assert one.evals().drop("step").to_numpy() == pytest.approx(
        two.evals().drop("step").to_numpy(), abs=1e-2)


def test_a_spawned_rank_that_dies_on_its_way_out_after_finishing_its_part_is_reported_not_raised(capfd):
    with rk.local_children(2, _dist_workers.abort_on_the_way_out):
        pass  # rank 0's part: nothing; the context's exit waits for rank 1 and must not raise
    err = capfd.readouterr().err
    assert "rank 1" in err and "SIGABRT after finishing its part" in err


def test_a_spawned_rank_that_dies_before_finishing_its_part_fails_the_trial():
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        with rk.local_children(2, _dist_workers.abort_midway):
            pass
