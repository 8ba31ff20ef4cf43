"""The study files shipped in studies/ are what the README says they are: each loads and expands to
distinct trials, and each canonical study's README heading states its trial count."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scalestudy.expand import expand
from scalestudy.load import load_study

ROOT = Path(__file__).parents[1]
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_each_shipped_study_loads_and_expands_to_distinct_trials(path):
    trials = expand(load_study(path))
    assert trials and len({t.trial_id for t in trials}) == len(trials)


def test_the_readme_states_each_canonical_studys_trial_count_as_it_expands():
    headings = re.findall(r"^### .*\(`(\w+)\.yaml`: (\d+) trials", (ROOT / "README.md").read_text(), re.M)
    assert len(headings) >= 5
    for name, count in headings:
        assert len(expand(load_study(ROOT / "studies" / f"{name}.yaml"))) == int(count), name
