"""The dashboard in a real headless Chromium: `scalestudy dashboard` serves a real tiny study, the
page lists the trials, the instability view marks the grad-norm spike and the loss spike the test
put in (circles and triangles, with a legend), and steps the test appends with the trial's own
writer show up without a reload.

Every test starts from its own copy of the finished study and its own dashboard process, so each
one passes alone and in any order.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them). Skipped where they are
missing, except in CI (CI set), where a missing browser fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from scalestudy.cli import main
from scalestudy.store import RunStore
from tests.conftest import tiny_study
from tests.test_dashboard import continue_trial

# The page is served over a study trained for real in a module fixture.
pytestmark = [pytest.mark.browser, pytest.mark.train]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 30  # any one thing the page must show; polls are every 2 s
LIVE_WAIT_S = 15  # a new step must appear within a few polls


def require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
    if os.environ.get("CI"):
        pytest.fail(f"the browser test must run in CI: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real one-trial sigmoid study, finished; trained once for the module, never changed."""
    require_browser()
    base = tmp_path_factory.mktemp("browser")
    study = base / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(name="live", grid={"loss.kind": ["sigmoid"]})))
    assert main(["run", str(study), "--out", str(base / "runs")]) == 0
    return base / "runs" / "live"


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    """This test's own copy of the finished study, which it may extend as if still training."""
    return Path(shutil.copytree(finished_run, tmp_path / "live"))


