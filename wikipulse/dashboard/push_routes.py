"""The push's Dash wiring: the persistent websocket callback (socket_push.py), the page's resync, the in-page
appliers of pushed updates (view_updates.py), and PUSH_STATUS_PATH."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, State
from dash.exceptions import PreventUpdate

from wikipulse.dashboard.callbacks import LIST_OUTPUTS, REFRESH_OUTPUTS, refresh_view
from wikipulse.dashboard.data import read_lists
from wikipulse.dashboard.guard import CONNECTION, Guard
from wikipulse.dashboard.push import NoticeHub
from wikipulse.dashboard.socket_push import SocketPush
from wikipulse.dashboard.view import SelectionError, clean_selection
from wikipulse.dashboard.view_updates import APPLY_TO_GRAPH, APPLY_TO_LISTS, WATCH_SHOWN, drawn, pushed_payload
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient

PUSH_STATUS_PATH = "/_wikipulse/push"


def register_push(app: dash.Dash, hub: NoticeHub, guard: Guard, client: SyncClient, stream: str, layout: keys.Layout) -> None:
    """The push (socket_push.py): one loop per websocket serving its pages, with the updates computed here once per
    view and version (view_updates.py). PUSH_STATUS_PATH tells operators (and the tests) how many pages are being
    pushed to, whether the process holds its one subscription, and what was refused."""

    def graph_update(shown: dict[str, Any], version: int) -> tuple[str, Any] | None:
        """In a worker thread: the update of the page that shows `shown` to `version` (None: it says nothing usable)."""
        args = shown.get("args")
        if not (isinstance(args, list) and len(args) == 6):
            return None
        try:
            sel = clean_selection(*args)
        except SelectionError:
            return None
        since = hub.moved_since(shown.get("mark"))  # taken now: it may cover more than `version` moved, never less
        mark, now = f"{hub.epoch}:{version}", push.cache.now(version)
        *props, then = refresh_view(client, stream, layout, sel, shown.get("zoom"), shown, mark, since, now)
        return pushed_payload(drawn(shown), then, [(c, p, v) for (c, p), v in zip(REFRESH_OUTPUTS, props, strict=True)]), then

    def lists_update(shown: list[Any]) -> tuple[str, Any] | None:
        lists = read_lists(client, layout, *shown) if len(shown) == 4 else None
        if lists is None:
            return None
        return pushed_payload(shown, shown, [(c, p, v) for (c, p), v in zip(LIST_OUTPUTS, lists[:3], strict=True)]), shown

    push = SocketPush(hub, guard, graph_update, lists_update)

    async def push_status() -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse({
            "pages": hub.pages, "subscribed": hub.subscribed, "version": hub.version, "redis_up": hub.redis_up,
            "sockets": sum(guard.sockets.values()), "pages_refused": hub.refused, "refused": dict(guard.refused),
            "dropped_slow": guard.dropped_slow, "updates_computed": push.cache.computed,
        })  # fmt: skip

    app.server.add_api_route(PUSH_STATUS_PATH, push_status, methods=["GET"])

    @app.callback(websocket=True, persistent=True)
    async def push_updates() -> None:
        ws, conn = dash.ctx.websocket, CONNECTION.get()
        if ws is None or conn is None:
            raise PreventUpdate
        await push.serve(ws, conn)

    @app.callback(Input("resync", "data"), State("shown", "data"), State("lists-shown", "data"), websocket=True, prevent_initial_call=True)
    async def resync(_n: Any, shown: Any, lists: Any) -> None:
        """The page says what it shows (view_updates.WATCH_SHOWN): it is pushed to from there (SocketPush.resync)."""
        ws, conn = dash.ctx.websocket, CONNECTION.get()
        if ws is not None and conn is not None:
            push.resync(ws, conn, shown, lists)
        raise PreventUpdate

    # In the page: a pushed update is applied only to what it was made from (view_updates.py).
    app.clientside_callback(  # type: ignore[no-untyped-call]
        APPLY_TO_GRAPH, Output("shown", "data", allow_duplicate=True), Output("resync", "data", allow_duplicate=True),
        Input("pushed", "data"), State("shown", "data"), State("resync", "data"), prevent_initial_call=True,
    )  # fmt: skip
    app.clientside_callback(  # type: ignore[no-untyped-call]
        APPLY_TO_LISTS, Output("lists-shown", "data", allow_duplicate=True), Output("resync", "data", allow_duplicate=True),
        Input("lists-pushed", "data"), State("lists-shown", "data"), State("resync", "data"), prevent_initial_call=True,
    )  # fmt: skip
    app.clientside_callback(  # type: ignore[no-untyped-call]
        WATCH_SHOWN, Output("resync", "data", allow_duplicate=True), Input("shown", "data"), Input("lists-shown", "data"),
        State("pushed", "data"), State("lists-pushed", "data"), State("resync", "data"), prevent_initial_call=True,
    )  # fmt: skip
    # The zoom the user picked since the last draw: the next push draws the figure with it.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        "function (zoom, shown) { return shown ? {...shown, zoom: zoom} : dash_clientside.no_update; }",
        Output("shown", "data", allow_duplicate=True), Input("zoom", "data"), State("shown", "data"), prevent_initial_call=True,
    )  # fmt: skip
