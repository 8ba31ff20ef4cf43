"""The dashboard's HTTP server: the standard library's ThreadingHTTPServer, GET only.

Routes (everything else is 404; any method but GET is 405, so no request can change the store):

    /                                   the page (static/index.html)
    /static/<name>                      a file of static/, by exact name
    /api/overview                       trials, counts, axes, problems (JSON)
    /api/trials/<id>                    one trial's config, state, summary, evaluations (JSON)
    /api/trials/<id>/metrics?after=N&columns=a,b   steps > N as float64 columns (data.encode_columns)
    /api/scaling?x=KEY&y=METRIC&by=KEY  seed-averaged curves (JSON)

A trial id from the URL is looked up in the run directory's trial list and a static name in the
folder's listing, so no URL can name a path outside RUN_DIR or static/. A request whose Host header
names anything but the address the server is bound to (or this machine's loopback names) is
refused with 403: a web page elsewhere cannot read the run through a DNS name it rebinds to
127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

from scalestudy.dashboard.data import PLOT_COLUMNS, Dashboard, NotFound
from scalestudy.errors import ScalestudyError, UsageError

STATIC = Path(__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
LOOPBACK = {"127.0.0.1", "localhost"}


class BadRequest(ScalestudyError):
    """A query parameter has a value the endpoint cannot use."""


def static_file(name: str) -> Path:
    """A file of static/ by exact name (the folder's own listing decides what exists)."""
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    if name not in files:
        raise NotFound(f"no static file {name!r}")
    return files[name]


def int_param(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        return int(values[0])
    except ValueError:
        raise BadRequest(f"{name}={values[0]!r} is not an integer") from None


def text_param(query: dict[str, list[str]], name: str, default: str) -> str:
    return query.get(name, [default])[0]


def allowed_hosts(bound: str) -> frozenset[str]:
    """Host names a request may carry for a server bound to `bound`: loopback names, the bound
    address itself, and for a wildcard bind this machine's own names and addresses."""
    names = {"localhost", "127.0.0.1", "::1", bound.strip("[]")}
    if bound in ("0.0.0.0", "::", ""):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        try:
            names |= set(socket.gethostbyname_ex(hostname)[2])
        except OSError:
            pass
    return frozenset(n.lower() for n in names)


def host_name(header: str | None) -> str | None:
    """The host part of a Host header (`[::1]:8050` → `::1`, `localhost:8050` → `localhost`)."""
    if not header:
        return None
    host = header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def make_handler(dashboard: Dashboard, hosts: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "scalestudy-dashboard"

        def do_GET(self) -> None:  # noqa: N802 - the http.server naming
            if host_name(self.headers.get("Host")) not in hosts:
                self._json({"error": f"Host {self.headers.get('Host')!r} is not this dashboard's "
                            "address; open it by the address it printed"}, HTTPStatus.FORBIDDEN)
                return
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            query = parse_qs(url.query)
            try:
                self._route(parts, query)
            except NotFound as err:
                self._json({"error": str(err)}, HTTPStatus.NOT_FOUND)
            except BadRequest as err:
                self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
            except ScalestudyError as err:
                # The store has a file it cannot read: say which, so the page can flag the trial.
                self._json({"error": str(err)}, HTTPStatus.INTERNAL_SERVER_ERROR)

        def _route(self, parts: list[str], query: dict[str, list[str]]) -> None:
            match parts:
                case [] | ["index.html"]:
                    self._file(static_file("index.html"))
                case ["static", name]:
                    self._file(static_file(name))
                case ["api", "overview"]:
                    self._json(dashboard.overview())
                case ["api", "trials", trial_id]:
                    self._json(dashboard.detail(trial_id))
                case ["api", "trials", trial_id, "metrics"]:
                    columns = text_param(query, "columns", ",".join(PLOT_COLUMNS)).split(",")
                    body = dashboard.metrics(trial_id, int_param(query, "after", 0), columns)
                    self._send(body, "application/octet-stream")
                case ["api", "scaling"]:
                    self._json(dashboard.scaling(
                        text_param(query, "x", "train.batch_size"),
                        text_param(query, "y", "zeroshot_top1"),
                        text_param(query, "by", "loss.kind")))
                case _:
                    raise NotFound(f"no page {self.path!r}")

        def _read_only(self) -> None:
            self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
            self.send_header("Allow", "GET")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815

        def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
            self._send(json.dumps(data, default=str).encode(), "application/json", status)

        def _file(self, path: Path) -> None:
            self._send(path.read_bytes(), CONTENT_TYPES.get(path.suffix, "application/octet-stream"))

        def _send(self, body: bytes, content_type: str, status: HTTPStatus = HTTPStatus.OK) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                # Live data: the browser must ask again rather than show a stale copy.
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page went away (reload, closed tab) mid-answer: nothing to do

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
            pass  # a poll every 2 s per trace would flood the terminal

    return Handler


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8050) -> ThreadingHTTPServer:
    """A server over RUN_DIR with its trials read, bound but not yet serving (call `serve_forever`);
    port 0 picks a free one."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory; pass the run directory `scalestudy run` "
                         "created (OUT/<study name>, e.g. runs/quickstart)")
    dashboard = Dashboard(root)
    # Read every trial once now, so the first page load is as fast as the polls after it
    # (a 200-trial run takes seconds to read cold, well under a second warm).
    dashboard.rows()
    try:
        server = ThreadingHTTPServer((host, port), make_handler(dashboard, allowed_hosts(host)))
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port "
                         "(0 picks a free one) or --host") from None
    server.daemon_threads = True
    return server


def serve(run_dir: str | Path, host: str, port: int, out: TextIO = sys.stderr) -> None:
    """Serve until Ctrl-C, printing the address (and a warning when it is not loopback-only)."""
    server = make_server(run_dir, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"dashboard for {Path(run_dir)}: {url}  (read-only; Ctrl-C stops)", file=out, flush=True)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this address can read the run "
              "(there is no login)", file=out, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
