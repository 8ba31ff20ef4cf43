"""The Ray executor on a real Ray: a private one, and a running cluster joined by address.

The joined cluster is one `ray start --head --block` per module, on free ports, with a private
temp dir and a random auth token (Ray's servers listen on every interface, so the token keeps the
test cluster ours). It is stopped by its own process group and descendants: never `ray stop`,
which would stop every Ray cluster of the user on the machine.
Where `unshare` works, the head runs in a private mount namespace with an empty tmpfs over one
directory: a real stand-in for a run directory that is not on storage the workers share.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

from scalestudy.cli import main
from scalestudy.errors import SpecError
from scalestudy.executors.ray import TrialKilled, settled_state, unfit_trials
from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.store import RunStore
from tests.conftest import tiny_study
from tests.test_run import state_of, wait_for

RAY = Path(sys.executable).with_name("ray")
HEAD_START_S = 90.0
RUN_S = 180.0  # deadline of one `scalestudy run` (the machine is shared and slow)
# Long enough to interrupt mid-way (a few seconds), with a checkpoint every 5 steps to resume from.
STEPS = 120
LONG = {"train": {"examples_seen": 32 * STEPS, "batch_size": 32, "checkpoint_every": 5,
                  "eval_every": 60}}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (Ray workers leave the head's process group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def can_hide_a_directory() -> bool:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


@dataclass
class RayHead:
    address: str
    env: dict[str, str]  # what a driver needs to join: the auth mode and token
    temp_dir: Path
    hidden: Path | None  # the driver sees this directory; the cluster's workers see it empty

    def joined_by(self, driver_pid: int) -> bool:
        """Whether the driver with this pid connected to this cluster (Ray logs every driver)."""
        logs = self.temp_dir / "session_latest" / "logs"
        return any(logs.glob(f"python-core-driver-*_{driver_pid}.log"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    # Short temp dir: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp"))
    hidden = tmp_path_factory.mktemp("not-shared") if can_hide_a_directory() else None
    port, client_port, dashboard_port = free_ports(3)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # --num-gpus=1: a GPU Ray only counts (the machine need not have one); trials that ask for
    # GPU shares are scheduled onto it, see CUDA_VISIBLE_DEVICES=0 and train on the CPU.
    command = [str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
               "--num-cpus=2", "--num-gpus=1", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", f"--ray-client-server-port={client_port}",
               f"--dashboard-port={dashboard_port}", "--block"]
    if hidden is not None:
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden), *command]
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        # SIGINT ignored, as in a cluster started by a script (`nohup ray start --head &`): every
        # worker inherits it, and Ray's cancel must still reach the trials (the Ctrl-C test).
        head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: head.poll() is not None or b"Ray runtime started" in log_path.read_bytes(),
                 HEAD_START_S, "ray start --head")
        assert head.poll() is None, f"ray start failed:\n{log_path.read_text()}"
        yield RayHead(f"127.0.0.1:{port}", env, temp_dir, hidden)
    finally:
        pids = descendants(head.pid)
        os.killpg(head.pid, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def scalestudy(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    # SIGINT back to its default: a shell without job control starts background jobs with it
    # ignored, and Python keeps it ignored, so the Ctrl-C test would test nothing.
    return subprocess.Popen([sys.executable, "-m", "scalestudy.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(driver: subprocess.Popen[str], timeout: float = RUN_S) -> tuple[int, str]:
    try:
        output, _ = driver.communicate(timeout=timeout)
    finally:
        driver.kill()
    return driver.returncode, output


def write(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study))
    return path


def trial_ids_by(path: Path, key: str) -> dict:
    """trial id of each value of the swept `key` (e.g. seed → id)."""
    section, _, name = key.partition(".")
    return {getattr(getattr(t.config, section), name): t.trial_id for t in expand(load_study(path))}


def worker_of(trial_dir: Path) -> int:
    """The Ray worker running the trial: the parent of the trial's process."""
    pid = state_of(trial_dir)["pid"]
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert Path(f"/proc/{ppid}/cmdline").read_bytes().startswith(b"ray::"), "not a Ray worker"
    return ppid


def running_at(trial_dir: Path, attempt: int, step: int) -> bool:
    state = state_of(trial_dir)
    return (state.get("status") == "running" and state.get("attempts") == attempt
            and state.get("step", 0) >= step)


def steps_of(store: RunStore, trial_id: str) -> list[int]:
    return store.trial(trial_id).metrics()["step"].to_list()


