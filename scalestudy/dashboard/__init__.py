"""`scalestudy dashboard RUN_DIR`: a live, read-only web page over a results store.

`data` reads the store (never writes it), `server` answers HTTP with the standard library, and
`static/` holds the page: plain JavaScript drawing on <canvas> and inline SVG, no CDN, no network.
"""

from scalestudy.dashboard.server import make_server, serve

__all__ = ["make_server", "serve"]
