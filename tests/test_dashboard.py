"""The dashboard's HTTP endpoints over a real tiny study: what they show, what they refuse, and that
a live, empty or broken run directory still renders."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml

from scalestudy.cli import main
from scalestudy.dashboard import make_server
from scalestudy.dashboard.data import metrics_after
from scalestudy.store import RunStore, TrialStore
from tests.conftest import tiny_study

# Most tests read a tiny study trained for real once per module (the `run_dir` fixture).
pytestmark = pytest.mark.train

TIMEOUT_S = 20  # per request: a hung server fails the test instead of hanging it


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny study (softmax and sigmoid, 16 steps each), run once for the module."""
    base = tmp_path_factory.mktemp("study")
    study = base / "study.yaml"
    study.write_text(yaml.safe_dump(tiny_study(name="dash")))
    assert main(["run", str(study), "--out", str(base / "runs")]) == 0
    return base / "runs" / "dash"


@pytest.fixture
def run_dir(finished_run: Path, tmp_path: Path) -> Path:
    """A copy each test may change."""
    return Path(shutil.copytree(finished_run, tmp_path / "dash"))


@pytest.fixture
def serve(run_dir: Path) -> Iterator[str]:
    """The dashboard over `run_dir` on a free loopback port; yields its base URL."""
    yield from serving(run_dir)


def serving(root: Path) -> Iterator[str]:
    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(TIMEOUT_S)


def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str) -> Any:
    status, body = get(url)
    assert status == 200, body
    return json.loads(body)