# --- without Ray: what a finished task means for state.json ----------------------------------


def test_a_trial_that_recorded_its_own_end_keeps_it():
    assert settled_state(0, "done", max_retries=2) is None
    assert settled_state(1, "failed", max_retries=2) is None


def test_a_trial_process_that_could_not_record_its_failure_is_failed_with_a_pointer_to_its_log():
    fields = settled_state(1, "running", max_retries=2)
    assert fields is not None and fields["status"] == "failed" and "log.txt" in fields["error"]


def test_a_cancelled_trial_is_preempted_if_it_was_running_and_stays_pending_if_it_never_started():
    from ray.exceptions import TaskCancelledError

    assert settled_state(TaskCancelledError(), "running", 2)["status"] == "preempted"
    assert settled_state(TaskCancelledError(), "pending", 2) is None


def test_a_trial_killed_on_every_attempt_is_failed_naming_the_kill_and_the_retry_budget():
    from ray.exceptions import RayTaskError

    killed = RayTaskError("run_trial_process", "traceback", TrialKilled("stopped by SIGKILL"))
    fields = settled_state(killed, "running", max_retries=1)
    assert fields["status"] == "failed"
    assert "SIGKILL" in fields["error"] and "max_retries=1" in fields["error"]


def test_a_trial_no_node_can_hold_is_named_before_anything_runs(write_study):
    trials = expand(load_study(write_study(tiny_study(base={"resources": {"cpus": 4}}))))
    nodes = [{"Resources": {"CPU": 2.0}}]
    assert [line.split()[1] for line in unfit_trials(trials, nodes)] == [t.trial_id for t in trials]
    assert unfit_trials(trials, [{"Resources": {"CPU": 8.0, "GPU": 1.0}}]) == []


def test_a_gpu_share_fits_a_node_with_a_gpu_and_no_node_without_one(write_study):
    trials = expand(load_study(write_study(tiny_study(base={"resources": {"gpus": 0.25}}))))
    assert unfit_trials(trials, [{"Resources": {"CPU": 8.0, "GPU": 1.0}}]) == []
    assert "resources.gpus=0.25" in unfit_trials(trials, [{"Resources": {"CPU": 8.0}}])[0]


@pytest.mark.parametrize("address", ["ray://10.0.0.5:10001", "10.0.0.5", "head node:6379"])
def test_an_address_that_is_not_local_auto_or_host_port_is_rejected_naming_the_key(
    write_study, address
):
    with pytest.raises(SpecError, match="executor.ray.address=.*HOST:PORT"):
        load_study(write_study(tiny_study()), [f"executor.ray.address={address}"])


def test_sizing_the_ray_of_a_joined_cluster_is_rejected(write_study):
    with pytest.raises(SpecError, match="executor.ray.num_cpus=4 only sizes a private Ray"):
        load_study(write_study(tiny_study()),
                   ["executor.ray.address=10.0.0.5:6379", "executor.ray.num_cpus=4"])


def test_address_without_the_ray_executor_is_a_usage_error(write_study, capsys):
    assert main(["run", str(write_study(tiny_study())), "--address", "127.0.0.1:6379"]) == 2
    assert "--executor ray" in capsys.readouterr().err


