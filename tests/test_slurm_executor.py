"""`scalestudy run --executor slurm`: job arrays through submitit on the real local Slurm cluster.

The settings tests at the top need no cluster. The cluster tests (marked `slurm`, and `train`: each
runs trials) skip without one, or fail under SCALESTUDY_REQUIRE_SLURM=1 (CI), exactly as
tests/test_slurm_cluster.py decides. Every wait has a
deadline, so a cluster fault fails a test instead of hanging the run.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import scalestudy
from scalestudy.cli import main
from scalestudy.errors import SpecError
from scalestudy.executors.slurm import (
    LIVE,
    SlurmExecutor,
    TrialJob,
    expand_job_ids,
    job_parameters,
    plan_arrays,
)
from scalestudy.expand import expand
from scalestudy.load import SLURM_PROFILES, load_study, read_slurm_profile
from scalestudy.spec import ResourcesSpec, SlurmExecutorSpec
from scalestudy.store import RunStore
from tests.conftest import tiny_study

REPO = Path(__file__).resolve().parents[1]
PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")
SLURM = {"executor": {"slurm": {"partition": PARTITION}}}
DEADLINE_S = 150.0
# Long enough (200 steps, some 6 s on an idle machine) to be signalled while it trains.
LONG = {"train": {"examples_seen": 32 * 200, "checkpoint_every": 25, "eval_every": 100}}


# --- settings: no cluster needed -----------------------------------------------------------


def test_each_data_parallel_rank_is_a_slurm_task_and_gpus_beyond_a_node_span_nodes():
    settings = SlurmExecutorSpec(gpus_per_node=8, partition="gpu", mem_gb=1.5, time_min=120)

    cpu_ranks = job_parameters(ResourcesSpec(cpus=4, workers=2), settings)
    two_nodes = job_parameters(ResourcesSpec(cpus=32, gpus=16), settings)

    assert (cpu_ranks["nodes"], cpu_ranks["ntasks_per_node"], cpu_ranks["cpus_per_task"]) == (1, 2, 2)
    assert "gpus_per_node" not in cpu_ranks
    assert (two_nodes["nodes"], two_nodes["ntasks_per_node"], two_nodes["gpus_per_node"]) == (2, 8, 8)
    assert (two_nodes["partition"], two_nodes["mem"], two_nodes["time"]) == ("gpu", "1536M", 120)


def test_gpus_that_do_not_fill_whole_nodes_are_refused_with_the_fix():
    with pytest.raises(SpecError, match="resources.gpus=12 .* at most 8 GPUs or a multiple of 8"):
        job_parameters(ResourcesSpec(gpus=12), SlurmExecutorSpec(gpus_per_node=8))


def test_a_gpu_share_cannot_go_to_slurm_and_the_message_names_the_executors_that_can():
    with pytest.raises(SpecError, match=r"resources.gpus=0.5 is a share of one GPU, but a Slurm job "
                       r"gets whole GPUs.*--executor local or ray"):
        job_parameters(ResourcesSpec(gpus=0.5), SlurmExecutorSpec(gpus_per_node=8))


def test_several_gpus_need_gpus_per_node_and_the_message_names_the_profiles_that_set_it():
    with pytest.raises(SpecError, match=r"resources.gpus=2 needs executor.slurm.gpus_per_node.*"
                       r"--set executor.slurm.gpus_per_node=N.*gpu-a100 \(8 per node\), local "
                       r"\(2 per node\)"):
        job_parameters(ResourcesSpec(gpus=2), SlurmExecutorSpec())
    # One GPU always fits one node: nothing to know about the cluster.
    assert job_parameters(ResourcesSpec(gpus=1), SlurmExecutorSpec())["gpus_per_node"] == 1


def test_plan_lists_every_trial_slurm_cannot_run_before_anything_is_submitted(write_study, capsys):
    study = tiny_study(**SLURM)
    study["sweep"] = {"zip": {"train.seed": [0, 1, 2], "resources.gpus": [0.5, 4, 1]}}
    path = write_study(study)
    ids = {t.config.train.seed: t.trial_id for t in expand(load_study(path))}

    assert main(["plan", str(path), "--executor", "slurm"]) == 2

    error = capsys.readouterr().err
    assert re.search(rf"resources.gpus=0.5 is a share of one GPU.*\(trials {ids[0]}\)", error)
    assert re.search(rf"resources.gpus=4 needs executor.slurm.gpus_per_node.*\(trials {ids[1]}\)",
                     error)
    assert ids[2] not in error


def test_plan_shows_a_multi_gpu_trial_filling_whole_nodes_of_the_profile(write_study, capsys):
    path = write_study(tiny_study(base={"resources": {"gpus": 4, "cpus": 8}}))

    assert main(["plan", str(path), "--executor", "slurm",
                 "--set", "executor.slurm.profile=local"]) == 0

    shown = capsys.readouterr().out
    assert "--nodes=2 --ntasks-per-node=2 --cpus-per-task=2" in shown
    assert "--gpus-per-node=2" in shown
    assert "GPU placement: nodes of executor.slurm.gpus_per_node=2 GPUs" in shown


def test_trials_are_grouped_by_resources_and_no_array_exceeds_max_array_size(write_study):
    # Resources are not part of a trial's identity, so each CPU count gets its own seeds.
    trials = [trial for cpus, seeds in ((1, [0, 1, 2]), (2, [3, 4, 5])) for trial in expand(load_study(
        write_study(tiny_study(grid={"train.seed": seeds}, base={"resources": {"cpus": cpus}}))))]

    arrays = plan_arrays(trials, SlurmExecutorSpec(), max_array_size=2)

    assert [len(a.trials) for a in arrays] == [2, 1, 2, 1]
    assert [a.parameters["cpus_per_task"] for a in arrays] == [1, 1, 2, 2]
    assert sorted(t.trial_id for a in arrays for t in a.trials) == sorted(t.trial_id for t in trials)


def test_the_study_settings_win_over_the_profile(write_study):
    study = tiny_study(executor={"kind": "slurm", "slurm": {"profile": "gpu-a100", "time_min": 30}})

    settings = load_study(write_study(study)).executor.slurm

    assert (settings.time_min, settings.partition, settings.gpus_per_node) == (30, "gpu", 8)
    assert settings.setup[0] == "module load cuda/12.1"


@pytest.mark.parametrize("profile", sorted(p.stem for p in SLURM_PROFILES.glob("*.yaml")))
def test_every_shipped_profile_is_valid(profile):
    assert SlurmExecutorSpec.model_validate({**read_slurm_profile(profile), "profile": profile})


def test_the_profiles_ship_inside_the_package_and_a_users_folder_is_searched_first(
        write_study, tmp_path, monkeypatch):
    assert SLURM_PROFILES.is_relative_to(Path(scalestudy.__file__).parent)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "gpu-a100.yaml").write_text("partition: ours\n")
    monkeypatch.setenv("SCALESTUDY_SLURM_PROFILES", str(tmp_path / "site"))
    study = tiny_study(executor={"kind": "slurm", "slurm": {"profile": "gpu-a100"}})
    assert load_study(write_study(study)).executor.slurm.partition == "ours"


def test_a_profile_with_a_typo_names_the_file_and_the_key(write_study, tmp_path):
    (tmp_path / "site.yaml").write_text("partiton: gpu\n")
    study = tiny_study(executor={"slurm": {"profile": str(tmp_path / "site.yaml")}})

    with pytest.raises(SpecError, match=r"profile .*site.yaml: partiton: Extra"):
        load_study(write_study(study))


def test_an_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(SpecError, match=r"no-such-cluster.*\(cpu, gpu-a100, local;"):
        read_slurm_profile("no-such-cluster")


def test_a_time_limit_shorter_than_the_checkpoint_signal_is_refused():
    with pytest.raises(ValueError, match="signal_delay_s=90 must be shorter"):
        SlurmExecutorSpec(time_min=1)


def test_a_preempted_trial_is_requeued_at_most_max_requeues_times(write_study, tmp_path):
    (trial,) = expand(load_study(write_study(tiny_study(grid={"loss.kind": ["sigmoid"]}))))
    ts = RunStore(tmp_path).add_trial(trial)
    ts.update_state(status="preempted", step=4)  # as the trial leaves it after the signal
    job = TrialJob(str(ts.path), max_requeues=1)

    again = job.checkpoint()
    last = pickle.loads(pickle.dumps(again.function)).checkpoint()

    assert again.function.requeues == 1
    assert last is None
    assert "max_requeues=1" in ts.state().error and ts.state().status == "preempted"


def test_sacct_array_ranges_expand_to_one_id_per_task():
    assert expand_job_ids("12_[0-2,7%2]") == ["12_0", "12_1", "12_2", "12_7"]
    assert expand_job_ids("12_3") == ["12_3"]


# --- the real cluster ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> None:
    # Importing the cluster smoke tests runs their check of the cluster: it skips these tests,
    # or fails them under SCALESTUDY_REQUIRE_SLURM=1, when no usable cluster answers.
    importlib.import_module("tests.test_slurm_cluster")


def submit(study: Path, out: Path, *flags: str) -> None:
    assert main(["run", str(study), "--executor", "slurm", "--out", str(out), *flags]) == 0


def states(run_dir: Path) -> dict[str, dict[str, Any]]:
    store = RunStore(run_dir)
    return {tid: store.trial(tid).state().model_dump() for tid in store.trial_ids()}


def wait_done(run_dir: Path, timeout_s: float = DEADLINE_S) -> dict[str, dict[str, Any]]:
    store = RunStore(run_dir)
    SlurmExecutor().wait(store, store.trial_ids(), timeout_s=timeout_s)
    return states(run_dir)


def wait_training(run_dir: Path, timeout_s: float = DEADLINE_S) -> dict[str, Any]:
    """The only trial's state once it has trained and recorded some steps."""
    store = RunStore(run_dir)
    (tid,) = store.trial_ids()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = store.trial(tid).state().model_dump()
        if state.get("status") == "running" and state.get("step"):
            return state
        if SlurmExecutor().job_states(store, [tid]).get(tid) not in LIVE:
            raise AssertionError(f"the trial's job ended before it trained: {store.trial(tid).state()}")
        time.sleep(0.5)
    raise AssertionError(f"the trial did not start training within {timeout_s:.0f} s: {state}")


