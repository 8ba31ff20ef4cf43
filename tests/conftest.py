"""Shared fixtures: tiny studies that train for real in a second or two; and the guard that keeps
the markers honest.

`make test-fast` runs every test not marked train, ray, slurm or browser, so a test that trains
or submits to Slurm without its marker would make the fast subset slow, or dependent on a cluster,
without anyone noticing. The guard stops such a test at the door, naming the marker it needs:
while a test runs (its fixtures included) that lacks `train`, the training loop
(`scalestudy.train.loop.train`, behind run_trial, `python -m scalestudy.trial` in-process and
every data-parallel rank) and starting a trial process (`python -m scalestudy.trial`, `scalestudy
run`) raise; one that lacks `slurm` may not call `sbatch`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import scalestudy.train.loop as loop

CHECKOUT = Path(__file__).resolve().parents[1]


def checkout_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, for a subprocess that must import
    this scalestudy whether or not it is installed."""
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# A model and budget small enough that a trial trains in about a second on one CPU core.
TINY_BASE: dict[str, Any] = {
    "data": {"image_size": 16, "eval_images": 64},
    "model": {"patch_size": 8, "width": 16, "depth": 1, "heads": 2, "embed_dim": 16,
              "context_length": 12, "vocab_size": 512},
    "train": {"examples_seen": 512, "batch_size": 32, "eval_every": 8, "checkpoint_every": 4},
    "resources": {"cpus": 1},
}


def tiny_study(name: str = "tiny", grid: dict[str, list[Any]] | None = None,
               base: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    merged = {section: dict(values) for section, values in TINY_BASE.items()}
    for section, values in (base or {}).items():
        merged.setdefault(section, {}).update(values)
    sweep = {"grid": grid if grid is not None else {"loss.kind": ["softmax", "sigmoid"]}}
    return {"name": name, "base": merged, "sweep": sweep, **top}


@pytest.fixture
def write_study(tmp_path: Path):
    def write(study: dict[str, Any] | str, filename: str = "study.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(study if isinstance(study, str) else yaml.safe_dump(study))
        return path

    return write


# --- the marker guard ----------------------------------------------------------------------------

GUARDED = ("train", "slurm")
# The markers the running test lacks (empty between tests: collection and plain scripts are free).
_lacking: set[str] = set()
_running: list[str] = []


class UnmarkedTest(RuntimeError):
    """A test did what only a test with a marker may do."""


def _refuse(marker: str, what: str) -> None:
    if marker in _lacking:
        raise UnmarkedTest(
            f"{_running[-1]} {what} but is not marked `{marker}`: add @pytest.mark.{marker} (or "
            f"`pytestmark = pytest.mark.{marker}` for a whole module) so `make test-fast` leaves it "
            "out (pyproject.toml [tool.pytest.ini_options] markers)"
        )


def _words(argv: Any) -> list[str]:
    if isinstance(argv, (str, bytes, os.PathLike)):
        argv = [argv]
    return [os.fsdecode(a) for a in argv or ()]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Sees every subprocess.Popen, in this process and every thread (sys.addaudithook)."""
    if event != "subprocess.Popen" or not _lacking:
        return
    words = _words(args[1])
    program = os.path.basename(words[0]) if words else ""
    if "scalestudy.trial" in words or (
            ("scalestudy.cli" in words or program == "scalestudy") and "run" in words):
        _refuse("train", f"starts a trial process ({' '.join(words[:4])} …)")
    if program == "sbatch":
        _refuse("slurm", "submits to Slurm (sbatch)")


sys.addaudithook(_audit)

_train = loop.train


def _guarded_train(*args: Any, **kwargs: Any) -> Any:
    _refuse("train", "runs the training loop (run_trial or scalestudy.train.loop.train)")
    return _train(*args, **kwargs)


# run_trial and _train look `train` up in the module when they call it, so this wrapper is what
# every in-process trial runs.
loop.train = _guarded_train


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    # Around setup, call and teardown: a module-scoped fixture that trains is set up inside the
    # first test that uses it, and is judged by that test's markers.
    _lacking.update(m for m in GUARDED if item.get_closest_marker(m) is None)
    _running.append(item.nodeid)
    try:
        yield
    finally:
        _lacking.clear()
        _running.pop()
