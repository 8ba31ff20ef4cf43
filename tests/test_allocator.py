"""resources.allocator: which malloc a trial process runs on, and that it changes no value."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from scalestudy import allocator
from scalestudy.cli import main
from scalestudy.executors.process import trial_env
from scalestudy.store import RunStore
from tests.conftest import tiny_study

SYSTEM_TCMALLOC = allocator.find("tcmalloc", {})


@pytest.fixture
def libraries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A library directory of our own, the only place the allocators are looked for."""
    monkeypatch.setattr(allocator, "search_dirs", lambda environ: [tmp_path])

    def install(*names: str) -> dict[str, Path]:
        paths = {}
        for name in names:
            paths[name] = tmp_path / allocator.LIBRARIES[name][0]
            paths[name].write_bytes(b"")
        return paths

    return install


def test_auto_prefers_tcmalloc_then_jemalloc_then_the_system_malloc(libraries):
    assert allocator.resolve("auto", {}) == ("system", None)
    paths = libraries("jemalloc")
    assert allocator.resolve("auto", {}) == ("jemalloc", paths["jemalloc"])
    paths = libraries("tcmalloc", "jemalloc")
    assert allocator.resolve("auto", {}) == ("tcmalloc", paths["tcmalloc"])
    assert allocator.resolve("jemalloc", {}) == ("jemalloc", paths["jemalloc"])
    assert allocator.resolve("system", {}) == ("system", None)


def test_a_named_allocator_that_is_not_installed_says_how_to_install_it(libraries):
    libraries("tcmalloc")
    with pytest.raises(ValueError, match=r"none of libjemalloc.so.2 is in .*apt install libjemalloc2"):
        allocator.resolve("jemalloc", {})


def test_the_trial_process_preloads_its_allocator_in_place_of_any_other(libraries):
    paths = libraries("tcmalloc", "jemalloc")
    parent = {"PATH": "/usr/bin", "LD_PRELOAD": f"/opt/libfoo.so {paths['jemalloc']}"}

    tcmalloc = trial_env(parent, 1, None, "tcmalloc")
    system = trial_env(parent, 1, None, "system")

    assert tcmalloc["LD_PRELOAD"] == f"{paths['tcmalloc']}:/opt/libfoo.so"
    assert system["LD_PRELOAD"] == "/opt/libfoo.so"  # other preloads stay; no allocator does
    assert "LD_PRELOAD" not in trial_env({"LD_PRELOAD": str(paths["tcmalloc"])}, 1, None, "system")
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in tcmalloc  # no line per allocation > 1 GiB
    assert parent["LD_PRELOAD"] == f"/opt/libfoo.so {paths['jemalloc']}"  # the parent's untouched


def test_a_slurm_job_script_preloads_the_allocator_only_if_the_node_has_it(libraries):
    paths = libraries("tcmalloc")
    line = allocator.setup_line("auto", {})
    assert line is not None and line.startswith(f"[ -f {paths['tcmalloc']} ] && export LD_PRELOAD=")
    assert allocator.setup_line("system", {}) is None


def test_plan_refuses_an_allocator_this_machine_lacks_before_anything_runs(libraries, write_study,
                                                                          capsys):
    path = write_study(tiny_study(base={"resources": {"allocator": "jemalloc"}}))

    assert main(["plan", str(path)]) == 2

    assert "base.resources.allocator: jemalloc: none of libjemalloc.so.2" in capsys.readouterr().err


def require_tcmalloc() -> Path:
    if SYSTEM_TCMALLOC is not None:
        return SYSTEM_TCMALLOC
    message = "no tcmalloc on this machine: apt-get install libtcmalloc-minimal4"
    if os.environ.get("CI"):
        pytest.fail(f"the allocator test must run in CI: {message}")
    pytest.skip(message)


@pytest.mark.train
def test_a_trial_under_tcmalloc_records_it_and_trains_bit_for_bit_as_under_the_system_malloc(
        write_study, tmp_path):
    library = require_tcmalloc()
    study = write_study(tiny_study(grid={"loss.kind": ["sigmoid"]}))
    runs = {}
    for choice in ("system", "tcmalloc"):
        assert main(["run", str(study), "--out", str(tmp_path / choice),
                     "--set", f"resources.allocator={choice}"]) == 0
        store = RunStore(tmp_path / choice / "tiny")
        [trial_id] = store.trial_ids()
        runs[choice] = store.trial(trial_id)

    assert runs["tcmalloc"].state().allocator == "tcmalloc"
    assert runs["system"].state().allocator == "system"
    assert f"LD_PRELOAD={library}" in runs["tcmalloc"].log_path.read_text()
    machine = pl.exclude("step_time_s", "device_step_time_s", "peak_memory_gib")
    assert runs["tcmalloc"].metrics().select(machine).equals(runs["system"].metrics().select(machine))
    assert runs["tcmalloc"].evals().equals(runs["system"].evals())