def set_max_array_size(size: int | None) -> None:
    """Restart slurmctld with MaxArraySize=size (None: Slurm's default, as a plain start)."""
    env = dict(os.environ)
    env.pop("SLURM_LOCAL_MAX_ARRAY_SIZE", None)
    if size is not None:
        env["SLURM_LOCAL_MAX_ARRAY_SIZE"] = str(size)
    subprocess.run(["bash", str(REPO / "cluster/slurm/slurm-local.sh"), "start"], env=env,
                   check=True, capture_output=True, timeout=120)


@pytest.mark.slurm
@pytest.mark.train
def test_a_study_on_slurm_returns_at_once_then_finishes_like_the_local_executor(
    cluster, write_study, tmp_path
):
    study = write_study(tiny_study("twins", **SLURM))
    assert main(["run", str(study), "--out", str(tmp_path / "local")]) == 0

    submit(study, tmp_path / "slurm")
    run_dir = tmp_path / "slurm" / "twins"
    submitted = states(run_dir)
    # Detached: the jobs are queued (their trials still importing torch) when `run` returns.
    assert {s["status"] for s in submitted.values()} <= {"pending", "running"}
    assert {s["backend"] for s in submitted.values()} == {"slurm"}
    array = submitted[next(iter(submitted))]["job_id"].split("_")[0]
    assert sorted(s["job_id"] for s in submitted.values()) == [f"{array}_0", f"{array}_1"]
    script = (run_dir / "slurm" / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-1%2" in script and f"#SBATCH --partition={PARTITION}" in script

    again = subprocess.run(
        [sys.executable, "-m", "scalestudy.cli", "run", str(study), "--executor", "slurm",
         "--out", str(tmp_path / "slurm"), "--wait"],
        capture_output=True, text=True, timeout=DEADLINE_S,
    )

    assert again.returncode == 0, again.stderr
    # The trials still queued or running when the second `run` looked (on a busy machine one may
    # have finished by then) are left to their jobs, not submitted again.
    unfinished = int(re.search(r"(\d+) to run", again.stdout).group(1))
    assert unfinished == 0 or (
        f"{unfinished} trial{'s' if unfinished > 1 else ''} already queued or running in Slurm, "
        "not submitted again") in again.stdout
    finished = states(run_dir)
    assert {tid: s["job_id"] for tid, s in finished.items()} == {
        tid: s["job_id"] for tid, s in submitted.items()}
    assert all(Path(s["log"]).is_file() for s in finished.values())
    local = pl.read_parquet(tmp_path / "local" / "twins" / "results.parquet").sort("trial_id")
    slurm = pl.read_parquet(run_dir / "results.parquet").sort("trial_id")
    assert slurm["trial_id"].to_list() == local["trial_id"].to_list()
    assert slurm["status"].to_list() == ["done", "done"]
    for column in ("final_loss", "zeroshot_top1", "retrieval_i2t_r1", "best_zeroshot_top1"):
        assert slurm[column].to_list() == pytest.approx(local[column].to_list(), rel=1e-5), column
    for tid in slurm["trial_id"]:
        on_slurm = RunStore(run_dir).trial(tid).metrics()["loss"].to_numpy()
        at_home = RunStore(tmp_path / "local" / "twins").trial(tid).metrics()["loss"].to_numpy()
        assert on_slurm == pytest.approx(at_home, rel=1e-5)


@pytest.mark.slurm
@pytest.mark.train
def test_a_study_larger_than_max_array_size_is_split_into_several_arrays(
    cluster, write_study, tmp_path, capsys
):
    study = write_study(tiny_study("split", grid={"train.seed": [0, 1, 2]},
                                   base={"train": {"examples_seen": 64}}, **SLURM))
    set_max_array_size(2)
    try:
        assert main(["plan", str(study), "--executor", "slurm"]) == 0
        submit(study, tmp_path)
    finally:
        set_max_array_size(None)  # running jobs keep running through the restart

    assert "Slurm: 2 job array(s), MaxArraySize 2 (from scontrol show config)" in capsys.readouterr().out
    finished = wait_done(tmp_path / "split")
    arrays = sorted(s["job_id"].split("_")[0] for s in finished.values())
    assert sorted(arrays.count(a) for a in set(arrays)) == [1, 2]
    assert {s["status"] for s in finished.values()} == {"done"}


@pytest.mark.slurm
@pytest.mark.train
def test_a_trial_that_raises_is_failed_with_its_traceback_while_the_other_finishes(
    cluster, write_study, tmp_path, capsys
):
    # train.device=cuda on a node whose GPUs torch cannot use (the local cluster's are fake)
    # raises inside the trial.
    study = write_study(tiny_study("faulty", grid={"train.device": ["cpu", "cuda"]},
                                   base={"resources": {"gpus": 1}}, **SLURM))
    submit(study, tmp_path)
    run_dir = tmp_path / "faulty"
    store = RunStore(run_dir)
    ok, bad = sorted(store.trial_ids(), key=lambda t: store.trial(t).read_trial().config.train.device)

    finished = wait_done(run_dir)

    assert finished[ok]["status"] == "done"
    assert finished[bad]["status"] == "failed"
    assert "Traceback" in finished[bad]["error"] and "torch sees no GPU" in finished[bad]["error"]
    assert "torch sees no GPU" in Path(finished[bad]["log"]).read_text()
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "torch sees no GPU" in shown and f"log: {finished[bad]['log']}" in shown

    # Without --retry-failed nothing is submitted; with it only the failed trial is.
    assert main(["run", str(study), "--executor", "slurm", "--out", str(tmp_path)]) == 1
    assert states(run_dir) == finished
    submit(study, tmp_path, "--retry-failed")
    retried = wait_done(run_dir)
    assert retried[ok] == finished[ok]
    assert retried[bad]["job_id"] != finished[bad]["job_id"]
    assert (retried[bad]["status"], retried[bad]["attempts"]) == ("failed", 2)


@pytest.mark.slurm
@pytest.mark.train
def test_a_preempted_trial_is_requeued_and_resumes_from_its_checkpoint(cluster, write_study, tmp_path):
    study = write_study(tiny_study("preempt", grid={"loss.kind": ["sigmoid"]}, base=LONG, **SLURM))
    submit(study, tmp_path)
    run_dir = tmp_path / "preempt"
    job = wait_training(run_dir)["job_id"]

    # submitit's preemption signal, as Slurm sends it before a preemption or the time limit.
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    (finished,) = wait_done(run_dir).values()

    assert (finished["status"], finished["attempts"], finished["job_id"]) == ("done", 2, job)
    log = Path(finished["log"]).read_text()
    assert "Requeued job" in log
    resumed_at = int(re.search(r"attempt 2 \(last recorded step (\d+)\)", log).group(1))
    assert 0 < resumed_at < 200
    (tid,) = states(run_dir)
    assert RunStore(run_dir).trial(tid).metrics()["step"].to_list() == list(range(1, 201))


@pytest.mark.slurm
@pytest.mark.train
def test_cancel_stops_a_running_trial_at_a_checkpoint_and_run_leaves_it_cancelled(
    cluster, write_study, tmp_path, capsys
):
    study = write_study(tiny_study("cancel", grid={"loss.kind": ["sigmoid"]}, base=LONG, **SLURM))
    submit(study, tmp_path)
    run_dir = tmp_path / "cancel"
    job = wait_training(run_dir)["job_id"]

    assert main(["cancel", str(run_dir)]) == 0

    assert "cancelled 1 trials" in capsys.readouterr().out
    queue = subprocess.run(["squeue", "-h", "-j", job.split("_")[0]], capture_output=True,
                           text=True, timeout=30)
    assert queue.stdout.strip() == ""
    ((tid, state),) = states(run_dir).items()
    assert state["status"] == "failed"
    assert re.search(r"cancelled .* --retry-failed` resumes it from its checkpoint at step \d+",
                     state["error"])
    assert RunStore(run_dir).trial(tid).checkpoint_path.is_file()
    assert main(["run", str(study), "--executor", "slurm", "--out", str(tmp_path)]) == 1
    assert states(run_dir)[tid]["job_id"] == job  # not resubmitted without --retry-failed


@pytest.mark.slurm
@pytest.mark.train
def test_a_gpu_trial_runs_on_the_fake_gpu_node_with_cuda_visible_devices_and_trains_on_cpu(
    cluster, write_study, tmp_path
):
    study = write_study(tiny_study("gpu", grid={"loss.kind": ["sigmoid"]},
                                   base={"resources": {"gpus": 1}}, **SLURM))
    submit(study, tmp_path)

    (finished,) = wait_done(tmp_path / "gpu").values()

    assert finished["status"] == "done"  # train.device=auto: torch sees no CUDA without a driver
    assert "CUDA_VISIBLE_DEVICES=0" in Path(finished["log"]).read_text()
    assert "#SBATCH --gpus-per-node=1" in Path(finished["sbatch_script"]).read_text()


@pytest.mark.slurm
@pytest.mark.train
def test_a_two_rank_trial_runs_as_two_slurm_tasks_and_matches_its_single_process_twin(
    cluster, write_study, tmp_path
):
    from scalestudy.train.loop import run_trial

    base = {"train": {"examples_seen": 32 * 12, "checkpoint_every": 6, "eval_every": 6},
            "resources": {"cpus": 2, "workers": 2}}
    study = write_study(tiny_study("ranks", grid={"loss.kind": ["sigmoid"]}, base=base, **SLURM))
    submit(study, tmp_path)
    run_dir = tmp_path / "ranks"
    ((tid, finished),) = wait_done(run_dir).items()
    (trial,) = expand(load_study(study))
    resources = trial.config.resources.model_copy(update={"workers": 1})
    twin = RunStore(tmp_path / "twin").add_trial(trial.model_copy(
        update={"config": trial.config.model_copy(update={"resources": resources})}))
    run_trial(str(twin.path))

    assert "#SBATCH --ntasks-per-node=2" in Path(finished["sbatch_script"]).read_text()
    for rank in (0, 1):
        log = Path(finished["log"].replace("_0_log.out", f"_{rank}_log.out")).read_text()
        assert f"rank {rank}/2" in log
    # Only rank 0 writes the store: one attempt, not one per rank.
    assert (finished["status"], finished["attempts"]) == ("done", 1)
    ranks, single = RunStore(run_dir).trial(tid).metrics(), twin.metrics()
    assert ranks["step"].to_list() == single["step"].to_list() == list(range(1, 13))
    assert ranks["loss"].to_numpy() == pytest.approx(single["loss"].to_numpy(), rel=1e-4)
