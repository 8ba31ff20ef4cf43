"""Formats that are contracts, compared with golden files: the CLI's surface (every command's
--help) and the sbatch script submitit writes for a shipped profile. A deliberate change is
recorded by running `SCALESTUDY_UPDATE_GOLDEN=1 pytest tests/test_golden.py` and committing the
files under tests/golden/ with the change that explains it."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest

from scalestudy.cli import build_parser, main

GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ("validate", "plan", "run", "status", "cancel", "report", "dashboard")


def matches_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SCALESTUDY_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with SCALESTUDY_UPDATE_GOLDEN=1 to record it"
    assert text == path.read_text(), (
        f"{name} differs from {path}; if the change is deliberate, record it with "
        "SCALESTUDY_UPDATE_GOLDEN=1 and commit it")


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_the_cli_surface_is_the_recorded_one(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps help to the terminal width
    text = "".join(f"$ scalestudy {' '.join(argv) or ''} --help\n{help_text(argv)}\n"
                   for argv in [[]] + [[c] for c in COMMANDS])
    matches_golden("cli_help.txt", text)


@pytest.mark.parametrize(("profile", "resources"), [
    ("local", {"cpus": 2}),
    ("gpu-a100", {"cpus": 64, "gpus": 16}),
])
def test_the_sbatch_script_of_a_shipped_profile_is_the_recorded_one(profile, resources, monkeypatch):
    from submitit.slurm.slurm import _make_sbatch_string

    from scalestudy import allocator
    from scalestudy.executors.slurm import job_parameters

    # As on a Debian machine with libtcmalloc-minimal4, whatever this one has installed.
    monkeypatch.setattr(allocator, "find", lambda name, environ: Path(
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4") if name == "tcmalloc" else None)
    from scalestudy.load import read_slurm_profile
    from scalestudy.spec import ResourcesSpec, SlurmExecutorSpec

    settings = SlurmExecutorSpec.model_validate({**read_slurm_profile(profile), "profile": profile})
    parameters = job_parameters(ResourcesSpec.model_validate(resources), settings)
    script = _make_sbatch_string(command="python -u -m submitit.core._submit /RUN/slurm",
                                 folder="/RUN/slurm", job_name="scalestudy-study", **parameters)
    matches_golden(f"sbatch_{profile}.sh", script)


def test_main_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "validate" in capsys.readouterr().out
