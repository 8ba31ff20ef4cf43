"""Dashboard benchmark: 200 trials × 10,000 steps, overview and a 20-trace instability view in
headless Chromium.

    .venv/bin/python benchmarks/bench_dashboard.py [--dir /tmp/bench-dashboard] [--repeats 3]

The run directory is synthetic but written with the store's own writers, exactly as trials write
it: metric parts flushed every 500 steps (`TrialStore.append_metrics`), compacted when a trial ends
(`compact_metrics`), evaluations (`append_eval`), the real `summarize` for summary.json, and
state.json through `update_state`. Grad-norm and loss spikes are flagged by the trial's own
`SpikeDetector` (fed each whole series at once, `update_many`). Mix of
states: 10 running, 4 failed, diverging large-batch sigmoid trials, the rest done. The directory
is reused when it already holds the full set (writing it takes about a minute here).

Timings are taken inside the page (`performance.now()`): the overview from navigation start to its
table of 200 rows drawn; the instability view of the 20 spikiest trials from the route change (a
click from the overview) and, cold, from navigation start when opened by its URL, to all 20
grad-norm traces (every point, checked) and the aligned loss/temperature/bias/update-RMS panels
drawn, grad-norm spikes circled and loss spikes marked with triangles. Results are recorded in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from scalestudy.expand import expand
from scalestudy.load import load_study
from scalestudy.spec import StudySpec
from scalestudy.store import RunStore, TrialStore, atomic_write_json, atomic_write_text
from scalestudy.train.monitors import SpikeDetector
from scalestudy.train.summary import summarize

STEPS = 10_000
FLUSH_STEPS = 500  # rows per metric part, as a trial flushing every ~2 s at ~250 steps/s writes
EVAL_EVERY = 1_000
BATCH_SIZES = [64, 128, 256, 512, 1024]
NUM_CLASSES = 40

STUDY = {
    "name": "bench",
    "base": {"train": {"eval_every": EVAL_EVERY}},
    "sweep": {
        # 2 losses × 2 β2 × 10 seeds × 5 batch sizes = 200 trials, each exactly STEPS steps.
        "grid": {"loss.kind": ["softmax", "sigmoid"], "optim.beta2": [0.95, 0.999],
                 "train.seed": list(range(10))},
        "zip": {"train.batch_size": BATCH_SIZES,
                "train.examples_seen": [b * STEPS for b in BATCH_SIZES]},
    },
}


def synthetic_series(seed: int, batch: int, beta2: float, sigmoid: bool) -> dict[str, np.ndarray]:
    """Per-step traces shaped like real ones: decaying noisy grad norm, spikes that grow with batch
    size and β2 = 0.999 (SigLIP §4.4), each with a loss spike (double the loss, decaying) and an
    update-RMS bump 3 steps before it (Wortsman et al. 2023 §3.4), rising temperature."""
    rng = np.random.default_rng(seed * 7919 + batch)
    steps = np.arange(1, STEPS + 1)
    grad = 2.0 * (steps / 100 + 1) ** -0.3 * np.exp(rng.normal(0, 0.15, STEPS))
    spike_rate = 1e-4 * (batch / 64) * (4 if beta2 == 0.999 else 1)
    spikes = np.flatnonzero(rng.random(STEPS) < spike_rate)
    grad[spikes] *= rng.uniform(4, 40, spikes.size)
    loss = 4.0 * (steps / 50 + 1) ** -0.25 + rng.normal(0, 0.03, STEPS)
    for s in spikes:
        loss[s:s + 200] *= 1 + np.exp(-np.arange(min(200, STEPS - s)) / 40)
    return {
        "grad_norm": grad,
        "loss": loss,
        "temperature": 10 + 20 * (1 - np.exp(-steps / 3000)),
        "bias": -10 + 3 * (1 - np.exp(-steps / 4000)) if sigmoid else np.full(STEPS, np.nan),
        "rms_max": np.exp(rng.normal(0, 0.2, STEPS)) + np.isin(steps, spikes - 2) * 5,
        "lr": np.minimum(steps / 1000, 1) * 1e-3,
    }


def flag_spikes(detector: SpikeDetector, values: np.ndarray) -> tuple[list[bool], list[float | None]]:
    """The detector's flags and ratios for a whole series, as the rows store them (no ratio: None)."""
    flags, ratios = detector.update_many(torch.from_numpy(values))
    return flags.tolist(), [None if math.isnan(r) else r for r in ratios.tolist()]


