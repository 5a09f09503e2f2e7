"""The live page's callbacks over HTTP: the selection kept in the URL, the refresh (the whole page, or a Patch of the
figure, refresh_view), the CSV export and the lists."""

from __future__ import annotations

import logging
import time
from typing import Any

import dash
from dash import ALL, Input, Output, State, dcc
from dash.exceptions import PreventUpdate

from wikipulse.dashboard.data import ranked_desc, read_lists, read_ranked, read_snapshot, window_buckets
from wikipulse.dashboard.figure_patch import figure_patch, plan_patch, shown_state
from wikipulse.dashboard.layout import domain_options, render
from wikipulse.dashboard.lists_view import clean_filter
from wikipulse.dashboard.push import NoticeHub
from wikipulse.dashboard.view import (
    Selection,
    SelectionError,
    clean_selection,
    default_domains,
    query_from_selection,
    selection_from_query,
    to_frame,
    window_choices,
)
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient

logger = logging.getLogger(__name__)


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


def selection_inputs() -> list[Input]:
    """The controls that make a Selection (clean_selection's arguments, in its order)."""
    return [Input(control, "value") for control in ("domains", "resolution", "window", "breakdown", "who", "ns")]


REFRESH_OUTPUTS = (("graph", "figure"), ("domains", "options"), ("h-eps", "children"), ("h-hour", "children"),
                   ("h-active", "children"), ("h-lag", "children"), ("h-publisher", "children"), ("stale-banner", "children"),
                   ("stale-banner", "style"), ("top-5min", "children"), ("top-hour", "children"), ("ticker", "children"),
                   ("selection-error", "children"))  # fmt: skip
LIST_OUTPUTS = (("trending", "children"), ("new-pages", "children"), ("alerts", "children"))


def register_refresh(app: dash.Dash, client: SyncClient, stream: str, layout: keys.Layout, hub: NoticeHub) -> None:
    """The whole page over HTTP (on load, on a new selection, every REFRESH_MS without push), the CSV export."""

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
        return refresh_view(client, stream, layout, sel, zoom, None, hub.mark, None)

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
        frame = to_frame(read_snapshot(client, stream, sel, layout=layout), sel)
        csv_name = f"wikipulse-{sel.resolution}-{int(time.time())}.csv"
        return dcc.send_data_frame(frame.to_csv, csv_name, index=False)  # type: ignore[attr-defined,no-untyped-call]


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
        ranked = ranked_desc(read_ranked(client, layout))
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