@pytest.fixture
def dashboard(run_dir: Path) -> Iterator[str]:
    """`scalestudy dashboard RUN_DIR --port 0` as a user runs it; yields the URL it prints."""
    process = subprocess.Popen(
        [sys.executable, "-m", "scalestudy.cli", "dashboard", str(run_dir), "--port", "0"],
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + WAIT_S
        line = ""
        while time.monotonic() < deadline and "http://" not in line:
            line = process.stderr.readline() or line
            if process.poll() is not None:
                pytest.fail(f"the dashboard exited with {process.returncode}: {line}")
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, f"no address printed within {WAIT_S} s: {line!r}"
        yield url.group(0)
    finally:
        process.terminate()
        process.wait(timeout=WAIT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, condition, timeout: float = WAIT_S, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, what)


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def test_the_page_lists_trials_marks_both_kinds_of_spike_and_shows_new_steps_without_a_reload(
        run_dir, dashboard, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin

    ts = RunStore(run_dir).trial(RunStore(run_dir).trial_ids()[0])
    first_spike, loss_spike = 20, 24
    # Steps 17–26, as a trial still training: a grad-norm spike at 20, a loss spike at 24.
    continue_trial(ts, steps=10, spike_at=first_spike, loss_spike_at=loss_spike)

    browser.get(dashboard)
    rows = wait_for(browser, lambda d: css(d, "#trials tbody tr") or False, what="the trial table")
    assert [r.get_attribute("data-trial") for r in rows] == [ts.trial_id]
    assert "running" in rows[0].text and "sigmoid" in rows[0].text

    css(browser, f'input[data-trial="{ts.trial_id}"]')[0].click()
    css(browser, "#open-instability")[0].click()
    marker = wait_for(browser, lambda d: (css(d, f'circle.spike[data-trial="{ts.trial_id}"]'
                                               f'[data-step="{first_spike}"]') or [None])[0],
                      what="the spike marker")
    plot = marker.find_element("xpath", "ancestor::div[@class='plot']")
    assert plot.get_attribute("data-title").startswith("gradient norm")
    # The spike is the run's largest norm, so its marker sits at the top of a log-scale plot.
    assert float(marker.get_attribute("cy")) < 0.25 * plot.size["height"]
    ActionChains(browser).move_to_element(marker).perform()
    tooltip = wait_for(browser, lambda d: d.find_element("id", "tooltip").text or False,
                       what="the hover tooltip")
    assert f"step {first_spike}" in tooltip and "grad-norm spike" in tooltip

    # The loss spike is a triangle, on the loss panel and on the update-RMS panel below it, and
    # never a grad-norm circle; the legend names both markers.
    loss_marks = css(browser, f'path.loss-spike[data-trial="{ts.trial_id}"][data-step="{loss_spike}"]')
    panels = {m.find_element("xpath", "ancestor::div[@class='plot']").get_attribute("data-title")
              for m in loss_marks}
    assert panels == {"loss", "update RMS: max over matrices of RMS(g² / v̂)"}
    assert not css(browser, f'circle.spike[data-step="{loss_spike}"]')
    assert not css(browser, f'path.loss-spike[data-step="{first_spike}"]')
    legend = {item.get_attribute("data-kind"): item.text for item in css(browser, "#marker-legend .marker-item")}
    assert legend["grad"].startswith("grad-norm spike") and legend["loss"].startswith("loss spike")
    assert css(browser, '#marker-legend [data-kind="grad"] circle.spike')
    assert css(browser, '#marker-legend [data-kind="loss"] path.loss-spike')
    ActionChains(browser).move_to_element(loss_marks[0]).perform()
    wait_for(browser, lambda d: f"step {loss_spike}" in d.find_element("id", "tooltip").text,
             what="the tooltip at the loss spike")
    assert "▲ loss spike, 3× the running median" in browser.find_element("id", "tooltip").text

    # Wheel-zooming at the left edge leaves the spike out of view; a double-click shows it all again.
    for _ in range(10):
        ActionChains(browser).scroll_from_origin(
            ScrollOrigin.from_element(plot, -plot.size["width"] // 2 + 60, 0), 0, -100).perform()
    spike_marker = f'circle.spike[data-step="{first_spike}"]'
    wait_for(browser, lambda d: not css(d, spike_marker), what="the zoom to leave the spike out")
    ActionChains(browser).double_click(plot).perform()
    wait_for(browser, lambda d: css(d, spike_marker), what="a double-click to show the whole run")

    browser.execute_script("window.notReloaded = true; performance.clearResourceTimings()")
    last = continue_trial(ts, steps=5, spike_at=29)  # steps 27–31, while the page is open
    wait_for(browser, lambda d: css(d, 'circle.spike[data-step="29"]'), timeout=LIVE_WAIT_S,
             what="the appended spike")
    legend_step = css(browser, f'.legend-item[data-trial="{ts.trial_id}"] .last-step')[0]
    wait_for(browser, lambda d: legend_step.text == str(last), timeout=LIVE_WAIT_S,
             what=f"the legend to show step {last}")
    counts = css(browser, f'.legend-item[data-trial="{ts.trial_id}"]')[0]
    assert counts.find_element("css selector", ".loss-spikes").text == "1"
    assert browser.execute_script("return window.notReloaded") is True
    asked = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/metrics'))")
    assert asked and all("after=26" in url or "after=31" in url for url in asked), \
        f"polls must ask only for steps after the last one shown, not the history: {asked}"
    assert browser.execute_script("return window.scalestudy.drawnPoints()") == \
        {"traces": 1, "points": last}


def test_the_run_view_shows_a_trials_config_and_evaluations_and_the_scaling_view_its_curve(
        run_dir, dashboard, browser):
    trial_id = RunStore(run_dir).trial_ids()[0]
    browser.get(f"{dashboard}#/trial/{trial_id}")
    info = wait_for(browser, lambda d: (css(d, "#trial-info") or [None])[0].text or False,
                    what="the trial's details")
    assert "loss.kind" in info and "sigmoid" in info
    evals = wait_for(browser, lambda d: css(d, "#evals table tr"), what="the evaluations table")
    assert len(evals) == 1 + len(RunStore(run_dir).trial(trial_id).evals())
    wait_for(browser, lambda d: css(d, '.plot[data-title="loss"]'), what="the loss trace")

    # While the trial is running there is no result to plot yet ...
    RunStore(run_dir).trial(trial_id).update_state(status="running")
    browser.get(f"{dashboard}#/scaling")
    notice = wait_for(browser, lambda d: css(d, "#scaling-plot .notice"), what="the scaling view")
    assert "No finished trials" in notice[0].text
    # ... until it finishes: its point appears without a reload.
    RunStore(run_dir).trial(trial_id).update_state(status="done")
    point = wait_for(browser, lambda d: css(d, "svg.scaling circle title"), timeout=LIVE_WAIT_S,
                     what="the finished trial's point")
    title = point[0].get_attribute("textContent")
    assert "loss.kind=sigmoid, train.batch_size=32" in title and "one seed, no interval" in title
