"""The Dash page: pick domains, watch their edit rates. Reads Redis only; never writes counters.

All Redis reads of a refresh are one pipelined round trip (`read_snapshot`); what the
page shows is computed by the pure functions in view.py. Debug is off and the server
binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any

import dash
import orjson
from dash import ALL, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from wikipulse.core.settings import DashboardSettings
from wikipulse.dashboard.figure_patch import figure_patch, plan_patch, shown_state
from wikipulse.dashboard.guard import CONNECTION, Guard, GuardMiddleware
from wikipulse.dashboard.history_page import PATH as HISTORY_PATH
from wikipulse.dashboard.history_page import mount_history
from wikipulse.dashboard.lists_view import LIST_SIZE, WHO_LABELS, alert_marks, alert_rows, clean_filter, new_page_rows, trending_rows
from wikipulse.dashboard.operations import register_operations
from wikipulse.dashboard.push import NoticeHub
from wikipulse.dashboard.socket_push import SocketPush
from wikipulse.dashboard.view import (
    BREAKDOWNS,
    NAMESPACES,
    WINDOWS,
    Selection,
    SelectionError,
    Snapshot,
    ahead_notice,
    clean_selection,
    default_domains,
    header,
    make_figure,
    query_from_selection,
    selection_from_query,
    stale_seconds,
    ticker_rows,
    to_frame,
    trimmed_notice,
    window_choices,
)
from wikipulse.dashboard.view_updates import APPLY_TO_GRAPH, APPLY_TO_LISTS, WATCH_SHOWN, drawn, pushed_payload
from wikipulse.fold.series import SeriesRead, bucket_range, decode_reads, merge_ranking, queue_ranking, queue_reads
from wikipulse.fold.trending import TrendingQuery, queue_new_pages, take_new_pages
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient, is_cluster_sync, open_sync_client
from wikipulse.store.shards import check_shards_sync
from wikipulse.store.status import decode_hash
from wikipulse.store.trimming import TRIMMED_UNREAD

logger = logging.getLogger(__name__)

REFRESH_MS = 2000
LISTS_MS = 5000
ALERTS_SHOWN = 50
TICKER_SIZE = 12
TOP_SIZE = 10


def window_buckets(sel: Selection, now: float) -> list[int]:
    """The buckets the graph shows at `now`: the window's, the one still filling last."""
    t = int(now)
    return bucket_range(sel.res, t - sel.seconds + sel.res.step, t)


def read_snapshot(
    client: SyncClient,
    stream: str,
    sel: Selection,
    now: float | None = None,
    layout: keys.Layout | None = None,
    read_from: int | None = None,
) -> Snapshot:
    """Everything one refresh needs, in one pipelined round trip (on a cluster, one per master, at once). With
    `read_from`, the graph's series are read from that bucket on only (a Patch needs no more), None before it."""
    layout = layout or keys.Layout(stream)
    now = time.time() if now is None else now
    t = int(now)
    res = sel.res
    buckets = window_buckets(sel, now)
    shown = buckets if read_from is None else [b for b in buckets if b >= read_from]
    ten, minute = keys.RESOLUTION_BY_NAME["10s"], keys.RESOLUTION_BY_NAME["1m"]
    picked_read = SeriesRead.plan(res, shown, sel.dims)  # the same fields for every picked domain
    reads = [  # (domain, plan): the picked domains, the global totals for gaps, then the header's totals
        *((domain, picked_read) for domain in sel.domains),
        (keys.ALL_DOMAINS, SeriesRead.plan(res, shown, ("",))),
        (keys.ALL_DOMAINS, SeriesRead.plan(ten, bucket_range(ten, t - 20, t), ("",))),
        (keys.ALL_DOMAINS, SeriesRead.plan(minute, bucket_range(minute, t - 3540, t), ("",))),
    ]
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe, layout, reads)
    queue_ranking(pipe, layout, t, 3600)
    queue_ranking(pipe, layout, t, 300)
    pipe.hgetall(layout.publisher.stats)
    pipe.xrevrange(stream, count=TICKER_SIZE)
    pipe.xrevrange(keys.ALERTS, count=ALERTS_SHOWN)
    routed = [shard.router_stats for shard in layout.all_shards] if layout.sharded else []
    for key in routed:  # what the shard streams lost to trimming before the subscribers read it
        pipe.hgetall(key)
    replies = pipe.execute()

    decoded, at = decode_reads(layout, reads, replies)
    *picked, totals, recent, hour = decoded
    unread: list[int | None] = [None] * (len(buckets) - len(shown))
    picked = [{dim: unread + values for dim, values in counts.items()} for counts in picked]
    totals = {dim: unread + values for dim, values in totals.items()}
    ranked_hour, n = merge_ranking(layout, replies[at:])
    ranked_5min, m = merge_ranking(layout, replies[at + n :])
    publisher_raw, latest, alerts, *routers = replies[at + n + m :]
    publisher = decode_hash(publisher_raw)
    for router in routers:
        for name, value in decode_hash(router).items():
            if name.startswith(TRIMMED_UNREAD):
                publisher[name] = publisher.get(name, 0) + value
    return Snapshot(
        now=now,
        buckets=buckets,
        series={**dict(zip(sel.domains, picked, strict=True)), keys.ALL_DOMAINS: totals},
        ranked_hour=ranked_hour,
        ranked_5min=ranked_5min,
        publisher=publisher,
        recent_10s=recent[""],
        last_hour_1m=hour[""],
        latest=[_parse(fields.get(b"data", b"")) for _, fields in latest],
        alerts=[_parse(fields.get(b"alert", b"")) for _, fields in alerts],
    )