def decode_metrics(body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The binary metrics answer, decoded as the page does (static/plot.js decodeMetrics)."""
    assert body[:4] == b"SSM1"
    (length,) = struct.unpack("<I", body[4:8])
    header = json.loads(body[8:8 + length])
    offset, columns = 8 + length, {}
    assert offset % 8 == 0, "columns must start 8-byte aligned for Float64Array views"
    for name in header["columns"]:
        columns[name] = np.frombuffer(body, "<f8", header["rows"], offset)
        offset += 8 * header["rows"]
    return header, columns


def trials(root: Path) -> dict[str, TrialStore]:
    """The run's trials by loss kind."""
    store = RunStore(root)
    return {store.trial(t).read_trial().config.loss.kind: store.trial(t) for t in store.trial_ids()}


def continue_trial(ts: TrialStore, steps: int, spike_at: int | None = None,
                   loss_spike_at: int | None = None) -> int:
    """Mark the trial running and append `steps` rows with the trial's own writer; returns the last
    step. The row at `spike_at` is a gradient-norm spike, 50× the norm before it; the row at
    `loss_spike_at` a loss spike, 3× the loss before it, after an update-RMS bump 3 steps earlier
    (as Wortsman et al. 2023 §3.4 see them)."""
    last = ts.metrics().row(-1, named=True)
    ts.update_state(status="running")
    rows = []
    for step in range(last["step"] + 1, last["step"] + steps + 1):
        spike, loss_spike = step == spike_at, step == loss_spike_at
        bump = loss_spike_at is not None and step == loss_spike_at - 3
        rows.append({**last, "step": step, "examples_seen": step * last["examples_seen"] // last["step"],
                     "is_spike": spike, "spike_ratio": 50.0 if spike else 1.0,
                     "grad_norm": last["grad_norm"] * (50 if spike else 1),
                     "is_loss_spike": loss_spike, "loss_spike_ratio": 3.0 if loss_spike else 1.0,
                     "loss": last["loss"] * (3 if loss_spike else 1),
                     "rms_max": 4.0 if bump else (last["rms_max"] or 0.9)})
    ts.append_metrics(rows)
    return rows[-1]["step"]


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_the_overview_lists_every_trial_with_its_swept_values_state_and_figures(serve):
    overview = get_json(f"{serve}/api/overview")
    assert overview["axes"] == ["loss.kind"]
    assert overview["counts"] == {"done": 2} and overview["broken"] == 0
    rows = {r["loss.kind"]: r for r in overview["trials"]}
    assert set(rows) == {"softmax", "sigmoid"}
    for row in rows.values():
        assert row["status"] == "done" and row["step"] == row["steps"] == 16
        assert 0 <= row["zeroshot_top1"] <= 1 and row["best_zeroshot_top1"] >= row["zeroshot_top1"]
        assert isinstance(row["spike_count"], int) and row["problem"] is None
        assert isinstance(row["loss_spike_count"], int) and row["stalled"] in (True, False)


def test_metrics_come_as_float64_columns_and_only_after_the_step_asked(serve, run_dir):
    sigmoid, softmax = trials(run_dir)["sigmoid"], trials(run_dir)["softmax"]
    header, cols = decode_metrics(get(f"{serve}/api/trials/{sigmoid.trial_id}/metrics?after=0")[1])
    assert header["rows"] == 16 and header["status"] == "done" and header["last_step"] == 16
    assert cols["step"].tolist() == list(range(1, 17))
    assert cols["grad_norm"].tolist() == sigmoid.metrics()["grad_norm"].to_list()
    assert set(cols["is_spike"].tolist()) <= {0.0, 1.0}

    header, cols = decode_metrics(
        get(f"{serve}/api/trials/{softmax.trial_id}/metrics?after=10&columns=step,bias,nonexistent")[1])
    assert header["columns"] == ["step", "bias"]
    assert cols["step"].tolist() == [11, 12, 13, 14, 15, 16]
    assert np.isnan(cols["bias"]).all(), "softmax has no bias: nulls arrive as NaN"

    header, _ = decode_metrics(get(f"{serve}/api/trials/{softmax.trial_id}/metrics?after=16")[1])
    assert header["rows"] == 0 and header["last_step"] == 16
    assert get(f"{serve}/api/trials/{softmax.trial_id}/metrics?after=ten")[0] == 400


def test_steps_a_running_trial_appends_arrive_on_the_next_poll_with_both_kinds_of_spike(serve, run_dir):
    ts = trials(run_dir)["sigmoid"]
    last = continue_trial(ts, steps=6, spike_at=18, loss_spike_at=21)
    header, cols = decode_metrics(get(f"{serve}/api/trials/{ts.trial_id}/metrics?after=16")[1])
    assert header["status"] == "running"
    assert cols["step"].tolist() == [17, 18, 19, 20, 21, 22] and last == 22
    assert cols["is_spike"].tolist() == [0, 1, 0, 0, 0, 0]
    assert cols["is_loss_spike"].tolist() == [0, 0, 0, 0, 1, 0]
    assert cols["rms_max"][cols["step"] == 18].tolist() == [4.0]  # the bump 3 steps before

    row = next(r for r in get_json(f"{serve}/api/overview")["trials"] if r["trial_id"] == ts.trial_id)
    assert row["status"] == "running"
    # Live figures for a trial without a summary: counted from its history so far.
    assert row["spike_count"] == int(ts.metrics()["is_spike"].sum()) >= 1
    assert row["max_spike_ratio"] == 50.0
    assert row["loss_spike_count"] == int(ts.metrics()["is_loss_spike"].sum()) >= 1
    assert row["max_loss_spike_ratio"] == 3.0 and row["first_loss_spike_step"] <= 21


def test_polling_reads_only_the_parts_that_end_after_the_step_asked(run_dir):
    ts = trials(run_dir)["sigmoid"]
    continue_trial(ts, steps=3)
    history = ts.metric_parts()[0]
    history.write_bytes(b"not parquet")  # only a full re-read would notice
    assert metrics_after(ts, 16)["step"].to_list() == [17, 18, 19]


def test_a_history_in_many_parts_reads_back_as_the_store_reads_it(run_dir):
    ts = trials(run_dir)["sigmoid"]
    continue_trial(ts, steps=3)
    continue_trial(ts, steps=3)
    assert len(ts.metric_parts()) == 3
    assert metrics_after(ts, 0).equals(ts.metrics())
    # A part overlapping another (not what a trial writes) is resolved as the store does: last wins.
    rewritten = ts.metrics().filter(step=21).with_columns(loss=pl.lit(123.0))
    rewritten.write_parquet(ts.metrics_dir / "000000021-000000021.parquet")
    assert metrics_after(ts, 0).equals(ts.metrics())
    assert metrics_after(ts, 20)["loss"].to_list()[0] == 123.0


def test_a_corrupt_trial_is_flagged_and_the_rest_of_the_run_still_renders(serve, run_dir):
    by_kind = trials(run_dir)
    by_kind["softmax"].state_path.write_text("{ not json")
    part = by_kind["sigmoid"].metric_parts()[0]
    part.write_bytes(part.read_bytes()[:100])  # truncated, as a disk full or a bad copy leaves it

    overview = get_json(f"{serve}/api/overview")
    assert overview["broken"] == 2
    problems = {r["trial_id"]: r["problem"] for r in overview["trials"]}
    assert "state.json" in problems[by_kind["softmax"].trial_id]
    assert part.name in problems[by_kind["sigmoid"].trial_id]

    status, body = get(f"{serve}/api/trials/{by_kind['sigmoid'].trial_id}/metrics?after=0")
    assert status == 500 and "unreadable metrics" in json.loads(body)["error"]
    detail = get_json(f"{serve}/api/trials/{by_kind['softmax'].trial_id}")
    assert detail["state"] is None and "state.json" in detail["problems"][0]
    assert detail["trial"]["config"]["loss"]["kind"] == "softmax"
    assert get(f"{serve}/")[0] == 200


def test_an_empty_run_directory_renders_with_a_notice_and_fills_in_later(tmp_path):
    root = tmp_path / "not-started"
    root.mkdir()
    for url in serving(root):
        overview = get_json(f"{url}/api/overview")
        assert overview["trials"] == [] and "manifest.json" in overview["problem"]
        assert get(f"{url}/")[0] == 200


def test_a_trial_with_only_its_config_written_is_pending_with_no_steps(serve, run_dir):
    ts = trials(run_dir)["sigmoid"]
    shutil.rmtree(ts.metrics_dir)
    for path in (ts.state_path, ts.summary_path, ts.evals_path, ts.checkpoint_path):
        path.unlink(missing_ok=True)
    row = next(r for r in get_json(f"{serve}/api/overview")["trials"] if r["trial_id"] == ts.trial_id)
    assert row["status"] == "pending" and row["problem"] is None and row["spike_count"] == 0
    header, _ = decode_metrics(get(f"{serve}/api/trials/{ts.trial_id}/metrics?after=0")[1])
    assert header["rows"] == 0 and header["status"] == "pending"


@pytest.mark.parametrize("path", [
    "/api/trials/..%2F..%2F..%2Fetc%2Fpasswd",
    "/api/trials/..%2Fstudy.yaml/metrics",
    "/api/trials/%2e%2e/metrics",
    "/api/trials/../../secret.txt",
    "/static/..%2Fserver.py",
    "/static/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/static/../../../secret.txt",
    "/secret.txt",
    "/trials/",
])
def test_no_url_reaches_a_file_outside_the_run_directory_or_the_page(serve, run_dir, path):
    (run_dir.parent / "secret.txt").write_text("SECRET")
    status, body = get(serve + path)
    assert status == 404 and b"SECRET" not in body and b"import" not in body


def test_no_request_changes_the_run_directory(serve, run_dir):
    before = tree_digest(run_dir)
    ts = trials(run_dir)["sigmoid"]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert get(f"{serve}/api/trials/{ts.trial_id}", method)[0] == 405
    for path in ("/", "/api/overview", f"/api/trials/{ts.trial_id}", "/api/scaling",
                 f"/api/trials/{ts.trial_id}/metrics?after=0"):
        assert get(serve + path)[0] == 200
    assert tree_digest(run_dir) == before


def test_scaling_curves_are_the_reports_seed_statistics_from_current_results(serve, run_dir):
    data = get_json(f"{serve}/api/scaling?x=train.batch_size&y=zeroshot_top1&by=loss.kind")
    curves = {c["name"]: c["points"] for c in data["curves"]}
    assert set(curves) == {"softmax", "sigmoid"}
    for kind, ts in trials(run_dir).items():
        [[batch, mean, std, seeds, ci_low, ci_high]] = curves[kind]
        # One seed: its value, and no spread or interval (not a zero-width one).
        assert (batch, seeds) == (32, 1) and std is ci_low is ci_high is None
        assert mean == pytest.approx(ts.summary()["zeroshot_top1"])
    assert data["chance"] == pytest.approx(1 / 40)
    assert get(f"{serve}/api/scaling?y=os.system")[0] == 404


def test_the_page_and_every_asset_it_loads_come_from_the_package(serve):
    status, page = get(f"{serve}/")
    assert status == 200 and b"<title>scalestudy dashboard</title>" in page
    assets = re.findall(rb'(?:src|href)="([^"]+)"', page)
    assert {a for a in assets if not a.startswith(b"#") and a != b"data:,"} == {
        b"/static/app.css", b"/static/plot.js", b"/static/app.js"}
    for asset in assets:
        if asset.startswith(b"/static/"):
            status, body = get(serve + asset.decode())
            # No CDN or other network address: the only URL is SVG's XML namespace, never fetched.
            urls = set(re.findall(rb"https?://[^\s\"'`)]+", body)) - {b"http://www.w3.org/2000/svg"}
            assert status == 200 and body and not urls, (asset, urls)


def test_the_server_binds_to_loopback_unless_told_otherwise(run_dir):
    server = make_server(run_dir, port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


def with_host(url: str, host: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_a_request_for_another_host_name_is_refused_against_dns_rebinding(serve):
    # A page on evil.example whose name was rebound to 127.0.0.1 sends its own Host header.
    port = serve.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", ""):
        status, body = with_host(f"{serve}/api/overview", host)
        assert status == 403 and b"not this dashboard's address" in body, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert with_host(f"{serve}/api/overview", host)[0] == 200, host


def test_the_command_names_a_missing_run_directory_and_a_busy_port(tmp_path, run_dir, capsys):
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["dashboard", str(run_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "--port" in capsys.readouterr().err
