"""The local Slurm cluster from cluster/slurm/slurm-local.sh runs submitit jobs.

Start it with `bash cluster/slurm/slurm-local.sh start`. Without a cluster these tests are skipped,
except when SCALESTUDY_REQUIRE_SLURM=1 (CI): then a missing cluster is a failure, never a silent skip.
Every wait has a deadline, so a cluster fault fails a test instead of hanging the run.
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")
JOB_DEADLINE_S = 60.0
USABLE_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def _why_no_cluster() -> str | None:
    """None when a Slurm cluster answers and has a node that can run jobs; else the reason."""
    if shutil.which("sinfo") is None:
        return "sinfo is not on PATH"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-p", PARTITION, "-o", "%T"], capture_output=True, text=True, timeout=15
        )
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()}"
    states = proc.stdout.split()
    if not USABLE_NODE_STATES.intersection(states):
        return f"partition {PARTITION!r} has no usable node (sinfo states: {states or 'none'})"
    return None


_problem = _why_no_cluster()
if _problem is not None:
    _hint = "start one with: bash cluster/slurm/slurm-local.sh start"
    if os.environ.get("SCALESTUDY_REQUIRE_SLURM") == "1":
        pytest.fail(
            f"SCALESTUDY_REQUIRE_SLURM=1 but there is no usable Slurm cluster ({_problem}); {_hint}",
            pytrace=False,
        )
    pytest.skip(f"no usable Slurm cluster ({_problem}); {_hint}", allow_module_level=True)

import submitit  # noqa: E402  (only once a cluster is known to exist)


def _executor(tmp_path, **parameters) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(
        timeout_min=5, slurm_partition=PARTITION, cpus_per_task=1, **parameters
    )
    return executor


def _wait_until_done(job: submitit.Job) -> None:
    deadline = time.monotonic() + JOB_DEADLINE_S
    while not job.done():
        if time.monotonic() > deadline:
            state = job.get_info(mode="force").get("State", "unknown")
            job.cancel(check=False)
            pytest.fail(
                f"Slurm job {job.job_id} not done within {JOB_DEADLINE_S:.0f} s "
                f"(sacct state: {state}); its stderr: {job.stderr()!r}"
            )
        time.sleep(0.2)


def _result_within_deadline(job: submitit.Job):
    _wait_until_done(job)
    return job.result()


def test_the_local_cluster_accepts_a_submitit_job_and_returns_its_value(tmp_path):
    job = _executor(tmp_path).submit(operator.mul, 6, 7)

    assert _result_within_deadline(job) == 42


def test_a_job_asking_for_one_gpu_sees_cuda_visible_devices(tmp_path):
    job = _executor(tmp_path, gpus_per_node=1).submit(os.getenv, "CUDA_VISIBLE_DEVICES")

    assert _result_within_deadline(job) == "0"


def test_sacct_reports_a_finished_job_as_completed(tmp_path):
    # submitit learns the state of a job that died without a result only from sacct;
    # slurmdbd records the end of a job a moment after its result file appears.
    job = _executor(tmp_path).submit(operator.add, 1, 1)
    _wait_until_done(job)

    deadline = time.monotonic() + JOB_DEADLINE_S
    state = job.get_info(mode="force").get("State")
    while state != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
        state = job.get_info(mode="force").get("State")

    assert state == "COMPLETED"