def _parse(data: bytes) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def ranked_desc(pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(pairs, key=lambda p: (-p[1], p[0]))


def stat_card(label: str, id_: str) -> html.Div:
    return html.Div([html.Div(label, className="label"), html.Div("–", id=id_, className="value")], className="card")


def serve_layout() -> html.Div:
    """A function, so every page load gets fresh defaults."""
    return html.Div(
        [
            dcc.Location(id="url", refresh=False),
            dcc.Store(id="initialized", data=False),
            dcc.Store(id="zoom", data=None),
            dcc.Interval(id="tick", interval=REFRESH_MS),  # polling: only until push takes over (push.py)
            dcc.Store(id="shown", data=None),  # what the graph shows: a push patches from it (figure_patch.py)
            dcc.Store(id="pushed", data=None),  # an update the server pushed, applied if it is for `shown` (view_updates.py)
            dcc.Interval(id="lists-tick", interval=LISTS_MS),  # the lists' polling: only until push takes over
            dcc.Store(id="lists-shown", data=None),  # what the lists show (their filter), for the push
            dcc.Store(id="lists-pushed", data=None),  # the lists, pushed at most every LISTS_MS when the data moved
            dcc.Store(id="resync", data=0),  # poked when the page shows what the push does not know: it tells the server
            dcc.Download(id="download"),
            html.Div(id="stale-banner", className="stale", style={"display": "none"}),
            html.H1(
                [
                    "wikipulse · the live pulse of the Wikimedia wikis",
                    html.Span("polling every 2 s", id="push-status", className="push"),
                    html.A("history →", id="history-link", href=HISTORY_PATH, className="push"),
                ]
            ),
            html.Div(
                [
                    stat_card("events/s now", "h-eps"),
                    stat_card("events, last hour", "h-hour"),
                    stat_card("active domains (5 min)", "h-active"),
                    stat_card("ingest lag", "h-lag"),
                    stat_card("publisher", "h-publisher"),
                ],
                className="cards",
            ),
            html.Div(
                [
                    dcc.Dropdown(id="domains", multi=True, searchable=True, placeholder="Pick domains…", options=[], value=[]),
                    dcc.RadioItems(id="resolution", options=list(WINDOWS), value="10s", inline=True),
                    dcc.Dropdown(id="window", options=list(WINDOWS["10s"]), value="30m", clearable=False, style={"width": "110px"}),
                    dcc.RadioItems(id="breakdown", options=list(BREAKDOWNS), value="total", inline=True),
                    html.Button("Download CSV", id="export"),
                ],
                className="controls",
            ),
            html.Div(
                [
                    html.Span("who:"),
                    dcc.RadioItems(id="who", options=[{"label": v, "value": k} for k, v in WHO_LABELS.items()], value="all", inline=True),
                    html.Span("namespace:"),
                    dcc.Dropdown(
                        id="ns",
                        options=[{"label": v, "value": k} for k, v in NAMESPACES.items()],
                        value="all",
                        clearable=False,
                        style={"width": "170px"},
                    ),
                    html.Span("trending over:"),
                    dcc.RadioItems(
                        id="trend", options=[{"label": f"{m} min", "value": m} for m in keys.TREND_WINDOWS], value=5, inline=True
                    ),
                ],
                className="filters",
            ),
            html.Div(id="selection-error", className="error"),
            dcc.Graph(id="graph", config={"displaylogo": False}),
            html.Div(
                [
                    html.Div([html.H3("Top domains · 5 min"), html.Div(id="top-5min")], className="top"),
                    html.Div([html.H3("Top domains · hour"), html.Div(id="top-hour")], className="top"),
                    html.Div([html.H3("Latest changes"), html.Table(id="ticker")], className="ticker"),
                ],
                className="bottom",
            ),
            html.Div(
                [
                    html.Div([html.H3("Trending pages · picked wikis"), html.Table(id="trending")], className="ticker"),
                    html.Div([html.H3("New pages"), html.Table(id="new-pages")], className="ticker"),
                    html.Div([html.H3("Spikes"), html.Ul(id="alerts")], className="alerts"),
                ],
                className="lists",
            ),
        ],
        className="page",
    )


CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; }
.page { max-width: 1280px; margin: 0 auto; padding: 12px 20px; }
h1 { font-size: 22px; margin: 8px 0 12px; }
h1 .push { font-size: 12px; font-weight: normal; color: #888; margin-left: 12px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: white; border-radius: 8px; padding: 8px 14px; min-width: 140px; box-shadow: 0 1px 2px #0002; }
.card .label { color: #666; font-size: 12px; } .card .value { font-size: 22px; font-weight: 600; }
.controls { display: grid; grid-template-columns: 1fr auto auto auto auto; gap: 12px; align-items: center; margin: 12px 0; }
.stale { background: #b00020; color: white; padding: 8px 16px; font-weight: 600; }
.error { color: #b00020; }
.bottom { display: grid; grid-template-columns: 1fr 1fr 2fr; gap: 16px; }
.top button { display: block; width: 100%; text-align: left; margin: 2px 0; border: 0; background: white; padding: 4px 8px; }
.top button { cursor: pointer; }
.ticker table, .ticker td { font-size: 13px; } .ticker td { padding: 2px 6px; }
.filters { display: flex; gap: 10px; align-items: center; margin: 0 0 8px; font-size: 14px; }
.lists { display: grid; grid-template-columns: 2fr 2fr 1fr; gap: 16px; margin-top: 12px; }
.lists th { text-align: left; font-size: 12px; color: #666; }
.alerts ul { padding-left: 16px; } .alerts li { font-size: 13px; margin: 4px 0; } .alerts .alert strong { color: #b00020; }
"""


def build_app(settings: DashboardSettings, client: SyncClient | None = None) -> dash.Dash:
    cluster = is_cluster_sync(settings)
    layout = keys.Layout(settings.stream, settings.shards, cluster)
    client = client or open_sync_client(settings, cluster, socket_timeout=5, socket_connect_timeout=5)
    check_shards_sync(client, settings)  # another shard count would read other keys than the pipeline writes
    # The FastAPI backend: an ASGI app, served by uvicorn (serve), not by a development server.
    app = dash.Dash(__name__, title="wikipulse", update_title="", backend="fastapi")
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

    @app.callback(Output("window", "options"), Input("resolution", "value"))
    def window_options(resolution: Any) -> list[str]:
        return window_choices(resolution)

    @app.callback(
        Output("graph", "figure"),
        Output("domains", "options"),
        Output("h-eps", "children"),
        Output("h-hour", "children"),
        Output("h-active", "children"),
        Output("h-lag", "children"),
        Output("h-publisher", "children"),
        Output("stale-banner", "children"),
        Output("stale-banner", "style"),
        Output("top-5min", "children"),
        Output("top-hour", "children"),
        Output("ticker", "children"),
        Output("selection-error", "children"),
        Output("shown", "data"),
        Input("tick", "n_intervals"),
        *selection_inputs(),
        State("zoom", "data"),
    )
    def refresh(_n: Any, domains: Any, resolution: Any, window: Any, breakdown: Any, who: Any, ns: Any, zoom: Any) -> tuple[Any, ...]:
        """The whole page over HTTP: on load, on a new selection, and every 2 s for a page without push."""
        try:
            sel = clean_selection(domains, resolution, window, breakdown, who, ns)
        except SelectionError as exc:
            logger.warning("refused a selection from the browser: %s", exc)
            return (*([dash.no_update] * 12), f"Refused: {exc}", dash.no_update)
        return refresh_view(client, settings.stream, layout, sel, zoom, None, hub.mark, None)

    @app.callback(
        Output("download", "data"),
        Input("export", "n_clicks"),
        State("domains", "value"),
        State("resolution", "value"),
        State("window", "value"),
        State("breakdown", "value"),
        State("who", "value"),
        State("ns", "value"),
        prevent_initial_call=True,
    )
    def export(_clicks: Any, domains: Any, resolution: Any, window: Any, breakdown: Any, who: Any, ns: Any) -> Any:
        try:
            sel = clean_selection(domains, resolution, window, breakdown, who, ns)
        except SelectionError:
            raise PreventUpdate from None
        frame = to_frame(read_snapshot(client, settings.stream, sel, layout=layout), sel)
        csv_name = f"wikipulse-{sel.resolution}-{int(time.time())}.csv"
        return dcc.send_data_frame(frame.to_csv, csv_name, index=False)  # type: ignore[attr-defined,no-untyped-call]

    return app


def refresh_view(
    client: SyncClient,
    stream: str,
    layout: keys.Layout,
    sel: Selection,
    zoom: Any,
    shown: Any,
    mark: str,
    since: float | None,
    now: float | None = None,
) -> tuple[Any, ...]:
    """Every output of a refresh, and what the graph then shows (`shown` for the next one). The figure is a Patch of
    the one the page shows when `since` (the earliest bucket moved since it was drawn) allows, reading only the
    buckets it needs; `mark` is the hub's, taken before the read, so whatever moves after it is sent next time."""
    now = time.time() if now is None else now
    state = shown_state(sel, zoom, window_buckets(sel, now), len(sel.domains) * len(sel.dims), mark)
    plan = plan_patch(shown, state, sel.res.step, since)
    snap = read_snapshot(client, stream, sel, now, layout, read_from=None if plan is None else plan.read_from)
    figure, *rest = render(snap, sel, zoom)
    return (figure if plan is None else figure_patch(plan, figure), *rest, state)


PUSH_STATUS_PATH = "/_wikipulse/push"


def selection_inputs() -> list[Input]:
    """The controls that make a Selection (clean_selection's arguments, in its order)."""
    return [Input(control, "value") for control in ("domains", "resolution", "window", "breakdown", "who", "ns")]


REFRESH_OUTPUTS = (("graph", "figure"), ("domains", "options"), ("h-eps", "children"), ("h-hour", "children"),
                   ("h-active", "children"), ("h-lag", "children"), ("h-publisher", "children"), ("stale-banner", "children"),
                   ("stale-banner", "style"), ("top-5min", "children"), ("top-hour", "children"), ("ticker", "children"),
                   ("selection-error", "children"))  # fmt: skip
LIST_OUTPUTS = (("trending", "children"), ("new-pages", "children"), ("alerts", "children"))


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
        """The page says what it shows (view_updates.WATCH_SHOWN): the next push starts from there."""
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


def read_lists(client: SyncClient, layout: keys.Layout, domains: Any, who: Any, ns: Any, trend: Any) -> tuple[Any, ...] | None:
    """Trending pages of the picked wikis, new pages and spike alerts, as the lists show them (None: not domains)."""
    try:
        picked = clean_selection(domains, "10s", None, "total").domains
    except SelectionError:
        return None
    lists = clean_filter(who, ns, trend)
    query = TrendingQuery(layout, int(time.time()), lists.minutes, LIST_SIZE, picked or None, lists.who, lists.namespaces)
    pipe = client.pipeline(transaction=False)
    query.queue_rank(pipe)
    queue_new_pages(pipe, layout)
    pipe.xrevrange(keys.ALERTS, count=ALERTS_SHOWN)
    replies = pipe.execute()
    n = len(layout.all_shards)
    ranked, new, alerts = replies[: -n - 1], replies[-n - 1 : -1], replies[-1]
    query.take_rank(ranked)
    rows = []
    if query.top:
        pipe = client.pipeline(transaction=False)
        query.queue_details(pipe)
        rows = query.take_details(pipe.execute())
    items = take_new_pages(new, LIST_SIZE, picked or None, lists.namespaces, lists.humans, lists.who == "bots")
    return (
        trending_rows(rows),
        new_page_rows(items),
        alert_rows([_parse(fields.get(b"alert", b"")) for _, fields in alerts][:LIST_SIZE]),
        [list(picked), lists.who, lists.namespace, lists.minutes],  # what they show, for the push (lists-shown)
    )


def register_lists(app: dash.Dash, client: SyncClient, layout: keys.Layout) -> None:
    """Trending pages of the picked wikis, new pages and spike alerts: pushed at most every LISTS_MS while the data
    moves (polled at that beat without push), and at once on a change of the picked wikis or the filters."""

    @app.callback(
        Output("trending", "children"),
        Output("new-pages", "children"),
        Output("alerts", "children"),
        Output("lists-shown", "data"),
        Input("lists-tick", "n_intervals"),
        Input("domains", "value"),
        Input("who", "value"),
        Input("ns", "value"),
        Input("trend", "value"),
    )
    def refresh_lists(_n: Any, domains: Any, who: Any, ns: Any, trend: Any) -> tuple[Any, ...]:
        lists = read_lists(client, layout, domains, who, ns, trend)
        if lists is None:
            raise PreventUpdate
        return lists


def register_selection_callbacks(app: dash.Dash, client: SyncClient, layout: keys.Layout) -> None:
    """The selection lives in the URL: read once per page load, then kept in step with the controls."""

    @app.callback(
        Output("domains", "value"),
        Output("resolution", "value"),
        Output("window", "value"),
        Output("breakdown", "value"),
        Output("who", "value"),
        Output("ns", "value"),
        Output("trend", "value"),
        Output("initialized", "data"),
        Output("domains", "options", allow_duplicate=True),
        Input("url", "pathname"),
        State("url", "search"),
        State("initialized", "data"),
        prevent_initial_call="initial_duplicate",
    )
    def selection_from_url(_path: Any, search: Any, initialized: Any) -> tuple[Any, ...]:
        """Once per page load: the URL's selection (a reload or a shared link), else the most active domains.
        Triggered by the path, not the query it reads: selection_to_url writes the query, and that cycle stalls
        Dash's renderer once the page has a websocket callback (push)."""
        if initialized:
            raise PreventUpdate
        wanted = selection_from_query(search)
        ranked = ranked_desc(_ranked(client, layout))
        try:
            sel = clean_selection(wanted["domains"] or default_domains(ranked), wanted["resolution"] or "10s",
                                  wanted["window"], wanted["breakdown"] or "total", wanted["who"], wanted["ns"])  # fmt: skip
        except SelectionError as exc:
            logger.warning("refused a selection from the URL: %s", exc)
            sel = clean_selection(default_domains(ranked), "10s", None, "total")
        lists = clean_filter(sel.who, wanted["ns"], wanted["trend"])
        # The picker drops values missing from its options: send both together.
        return (list(sel.domains), sel.resolution, sel.window, sel.breakdown, sel.who, lists.namespace, lists.minutes, True,
                domain_options(ranked, sel))  # fmt: skip

    @app.callback(
        Output("url", "search"),
        *selection_inputs(),
        Input("trend", "value"),
        State("initialized", "data"),
        State("url", "search"),
    )
    def selection_to_url(
        domains: Any, resolution: Any, window: Any, breakdown: Any, who: Any, ns: Any, trend: Any, initialized: Any, search: Any
    ) -> Any:
        """The URL follows the controls, so a reload shows the same page."""
        if not initialized:
            raise PreventUpdate
        try:
            lists = clean_filter(who, ns, trend)
            query = query_from_selection(clean_selection(domains, resolution, window, breakdown, who, lists.namespace), lists.minutes)
        except SelectionError:
            raise PreventUpdate from None
        return dash.no_update if query == search else query

    # The user's zoom, per axis, tagged with the figure's uirevision so a new selection drops it.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        """function (relayout, figure, zoom) {
            if (!relayout || !figure) { return dash_clientside.no_update; }
            const rev = figure.layout.uirevision;
            const next = zoom && zoom.rev === rev ? {...zoom} : {rev: rev};
            for (const axis of ["xaxis", "yaxis"]) {
                const low = relayout[axis + ".range[0]"], high = relayout[axis + ".range[1]"];
                if (low !== undefined) { next[axis] = [low, high]; }
                else if (relayout[axis + ".range"]) { next[axis] = relayout[axis + ".range"]; }
                else if (relayout[axis + ".autorange"]) { delete next[axis]; }
            }
            return next;
        }""",
        Output("zoom", "data"),
        Input("graph", "relayoutData"),
        State("graph", "figure"),
        State("zoom", "data"),
        prevent_initial_call=True,
    )

    # In the browser, not on the server: the top lists are re-rendered every refresh, and new buttons fire this
    # callback again; a server round trip in flight would be superseded by that call and the click lost.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        """function (_clicks, domains) {
            const picked = domains || [];
            const hit = dash_clientside.callback_context.triggered.find(t => t.value);
            if (!hit) { return dash_clientside.no_update; }
            const domain = JSON.parse(hit.prop_id.slice(0, hit.prop_id.lastIndexOf("."))).domain;
            return picked.includes(domain) ? dash_clientside.no_update : [...picked, domain];
        }""",
        Output("domains", "value", allow_duplicate=True),
        Input({"type": "top", "domain": ALL}, "n_clicks"),
        State("domains", "value"),
        prevent_initial_call=True,
    )


def _ranked(client: SyncClient, layout: keys.Layout) -> list[tuple[str, float]]:
    pipe = client.pipeline(transaction=False)
    queue_ranking(pipe, layout, int(time.time()), 3600)
    return merge_ranking(layout, pipe.execute())[0]


def render(snap: Snapshot, sel: Selection, zoom: Any = None) -> tuple[Any, ...]:
    """Every output of a refresh, from a snapshot (pure)."""
    head = header(snap)
    hour = ranked_desc(snap.ranked_hour)
    options = domain_options(hour, sel)
    stale = stale_seconds(snap)
    banner = "" if stale is None else ("No events have arrived yet." if stale == float("inf") else f"Stale: no events for {int(stale)} s.")
    banner = " ".join(filter(None, (banner, trimmed_notice(snap), ahead_notice(snap))))
    banner_style = {"display": "block"} if banner else {"display": "none"}
    figure = make_figure(snap, sel, zoom)
    if snap.buckets:
        shapes, notes = alert_marks(snap.alerts, sel, snap.buckets[0], snap.buckets[-1] + sel.res.step)
        figure["layout"]["shapes"] = [*figure["layout"]["shapes"], *shapes]
        figure["layout"]["annotations"] = [*figure["layout"]["annotations"], *notes]
    return (
        figure,
        options,
        head["eps"],
        head["hour"],
        head["active"],
        head["lag"],
        head["publisher"],
        banner,
        banner_style,
        top_list(ranked_desc(snap.ranked_5min)),
        top_list(hour),
        ticker(snap),
        "",
    )


def domain_options(ranked: list[tuple[str, float]], sel: Selection) -> list[dict[str, str]]:
    """Active domains by events in the last hour, then any picked domain that is quiet."""
    active = {d for d, _ in ranked}
    options = [{"label": f"{d}  ({int(n):,}/h)", "value": d} for d, n in ranked]
    return options + [{"label": d, "value": d} for d in sel.domains if d not in active]


def top_list(ranked: list[tuple[str, float]]) -> list[html.Button]:
    return [html.Button(f"{d} · {int(n):,}", id={"type": "top", "domain": d}, title=f"add {d} to the graph") for d, n in ranked[:TOP_SIZE]]


def ticker(snap: Snapshot) -> list[html.Tr]:
    rows = []
    for r in ticker_rows(snap.latest):
        title: Any = html.A(r["title"], href=r["url"], target="_blank", rel="noopener noreferrer") if r["url"] else r["title"]
        rows.append(
            html.Tr([html.Td(r["domain"]), html.Td(r["type"]), html.Td(title), html.Td(r["user"]), html.Td("bot" if r["bot"] else "")])
        )
    return rows


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
