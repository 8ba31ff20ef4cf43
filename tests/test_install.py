"""A plain `pip install scalestudy` (no extras) into a fresh virtual environment runs the whole local
workflow, and what needs an extra says which one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_study

ROOT = Path(__file__).resolve().parent.parent
# What the package build reads: the sources, the metadata and the readme it names.
SOURCES = ("pyproject.toml", "README.md", "scalestudy", "studies")


def sh(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 600
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.train
@pytest.mark.timeout(1200)  # two pip installs (from a local index and cache when there is one)
def test_a_fresh_environment_without_extras_runs_the_local_workflow_and_names_missing_extras(tmp_path):
    # Issue 15: `pip install scalestudy` alone gives validate, plan, run (local), status and report,
    # runs the quickstart study, and a command that needs a missing extra names it.
    source = tmp_path / "source"  # a copy, so the build's egg-info and build/ stay out of the checkout
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [
        n for n in names if Path(folder) == ROOT and n not in SOURCES or n == "__pycache__"])
    venv = tmp_path / "venv"
    # The environment of this test process minus what would import the checkout instead of the
    # installed package.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    assert sh([sys.executable, "-m", "venv", venv], tmp_path, env).returncode == 0
    python, scalestudy = venv / "bin" / "python", venv / "bin" / "scalestudy"
    # torch first, the build this machine runs (pip would otherwise pick one for the hardware).
    installed = sh([python, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
                   tmp_path, env)
    assert installed.returncode == 0, installed.stderr
    installed = sh([python, "-m", "pip", "install", "-q", source], tmp_path, env)
    assert installed.returncode == 0, installed.stderr

    code = ("import importlib.util as u, scalestudy; print(scalestudy.__file__); "
            "print([m for m in ('ray', 'submitit', 'tensorboard', 'wandb', 'mlflow') if u.find_spec(m)])")
    probe = sh([python, "-c", code], tmp_path, env)
    where, optional = probe.stdout.splitlines()
    assert Path(where).is_relative_to(venv) and optional == "[]"

    study = tiny_study(base={"monitor": {"sinks": ["tensorboard", "wandb", "mlflow"]}})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    for command in (["validate", "study.yaml"], ["plan", "study.yaml"],
                    ["run", "study.yaml", "--out", "runs"], ["status", "runs/tiny"],
                    ["report", "runs/tiny"]):
        done = sh([scalestudy, *command], tmp_path, env)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
    assert (tmp_path / "runs" / "tiny" / "report" / "index.html").stat().st_size > 0
    # Each tracker's package is really missing here: one warning per tracker, each naming its extra.
    logs = sorted((tmp_path / "runs" / "tiny" / "trials").glob("*/log.txt"))
    assert len(logs) == 2  # one per trial: the check below must see every trial's warnings
    for log in logs:
        warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
        assert [w.split("pip install ")[1].split(")")[0] for w in warnings] == \
            ["'scalestudy[tensorboard]'", "'scalestudy[wandb]'", "'scalestudy[mlflow]'"]

    # The quickstart study itself, shrunk by --set to a smoke test, on the local executor.
    quickstart = sh([scalestudy, "run", source / "studies" / "quickstart.yaml", "--out", "runs",
                     "--set", "train.examples_seen=256", "--set", "sweep.grid.train.batch_size=[32,64]",
                     "--set", "data.eval_images=64"], tmp_path, env)
    assert quickstart.returncode == 0, (quickstart.stdout, quickstart.stderr)
    assert "4 trials" in quickstart.stdout

    for executor in ("ray", "slurm"):
        refused = sh([scalestudy, "run", "study.yaml", "--out", "runs", "--executor", executor],
                     tmp_path, env)
        assert refused.returncode == 2
        assert f"pip install 'scalestudy[{executor}]'" in refused.stderr