def write_trial(ts: TrialStore, index: int, batch: int, beta2: float, sigmoid: bool) -> None:
    trial = ts.read_trial()
    series = synthetic_series(index, batch, beta2, sigmoid)
    running, failed = index % 20 == 3, index % 50 == 7
    diverge_at = 6_000 + index if sigmoid and batch == 1024 and beta2 == 0.999 and index % 3 == 0 else None
    last = 9_500 if running else 3_000 if failed else (diverge_at or STEPS)
    ts.start_attempt("bench")
    monitor = trial.config.monitor
    losses = series["loss"][:last].copy()
    if diverge_at is not None:
        losses[diverge_at - 1] = np.nan
    is_spike, spike_ratio = flag_spikes(
        SpikeDetector(monitor.spike_threshold, monitor.spike_window), series["grad_norm"][:last])
    is_loss_spike, loss_spike_ratio = flag_spikes(
        SpikeDetector(monitor.loss_spike_threshold, monitor.loss_spike_window), losses)
    rows = []
    for i in range(last):
        step = i + 1
        loss = float(losses[i])
        bias = float(series["bias"][i])
        rows.append({
            "step": step, "examples_seen": step * batch, "loss": loss,
            "grad_norm": float(series["grad_norm"][i]), "lr": float(series["lr"][i]),
            "temperature": float(series["temperature"][i]), "bias": None if bias != bias else bias,
            "is_spike": is_spike[i], "spike_ratio": spike_ratio[i], "is_loss_spike": is_loss_spike[i],
            "loss_spike_ratio": loss_spike_ratio[i], "rms_max": float(series["rms_max"][i]),
            "step_time_s": 0.01,
        })
        if step % FLUSH_STEPS == 0 or step == last:
            ts.append_metrics(rows)
            ts.update_state(step=step, steps=STEPS, loss=loss)
            rows = []
        if step % EVAL_EVERY == 0:
            accuracy = 0.6 * (1 - np.exp(-step / 3000)) * (1.1 if sigmoid else 1.0) * (64 / batch) ** 0.05
            ts.append_eval({"step": step, "examples_seen": step * batch, "zeroshot_top1": accuracy,
                            "zeroshot_top5": min(1.0, 2 * accuracy), "retrieval_i2t_r1": accuracy / 2,
                            "retrieval_t2i_r1": accuracy / 2})
    if running:
        return
    if failed:
        ts.update_state(status="failed", error="Traceback (most recent call last):\n  ...\n"
                        "RuntimeError: synthetic failure for the benchmark")
        return
    ts.compact_metrics()
    summary = summarize(ts.metrics(), ts.evals(), trial, diverge_at is not None, 100.0, NUM_CLASSES)
    atomic_write_json(ts.summary_path, summary)
    ts.update_state(status="diverged" if diverge_at else "done", step=summary["step"])


def write_run(out: Path) -> RunStore:
    """The 200-trial run directory (reused when complete)."""
    study = StudySpec.model_validate(STUDY)
    store = RunStore(out / study.name)
    if len(store.trial_ids()) == 200 and all(
        store.trial(t).state().status != "pending" for t in store.trial_ids()
    ):
        return store
    atomic_write_text(store.study_path, yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))
    trials = expand(load_study(store.study_path), str(store.study_path))
    started = time.time()
    for index, trial in enumerate(trials):
        ts = store.trial(trial.trial_id)
        ts.reset()
        store.add_trial(trial)
        cfg = trial.config
        write_trial(ts, index, cfg.train.batch_size, cfg.optim.beta2, cfg.loss.kind == "sigmoid")
    print(f"wrote {len(trials)} trials to {store.root} in {time.time() - started:.0f} s", flush=True)
    return store


def browser(user_data: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={user_data}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_timing(driver, view: str, timeout: float = 60.0) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(f"return (window.scalestudy && window.scalestudy.timings['{view}']) || null")
        if value is not None:
            return float(value)
        time.sleep(0.1)  # the timing is taken in the page; polling often would only add load
    raise TimeoutError(f"the {view} view did not finish rendering within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "bench-dashboard"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    store = write_run(Path(args.dir))
    # The server as a user starts it, in its own process (not sharing this one's interpreter).
    server = subprocess.Popen([sys.executable, "-m", "scalestudy.cli", "dashboard", str(store.root),
                               "--port", "0"], stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    address = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not address:
        server.kill()
        raise RuntimeError(f"the dashboard did not start: {line}{server.stderr.read()}")
    url = address.group(0)
    # The 20 trials with the most spikes of both kinds: what a researcher chasing spikes would open.
    spiky = sorted(store.trial_ids(), key=lambda t: -int(
        store.trial(t).metrics().select(pl.col("is_spike").sum() + pl.col("is_loss_spike").sum()).item()))[:20]
    every_point = {"traces": 20, "points": sum(store.trial(t).metrics().height for t in spiky)}
    instability_url = f"{url}#/instability?trials={','.join(spiky)}"
    times: dict[str, list[float]] = {"overview": [], "from overview": [], "data": [], "direct": []}
    with tempfile.TemporaryDirectory() as user_data:
        driver = browser(user_data)
        try:
            for _ in range(args.repeats):
                driver.get("about:blank")
                driver.get(url)
                times["overview"].append(wait_timing(driver, "overview"))
                rows = driver.execute_script("return document.querySelectorAll('#trials tbody tr').length")
                assert rows == 200, f"overview shows {rows} rows, expected 200"
                # As a user does it: from the overview to the instability view (a route change).
                driver.execute_script("delete window.scalestudy.timings.instability; "
                                      "delete window.scalestudy.timings['instability.data']; "
                                      f"location.hash = '{instability_url[len(url):]}'")
                times["from overview"].append(wait_timing(driver, "instability"))
                times["data"].append(wait_timing(driver, "instability.data"))
                drawn = driver.execute_script("return window.scalestudy.drawnPoints()")
                assert drawn == every_point, f"drew {drawn}, expected every point: {every_point}"
                # Opened directly by its URL: page load, overview and histories, all from cold.
                driver.get("about:blank")
                driver.get(instability_url)
                times["direct"].append(wait_timing(driver, "instability"))
                assert driver.execute_script("return window.scalestudy.drawnPoints()") == every_point
        finally:
            driver.quit()
            server.terminate()
            server.wait(timeout=30)
    labels = {"overview": "overview, navigation → 200-row table drawn",
              "from overview": f"instability from the overview, route change → 20 traces × every step "
                               f"({every_point['points']} points) + 4 aligned panels drawn",
              "data": "  of which fetching the 20 histories (the rest is drawing)",
              "direct": "instability opened by URL, navigation → the same drawn"}
    for key, label in labels.items():
        print(f"{label}: median {statistics.median(times[key]):.0f} ms "
              f"(runs: {', '.join(f'{v:.0f}' for v in times[key])})")
    ok = statistics.median(times["overview"]) < 1000 and max(
        statistics.median(times["from overview"]), statistics.median(times["direct"])) < 2000
    print("targets (overview < 1 s, instability < 2 s):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