def test_joining_by_address_without_an_auth_mode_says_how_to_set_it(write_study, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    path = write_study(tiny_study())
    assert main(["run", str(path), "--executor", "ray", "--address", "127.0.0.1:9",
                 "--out", str(tmp_path)]) == 2
    assert "RAY_AUTH_MODE=token" in capsys.readouterr().err


# --- on a real Ray ----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.train
def test_a_study_on_a_private_ray_matches_the_local_executor(tmp_path):
    path = write(tmp_path / "study.yaml", tiny_study())
    assert main(["run", str(path), "--out", str(tmp_path / "local")]) == 0
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    code, output = finish(scalestudy(["run", str(path), "--executor", "ray", "--out",
                                      str(tmp_path / "ray")], env))
    assert code == 0, output
    local, on_ray = RunStore(tmp_path / "local" / "tiny"), RunStore(tmp_path / "ray" / "tiny")
    assert on_ray.trial_ids() == local.trial_ids() and len(on_ray.trial_ids()) == 2
    for tid in local.trial_ids():
        assert on_ray.trial(tid).state().status == "done"
        assert on_ray.trial(tid).state().backend == "ray"
        # Time and memory are the machine's, not the trial's.
        machine = ("step_time_s", "device_step_time_s", "peak_memory_gib")
        assert_frame_equal(on_ray.trial(tid).metrics().drop(machine),
                           local.trial(tid).metrics().drop(machine), rel_tol=1e-5)
        assert_frame_equal(on_ray.trial(tid).evals(), local.trial(tid).evals(), rel_tol=1e-5)
    assert pl.read_parquet(on_ray.results_path)["status"].to_list() == ["done", "done"]
    for tid in on_ray.trial_ids():  # a CPU trial sees no GPU, whatever its Ray worker sees
        assert on_ray.trial(tid).log_path.read_text().startswith("scalestudy: ray trial process")
        assert on_ray.trial(tid).log_path.read_text().splitlines()[0].endswith(
            "OMP_NUM_THREADS=1, CUDA_VISIBLE_DEVICES=")


@pytest.mark.ray
@pytest.mark.train
def test_a_two_worker_trial_on_ray_matches_its_single_process_twin(ray_head, tmp_path):
    # The trial's Ray task holds both CPUs and runs its two gloo ranks on that node.
    base = {"train": {"examples_seen": 32 * 8, "batch_size": 32, "checkpoint_every": 4,
                      "eval_every": 4}, "resources": {"cpus": 2}}
    path = write(tmp_path / "study.yaml", tiny_study(grid={"loss.kind": ["sigmoid"]}, base=base))
    assert main(["run", str(path), "--out", str(tmp_path / "local")]) == 0
    code, output = finish(scalestudy(["run", str(path), "--executor", "ray", "--address",
                                      ray_head.address, "--out", str(tmp_path / "ray"),
                                      "--set", "resources.workers=2"], ray_head.env))
    assert code == 0, output
    single, on_ray = RunStore(tmp_path / "local" / "tiny"), RunStore(tmp_path / "ray" / "tiny")
    assert on_ray.trial_ids() == single.trial_ids()  # resources are not part of the identity
    tid = single.trial_ids()[0]
    assert on_ray.trial(tid).read_trial().config.resources.world_size == 2
    assert on_ray.trial(tid).state().status == "done"
    columns = ["step", "loss", "grad_norm", "temperature", "bias", "param_norm"]
    assert_frame_equal(on_ray.trial(tid).metrics().select(columns),
                       single.trial(tid).metrics().select(columns), rel_tol=1e-4, abs_tol=1e-6)
    assert on_ray.trial(tid).evals()["step"].to_list() == [4, 8]


@pytest.mark.ray
@pytest.mark.train
def test_two_half_gpu_trials_share_the_clusters_one_gpu_at_the_same_time(ray_head, tmp_path):
    study = tiny_study("halves", base={**LONG, "resources": {"cpus": 1, "gpus": 0.5}})
    path = write(tmp_path / "study.yaml", study)

    code, output = finish(scalestudy(["run", str(path), "--executor", "ray", "--address",
                                      ray_head.address, "--out", str(tmp_path)], ray_head.env))

    assert code == 0, output
    store = RunStore(tmp_path / "halves")
    first, second = (store.trial(tid).state() for tid in store.trial_ids())
    assert (first.status, second.status) == ("done", "done")
    # One GPU, two trials of half of it: they ran at once, not one after the other.
    assert first.started_at < second.finished_at and second.started_at < first.finished_at
    for tid in store.trial_ids():
        assert store.trial(tid).log_path.read_text().splitlines()[0].endswith(
            "OMP_NUM_THREADS=1, CUDA_VISIBLE_DEVICES=0")


@pytest.mark.ray
@pytest.mark.train
def test_a_joined_cluster_fails_a_raising_trial_alone_and_retries_a_dead_worker_within_bounds(
    ray_head, tmp_path
):
    study = tiny_study(grid={"train.seed": [0, 1, 2]}, base=LONG,
                       executor={"ray": {"max_retries": 1}})
    path = write(tmp_path / "study.yaml", study)
    ids = trial_ids_by(path, "train.seed")
    store = RunStore(tmp_path / "tiny")
    # Seed 0 raises: its checkpoint is garbage, so loading it fails inside the trial.
    for trial in expand(load_study(path)):
        store.add_trial(trial)
    store.trial(ids[0]).checkpoint_path.write_bytes(b"not a checkpoint")
    seed1, seed2 = (store.trial(ids[s]).path for s in (1, 2))

    driver = scalestudy(["run", str(path), "--executor", "ray", "--address", ray_head.address,
                         "--out", str(tmp_path)], ray_head.env)
    try:
        wait_for(lambda: running_at(seed1, 1, 10), RUN_S, "seed 1 at step 10")
        os.kill(worker_of(seed1), signal.SIGKILL)  # once: retried, resumes
        wait_for(lambda: running_at(seed2, 1, 10), RUN_S, "seed 2 at step 10")
        os.kill(worker_of(seed2), signal.SIGKILL)  # twice: past max_retries=1
        wait_for(lambda: running_at(seed2, 2, 1), RUN_S, "seed 2's retry")
        os.kill(worker_of(seed2), signal.SIGKILL)
    finally:
        code, output = finish(driver)
    assert code == 1, output
    assert ray_head.joined_by(driver.pid), "the driver started its own Ray instead of joining"

    raised, retried, given_up = (store.trial(ids[s]).state().model_dump() for s in (0, 1, 2))
    assert raised["status"] == "failed" and raised["attempts"] == 1
    assert "Traceback" in raised["error"]
    assert retried["status"] == "done" and retried["attempts"] == 2
    assert steps_of(store, ids[1]) == list(range(1, STEPS + 1))
    assert given_up["status"] == "failed" and given_up["attempts"] == 2
    assert "Ray worker died" in given_up["error"] and "max_retries=1" in given_up["error"]


@pytest.mark.ray
@pytest.mark.train
def test_a_study_stopped_by_ctrl_c_and_then_by_a_dead_driver_resumes_to_the_same_end(
    ray_head, tmp_path
):
    # Trials of 16× LONG's steps (about 15 s) are still running when the cancel reaches them;
    # sparser checkpoints and evaluations than LONG's keep the rest of the test short.
    steps = 16 * STEPS
    longer = {"train": {**LONG["train"], "examples_seen": 32 * steps, "checkpoint_every": 40,
                        "eval_every": steps // 4}}
    path = write(tmp_path / "study.yaml",
                 tiny_study(grid={"train.seed": [0, 1, 2]}, base=longer))
    ids = trial_ids_by(path, "train.seed")
    run = ["run", str(path), "--executor", "ray", "--address", ray_head.address,
           "--out", str(tmp_path)]
    trials = tmp_path / "tiny" / "trials"
    driver = scalestudy(run, ray_head.env)
    try:
        # Two 1-CPU trials fill the 2-CPU cluster; the third waits in Ray's queue.
        wait_for(lambda: sum(running_at(trials / t, 1, 10) for t in ids.values()) == 2, RUN_S,
                 "two trials at step 10")
        driver.send_signal(signal.SIGINT)
    finally:
        code, output = finish(driver, timeout=90)
    assert code == 130, output
    status = {seed: state_of(trials / t).get("status", "pending") for seed, t in ids.items()}
    assert sorted(status.values()) == ["pending", "preempted", "preempted"]

    (queued,) = (trials / ids[seed] for seed, s in status.items() if s == "pending")
    driver = scalestudy(run, ray_head.env)
    try:
        wait_for(lambda: running_at(queued, 1, 45), RUN_S, "the queued trial past its first checkpoint")
    finally:
        driver.kill()  # the driver dies: Ray ends its job's tasks with it
        driver.wait(timeout=30)

    code, output = finish(scalestudy(run, ray_head.env))
    assert code == 0, output
    store = RunStore(tmp_path / "tiny")
    for tid in ids.values():
        assert store.trial(tid).state().status == "done"
        assert steps_of(store, tid) == list(range(1, steps + 1))
    assert state_of(queued)["attempts"] == 2


@pytest.mark.ray
@pytest.mark.train  # `scalestudy run` in a subprocess: it would train, were the check to miss
def test_a_run_directory_the_workers_cannot_see_fails_before_any_trial_starts(ray_head):
    if ray_head.hidden is None:
        pytest.skip("unshare --mount is not permitted here, so no directory can be hidden from Ray")
    path = write(ray_head.hidden / "study.yaml", tiny_study())
    code, output = finish(scalestudy(["run", str(path), "--executor", "ray", "--address",
                                      ray_head.address, "--out", str(ray_head.hidden)],
                                     ray_head.env))
    assert code == 2, output
    assert f"cannot see the run directory {ray_head.hidden / 'tiny'}" in output
    assert "same path" in output
    assert not list((ray_head.hidden / "tiny" / "trials").glob("*/state.json"))


def test_the_documented_cluster_config_is_valid_for_rays_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster/ray/cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert any("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"])
