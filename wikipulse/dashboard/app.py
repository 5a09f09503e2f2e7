"""The Dash page: pick domains, watch their edit rates. Reads Redis only; never writes counters.

The app is wired here and served under uvicorn (`serve`): its layout (layout.py), the callbacks over HTTP
(callbacks.py), the push (push_routes.py), the operations' routes (operations.py) and /history (history_page.py).
All Redis reads of a refresh are one pipelined round trip (data.py); what the page shows is computed by the pure
functions in view.py. Debug is off and the server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator

import dash

from wikipulse.core.settings import DashboardSettings
from wikipulse.dashboard.callbacks import register_lists, register_refresh, register_selection_callbacks
from wikipulse.dashboard.guard import Guard, GuardMiddleware
from wikipulse.dashboard.history_page import mount_history
from wikipulse.dashboard.layout import CSS, serve_layout
from wikipulse.dashboard.operations import register_operations
from wikipulse.dashboard.push import NoticeHub
from wikipulse.dashboard.push_routes import register_push
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient, is_cluster_sync, open_sync_client
from wikipulse.store.shards import check_shards_sync

logger = logging.getLogger(__name__)


def build_app(settings: DashboardSettings, client: SyncClient | None = None) -> dash.Dash:
    cluster = is_cluster_sync(settings)
    layout = keys.Layout(settings.stream, settings.shards, cluster)
    client = client or open_sync_client(settings, cluster, socket_timeout=5, socket_connect_timeout=5)
    check_shards_sync(client, settings)  # another shard count would read other keys than the pipeline writes
    # The FastAPI backend: an ASGI app, served by uvicorn (serve), not by a development server.
    # No inactivity timeout: a watched page can go minutes without a push (a quiet feed, an outage), and Dash's worker
    # would then close its socket and not reconnect it until the tab is hidden and shown again, freezing the page with
    # its polling off. A closed browser's socket closes with it (or uvicorn's ping finds it dead); a closed tab behind
    # a socket its other tabs keep is let go by socket_push's alive check, at the next push.
    app = dash.Dash(__name__, title="wikipulse", update_title="", backend="fastapi", websocket_inactivity_timeout=0)
    app.layout = serve_layout
    app.index_string = app.index_string.replace("{%css%}", "{%css%}<style>" + CSS + "</style>")

    hub = NoticeHub(settings.redis_url, max_pages=settings.max_pages, max_pages_per_address=settings.max_pages_per_address)
    guard = Guard(app.callback_map, app.config.routes_pathname_prefix, settings.max_pages_per_address, settings.push_backlog)
    app.server.add_middleware(GuardMiddleware, guard=guard)
    register_selection_callbacks(app, client, layout)
    register_push(app, hub, guard, client, settings.stream, layout)
    register_operations(app, client, layout, settings, hub)  # /metrics, /healthz, /readyz (operations.py)
    register_lists(app, client, layout)
    mount_history(app, settings, CSS)  # /history: its own page (history_page.py)
    register_refresh(app, client, settings.stream, layout, hub)
    return app


def serve(settings: DashboardSettings) -> None:
    """The page under uvicorn, a production ASGI server (debug is never on), until SIGINT or SIGTERM: both stop
    it gracefully and the process exits 0, as the other scripts do."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the signals are ours (below): uvicorn would re-raise them
            yield

    async def run() -> None:
        app = build_app(settings)
        gc.freeze()  # Dash, Plotly and pandas, loaded once: kept out of the collections a thousand pages' pushes cause
        config = uvicorn.Config(app.server, host=settings.host, port=settings.port, log_level="warning", access_log=False)
        server = Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        logger.info("dashboard on http://%s:%d/ (uvicorn)", settings.host, settings.port)
        await server.serve()

    asyncio.run(run())
