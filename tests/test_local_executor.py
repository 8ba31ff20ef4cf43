"""The local executor's GPU pool: which trial gets which GPUs, who waits, and what a trial's
process sees. The pool's rules are tested as bookkeeping; one real study shows the processes."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Self

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalestudy.cli import main
from scalestudy.errors import UsageError
from scalestudy.executors.local import (
    ResourcePool,
    machine_gpus,
    parse_nvidia_smi,
    parse_visible_devices,
    pool_for,
)
from scalestudy.executors.process import trial_env
from scalestudy.expand import expand, trial_id
from scalestudy.load import load_study
from scalestudy.spec import ResourcesSpec, TrialConfig
from scalestudy.store import RunStore
from tests.conftest import tiny_study


def devices_of(placements: list) -> dict[str, tuple[str, ...] | None]:
    return {p.trial_id: p.gpus for p in placements}


# --- resources.gpus ------------------------------------------------------------------------------


def test_a_gpu_share_below_one_is_one_rank_and_whole_gpus_stay_whole_numbers():
    assert ResourcesSpec(gpus=0.25).world_size == 1
    assert ResourcesSpec(gpus=2.0).world_size == 2
    dumped = ResourcesSpec(gpus=2.0).model_dump(mode="json")["gpus"]
    assert dumped == 2 and isinstance(dumped, int)  # study.yaml and sbatch say 2, never 2.0
    assert ResourcesSpec(workers=3).world_size == 3


def test_more_than_one_gpu_must_be_a_whole_number_and_the_message_gives_the_neighbours():
    with pytest.raises(ValueError, match=r"resources.gpus=2.5: above 1 it must be a whole number.*use 2 or 3"):
        ResourcesSpec(gpus=2.5)


def test_a_gpu_share_runs_one_rank_so_cpu_workers_beside_it_are_refused():
    with pytest.raises(ValueError, match=r"resources.gpus=0.5 runs one rank .* resources.workers=2"):
        ResourcesSpec(gpus=0.5, workers=2)


def test_a_share_below_rays_precision_is_refused():
    with pytest.raises(ValueError, match=r"below the smallest GPU share, 0.0001"):
        ResourcesSpec(gpus=0.00004)


def test_gpus_whole_or_shared_do_not_change_a_trials_id():
    ids = {trial_id(TrialConfig(resources={"gpus": gpus})) for gpus in (0, 0.5, 1, 2)}
    assert ids == {trial_id(TrialConfig())}


# --- which GPUs the machine has ------------------------------------------------------------------


def test_cuda_visible_devices_is_read_as_cuda_reads_it():
    assert parse_visible_devices("0,1") == ["0", "1"]
    assert parse_visible_devices(" 2, 5 ") == ["2", "5"]
    assert parse_visible_devices("GPU-8f1c,MIG-77ab") == ["GPU-8f1c", "MIG-77ab"]
    assert parse_visible_devices("") == []
    assert parse_visible_devices("-1") == []
    assert parse_visible_devices("0,-1,2") == ["0"]  # CUDA stops at the first invalid entry


def test_nvidia_smi_lists_each_gpu_by_index_and_a_mig_split_gpu_by_its_instances():
    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1f3e6a44-5b0c-d0f1-2c1e-0e6b4f7a9d11)\n"
        "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f)\n"
        "  MIG 3g.20gb     Device  1: (UUID: MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb)\n"
        "GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-0a1b2c3d-0000-1111-2222-333344445555)\n"
    )
    assert parse_nvidia_smi(listing) == [
        "0", "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", "MIG-cba663e8-9bed-5b25-b243-5985ef7c9beb", "2"]
    assert parse_nvidia_smi("No devices were found\n") == []


def test_the_machines_gpus_are_cuda_visible_devices_when_it_is_set():
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": "4,6"}) == (["4", "6"], "CUDA_VISIBLE_DEVICES='4,6'")
    assert machine_gpus({"CUDA_VISIBLE_DEVICES": ""})[0] == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_a_machine_without_nvidia_smi_has_no_gpus_and_says_why():
    assert machine_gpus({}) == ([], "no nvidia-smi on PATH and CUDA_VISIBLE_DEVICES unset")


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA driver")
def test_nvidia_smi_finds_as_many_gpus_as_torch_sees():
    import torch

    devices, source = machine_gpus({})
    assert source == "nvidia-smi -L"
    assert len(devices) == torch.cuda.device_count()


# --- the pool ------------------------------------------------------------------------------------


def test_whole_gpu_trials_get_gpus_of_their_own_lowest_first_and_the_next_waits_for_one():
    pool = ResourcePool(slots=8, devices=["0", "1", "2"])

    first = pool.admit([("a", 1), ("b", 2), ("c", 1)])

    assert devices_of(first) == {"a": ("0",), "b": ("1", "2")}
    assert pool.admit([("c", 1)]) == []  # every GPU is held: c waits
    pool.release("b")
    assert devices_of(pool.admit([("c", 1)])) == {"c": ("1",)}


def test_gpu_shares_pack_onto_one_gpu_and_leave_the_others_whole():
    pool = ResourcePool(slots=8, devices=["0", "1"])

    placed = devices_of(pool.admit([("a", 0.5), ("b", 0.25), ("c", 0.25), ("d", 1), ("e", 0.5)]))

    # a, b, c fill GPU 0; d takes GPU 1 whole; nothing is left for e.
    assert placed == {"a": ("0",), "b": ("0",), "c": ("0",), "d": ("1",)}
    pool.release("b")
    pool.release("c")
    assert devices_of(pool.admit([("e", 0.5)])) == {"e": ("0",)}


def test_a_share_goes_to_the_fullest_gpu_it_fits_so_a_whole_gpu_stays_free():
    pool = ResourcePool(slots=8, devices=["0", "1"])
    pool.admit([("half", 0.5), ("whole", 1)])  # GPU 0 half held, GPU 1 whole held
    pool.release("whole")

    assert devices_of(pool.admit([("quarter", 0.25)])) == {"quarter": ("0",)}
    assert devices_of(pool.admit([("whole again", 1)])) == {"whole again": ("1",)}


def test_three_thirds_fill_one_gpu_as_on_ray():
    pool = ResourcePool(slots=8, devices=["0"])
    third = 1 / 3
    assert devices_of(pool.admit([("a", third), ("b", third), ("c", third)])) == {
        "a": ("0",), "b": ("0",), "c": ("0",)}
    assert pool.admit([("d", third)]) == []


def test_a_trial_waiting_for_several_gpus_lets_a_smaller_later_one_start():
    pool = ResourcePool(slots=8, devices=["0", "1"])
    pool.admit([("running", 1)])

    placed = devices_of(pool.admit([("needs two", 2), ("needs one", 1), ("cpu", 0)]))

    assert placed == {"needs one": ("1",), "cpu": ()}


def test_the_cpu_slots_bound_how_many_trials_run_whatever_gpus_are_free():
    pool = ResourcePool(slots=2, devices=["0", "1", "2", "3"])
    assert len(pool.admit([(f"t{i}", 1) for i in range(4)])) == 2
    assert len(pool.admit([("cpu", 0)])) == 0


def test_a_cpu_trial_sees_no_gpu_and_a_machine_without_gpus_holds_nothing_back():
    with_gpus = ResourcePool(slots=4, devices=["0"])
    assert devices_of(with_gpus.admit([("cpu", 0)])) == {"cpu": ()}

    without = ResourcePool(slots=4, devices=[])
    placed = devices_of(without.admit([("a", 1), ("b", 2), ("c", 0.5), ("cpu", 0)]))

    assert placed == {"a": None, "b": None, "c": None, "cpu": ()}  # None: no assignment at all


requests = st.lists(st.sampled_from([0, 0.25, 1 / 3, 0.5, 0.75, 1, 2, 3]), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(requests, st.integers(1, 6), st.integers(1, 4), st.randoms(use_true_random=False))
def test_no_gpu_is_ever_overcommitted_and_every_trial_runs_in_the_end(gpus, slots, n_devices, rnd):
    devices = [str(i) for i in range(n_devices)]
    pool = ResourcePool(slots, devices)
    waiting = [(f"t{i}", g) for i, g in enumerate(gpus) if g <= n_devices]
    asked = dict(waiting)
    running: dict[str, tuple[str, ...]] = {}
    ran = []
    while waiting or running:
        for placement in pool.admit(waiting):
            assert placement.gpus is not None
            running[placement.trial_id] = placement.gpus
            ran.append(placement.trial_id)
        waiting = [(tid, g) for tid, g in waiting if tid not in running]
        load = dict.fromkeys(devices, 0.0)
        for tid, held in running.items():
            g = asked[tid]
            assert len(held) == (int(g) if g >= 1 else 1 if g > 0 else 0)
            assert len(set(held)) == len(held)
            for device in held:
                load[device] += min(g, 1)
        assert all(total <= 1 + 1e-9 for total in load.values()), load
        assert running or not waiting, "nothing runs, yet a waiting trial did not start"
        if running:
            ended = rnd.choice(sorted(running))
            del running[ended]
            pool.release(ended)
    assert sorted(ran) == sorted(asked)


def test_a_trial_needing_more_gpus_than_the_machine_has_is_refused_before_anything_starts(
        write_study):
    trials = expand(load_study(write_study(tiny_study(base={"resources": {"gpus": 4}}))))

    with pytest.raises(UsageError, match=r"needs resources.gpus=4; .*needs resources.gpus=4, but "
                       r"this machine has 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES='0,1': 0, 1\)"):
        pool_for(trials, 4, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_gpu_trials_on_a_machine_without_gpus_run_unassigned_after_one_warning(write_study, capsys):
    trials = expand(load_study(write_study(tiny_study(base={"resources": {"gpus": 1}}))))

    pool = pool_for(trials, 4, {"CUDA_VISIBLE_DEVICES": ""})

    warning = capsys.readouterr().err
    assert warning.count("warning:") == 1
    assert "2 trial(s) ask for resources.gpus > 0 but this machine has no GPU" in warning
    assert "train.device=auto trains them on the CPU" in warning
    assert devices_of(pool.admit([(t.trial_id, 1) for t in trials])) == {
        t.trial_id: None for t in trials}


def test_a_cpu_only_study_does_not_look_for_gpus(write_study, capsys):
    trials = expand(load_study(write_study(tiny_study())))
    pool = pool_for(trials, 4, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert pool.devices == () and capsys.readouterr().err == ""


# --- what a trial's process gets -----------------------------------------------------------------


def test_the_trial_process_sees_exactly_its_gpus_and_its_threads():
    parent = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "OMP_NUM_THREADS": "16"}

    # TOKENIZERS_PARALLELISM off: a Hugging Face tokenizer would start a thread per core beside
    # the trial's torch threads.
    assert trial_env(parent, 4, ("2", "3"), "system") == {
        "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "2,3", "OMP_NUM_THREADS": "4",
        "TOKENIZERS_PARALLELISM": "false"}
    assert trial_env(parent, 1, (), "system")["CUDA_VISIBLE_DEVICES"] == ""
    assert trial_env(parent, 1, None, "system")["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "CUDA_VISIBLE_DEVICES" not in trial_env({"PATH": "/usr/bin"}, 1, None, "system")


class TrialProcesses:
    """Watches /proc for the run's trial processes and records the CUDA_VISIBLE_DEVICES each
    started with: what the process itself sees, not what the executor meant to give it."""

    def __init__(self, run_dir: Path) -> None:
        self.marker = str(run_dir).encode()
        self.seen: dict[str, str] = {}  # trial id → CUDA_VISIBLE_DEVICES
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
                try:
                    args = cmdline.read_bytes().split(b"\0")
                    if b"scalestudy.trial" not in args or self.marker not in args[args.index(
                            b"scalestudy.trial") + 1]:
                        continue
                    environ = (cmdline.parent / "environ").read_bytes().split(b"\0")
                except (OSError, IndexError):
                    continue  # ended meanwhile
                trial = Path(args[args.index(b"scalestudy.trial") + 1].decode()).name
                env = dict(e.decode().partition("=")[::2] for e in environ if b"=" in e)
                self.seen.setdefault(trial, env.get("CUDA_VISIBLE_DEVICES", "(unset)"))
            time.sleep(0.02)


@pytest.mark.train
def test_trials_on_fake_gpus_see_their_own_gpu_shares_pack_and_wait_for_a_free_one(
        write_study, tmp_path, monkeypatch):
    # Two GPUs named as CUDA_VISIBLE_DEVICES names them; on a machine without CUDA torch sees
    # none of them, so train.device=auto trains on the CPU and the pool's choices are all we test.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    study = tiny_study("pool", executor={"local": {"max_parallel": 5}})
    study["sweep"] = {"zip": {"train.seed": [0, 1, 2, 3, 4], "resources.gpus": [1, 1, 0.5, 0.5, 0]}}
    path = write_study(study)
    gpus_of = {t.config.train.seed: t.trial_id for t in expand(load_study(path))}
    whole, halves, cpu = [gpus_of[0], gpus_of[1]], [gpus_of[2], gpus_of[3]], gpus_of[4]

    with TrialProcesses(tmp_path / "runs" / "pool") as processes:
        assert main(["run", str(path), "--out", str(tmp_path / "runs")]) == 0

    store = RunStore(tmp_path / "runs" / "pool")
    states = {tid: store.trial(tid).state() for tid in store.trial_ids()}
    assert {s.status for s in states.values()} == {"done"}
    seen = processes.seen
    assert sorted(seen[tid] for tid in whole) == ["4", "6"]
    assert seen[halves[0]] == seen[halves[1]] in ("4", "6")  # both halves on the GPU freed first
    assert seen[cpu] == ""
    # The halves waited: both GPUs were held whole until one of those trials ended.
    first_free = min(states[tid].finished_at for tid in whole)
    assert all(states[tid].started_at > first_free for tid in halves)
    for tid, devices in seen.items():
        header = store.trial(tid).log_path.read_text().splitlines()[0]
        assert header.endswith(f"CUDA_VISIBLE_DEVICES={devices}"), header
