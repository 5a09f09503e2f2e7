"""The History view at `/history`: any range the archive holds, for the picked wikis. Its own page: its own Dash app
(layout and callbacks apart from the live page's, whose push and polling it has no use for), served by the live
page's FastAPI server under PATH.

It reads the archive as `sql` does (reader.archive_query): through the archiver's read-only endpoint, or the ClickHouse
server of CLICKHOUSE_URL, with their limits. It never opens the embedded directory itself: that would keep the
archiver from it. With no archive running the page says so. What it asks and how the answers are shaped is pure
(history_queries.py); the callbacks here only validate, ask and hand over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import dash
import orjson
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate
from starlette.routing import Route

from wikipulse.archive.reader import ArchiveNotRunning, archive_query
from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.events import is_valid_domain
from wikipulse.core.settings import ArchiveSettings
from wikipulse.dashboard.history_queries import (
    BY_LABELS,
    EARLIEST,
    LATEST,
    Extent,
    HistoryError,
    HistorySelection,
    clean_selection,
    default_last_day,
    domains_sql,
    extent_of,
    extent_sql,
    graph_figure,
    search_from_selection,
    selection_from_search,
    total_of,
)
from wikipulse.dashboard.history_rollups import EDITORS, PAGES, graph_query, plan, top_list, total_query
from wikipulse.fold.trending import links

logger = logging.getLogger(__name__)

PATH = "/history"
Ask = Callable[[str], list[dict[str, Any]]]
ARCHIVE_ERRORS = (OperatorError, SettingsError, OSError)  # refused, unreachable, or too slow to answer (a socket timeout)
NO_ARCHIVE = (
    "No archive is running, so there is no history to show. The History view reads the archive through the archiver "
    "(`python -m wikipulse archive`, or `up`) or a ClickHouse server (CLICKHOUSE_URL)."
)


def archive_reader(settings: ArchiveSettings) -> Ask:
    """A query's rows, through the archiver or CLICKHOUSE_URL (never the embedded directory: see the module)."""

    def ask(sql: str) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in archive_query(settings, sql, embedded=False).splitlines() if line]

    return ask


def failure_text(exc: Exception) -> str:
    if isinstance(exc, ArchiveNotRunning):
        return f"{NO_ARCHIVE} ({exc})"
    if isinstance(exc, OperatorError | SettingsError):
        return f"The archive refused the query: {str(exc)[:400]}"
    return f"The archive did not answer: {str(exc)[:200]}"


def contributions_url(domain: str, user: str) -> str:
    """The editor's contributions on their wiki; the name is URL-quoted, never pasted raw."""
    return f"https://{domain}/wiki/Special:Contributions/{quote(user.replace(' ', '_'), safe='')}"


def _link(text: str, url: str | None, class_name: str) -> Any:
    # Titles and names reach the page as text children only; a link only to a wiki whose name is a host name.
    if url is None:
        return text
    return html.A(text, href=url, target="_blank", rel="noopener noreferrer", className=class_name)


def page_rows(rows: list[dict[str, Any]]) -> list[html.Tr]:
    if not rows:
        return [html.Tr(html.Td("No edits in this range.", colSpan=5))]
    out = [html.Tr([html.Th("page"), html.Th("wiki"), html.Th("edits"), html.Th("created"), html.Th("by bots")])]
    for row in rows:
        domain, title = str(row.get("site", "")), str(row.get("page", ""))
        url = links(domain, title)["history"] if is_valid_domain(domain) else None
        cells = [_link(title[:120], url, "history-title"), domain[:80], f"{int(row['edits']):,}", f"{int(row['created']):,}",
                 f"{int(row['by_bots']):,}"]  # fmt: skip
        out.append(html.Tr([html.Td(c) for c in cells]))
    return out


def editor_rows(rows: list[dict[str, Any]]) -> list[html.Tr]:
    if not rows:
        return [html.Tr(html.Td("No edits in this range.", colSpan=5))]
    out = [html.Tr([html.Th("editor"), html.Th("wiki"), html.Th("edits"), html.Th("pages created"), html.Th("bot")])]
    for row in rows:
        domain, user = str(row.get("site", "")), str(row.get("editor", ""))
        url = contributions_url(domain, user) if is_valid_domain(domain) else None
        cells = [_link(user[:60], url, "history-user"), domain[:80], f"{int(row['edits']):,}", f"{int(row['created']):,}",
                 "yes" if row.get("bot") else ""]  # fmt: skip
        out.append(html.Tr([html.Td(c) for c in cells]))
    return out


def layout() -> html.Div:
    """A function, so every page load gets fresh defaults."""
    return html.Div(
        [
            dcc.Location(id="history-url", refresh=False),
            dcc.Store(id="history-ready", data=False),
            html.H1(["wikipulse · history", html.A("← live page", id="live-link", href="/", className="nav")]),
            html.Div(id="history-extent", className="extent"),
            html.Div(
                [
                    dcc.Dropdown(
                        id="history-domains", multi=True, searchable=True, placeholder="Every wiki (or pick some)…", options=[], value=[]
                    ),
                    dcc.DatePickerRange(
                        id="history-range",
                        display_format="YYYY-MM-DD",
                        minimum_nights=0,
                        clearable=False,
                        min_date_allowed=EARLIEST.isoformat(),
                        max_date_allowed=LATEST.isoformat(),
                    ),
                    html.Span("split by:"),
                    dcc.RadioItems(
                        id="history-by", options=[{"label": v, "value": k} for k, v in BY_LABELS.items()], value="type", inline=True
                    ),
                ],
                className="history-controls",
            ),
            html.Div(id="history-refused", className="error"),
            html.Div(id="history-message", className="error"),
            html.Div(
                [html.Span("events in the selection: "), html.Strong("–", id="history-total"), html.Span(id="history-resolution")],
                className="history-total",
            ),
            dcc.Graph(id="history-graph", config={"displaylogo": False}),
            html.Div(
                [
                    html.Div([html.H3("Top pages"), html.Table(id="history-pages")], className="ticker"),
                    html.Div([html.H3("Top editors"), html.Table(id="history-editors")], className="ticker"),
                ],
                className="history-lists",
            ),
        ],
        className="page",
    )


CSS = """
h1 .nav { font-size: 14px; font-weight: normal; margin-left: 16px; }
.history-controls { display: grid; grid-template-columns: 1fr auto auto auto; gap: 12px; align-items: center; margin: 12px 0; }
.history-total { font-size: 18px; margin: 8px 0; } .history-total span:last-child { color: #666; font-size: 13px; margin-left: 12px; }
.extent { color: #666; font-size: 13px; }
.history-lists { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; margin-top: 12px; }
.history-lists th { text-align: left; font-size: 12px; color: #666; }
"""


def _today() -> date:
    return datetime.now(UTC).date()


def load(ask: Ask, search: Any, today: date) -> tuple[Any, ...]:
    """Once per page load: the URL's selection into the controls, the picker's wikis and what the archive holds.
    A refused URL says why, and the page shows the default selection instead."""
    extent, options, note = Extent(None, None, 0), [], ""
    try:
        extent = extent_of(ask(extent_sql()))
        options = [str(row["domain"]) for row in ask(domains_sql()) if is_valid_domain(row.get("domain"))]
        note = extent.text
    except ARCHIVE_ERRORS as exc:
        note = failure_text(exc)
    last = default_last_day(extent, today)
    refused = ""
    try:
        sel = selection_from_search(search, last)
    except HistoryError as exc:
        refused = f"Refused the address: {exc}. Showing the last days the archive holds instead."
        sel = clean_selection(None, None, None, None, last)
    picker = [{"label": d, "value": d} for d in dict.fromkeys([*sel.domains, *options])]
    return list(sel.domains), picker, sel.first_day, sel.last_day, sel.by, True, note, refused


def show(ask: Ask, sel: HistorySelection) -> tuple[Any, ...]:
    """The selection's total, graph, top pages and top editors, or what kept the archive from answering."""
    resolution = f" · one bar per {sel.bucket.name}"
    try:
        covered = plan(ask, sel)  # the days the rollups answer, the rest from the events (history_rollups.py)
        total = total_of(ask(total_query(sel, covered)))
        figure = graph_figure(ask(graph_query(sel, covered)), sel)
        pages, editors = top_list(ask, PAGES, sel, covered), top_list(ask, EDITORS, sel, covered)
    except ARCHIVE_ERRORS as exc:
        logger.warning("history: %s", exc)
        return "–", {"data": [], "layout": {}}, [], [], failure_text(exc), ""
    return f"{total:,}", figure, page_rows(pages), editor_rows(editors), "", resolution


def register_callbacks(app: dash.Dash, ask: Ask, today: Callable[[], date] = _today) -> None:
    @app.callback(
        Output("history-domains", "value"),
        Output("history-domains", "options"),
        Output("history-range", "start_date"),
        Output("history-range", "end_date"),
        Output("history-by", "value"),
        Output("history-ready", "data"),
        Output("history-extent", "children"),
        Output("history-refused", "children"),
        Input("history-url", "pathname"),
        State("history-url", "search"),
        State("history-ready", "data"),
    )
    def from_url(_path: Any, search: Any, ready: Any) -> tuple[Any, ...]:
        # Triggered by the path, not the query it reads: to_url writes the query (the live page does the same).
        if ready is True:
            raise PreventUpdate
        return load(ask, search, today())

    @app.callback(
        Output("history-url", "search"),
        Input("history-domains", "value"),
        Input("history-range", "start_date"),
        Input("history-range", "end_date"),
        Input("history-by", "value"),
        State("history-ready", "data"),
        State("history-url", "search"),
    )
    def to_url(domains: Any, since: Any, until: Any, by: Any, ready: Any, search: Any) -> Any:
        """The URL follows the controls, so it can be shared and a reload shows the same page."""
        if ready is not True:
            raise PreventUpdate
        try:
            query = search_from_selection(clean_selection(domains, since, until, by, today()))
        except HistoryError:
            raise PreventUpdate from None
        return dash.no_update if query == search else query

    @app.callback(
        Output("history-total", "children"),
        Output("history-graph", "figure"),
        Output("history-pages", "children"),
        Output("history-editors", "children"),
        Output("history-message", "children"),
        Output("history-resolution", "children"),
        Input("history-domains", "value"),
        Input("history-range", "start_date"),
        Input("history-range", "end_date"),
        Input("history-by", "value"),
        Input("history-ready", "data"),
    )
    def results(domains: Any, since: Any, until: Any, by: Any, ready: Any) -> tuple[Any, ...]:
        if ready is not True:
            raise PreventUpdate
        try:
            sel = clean_selection(domains, since, until, by, today())
        except HistoryError as exc:
            logger.warning("history: refused a selection from the browser: %s", exc)
            return "–", {"data": [], "layout": {}}, [], [], f"Refused: {exc}", ""
        return show(ask, sel)

    # In the browser: the live page's wikis for the way back.
    app.clientside_callback(  # type: ignore[no-untyped-call]
        """function (domains) {
            const picked = Array.isArray(domains) ? domains.filter(d => typeof d === "string") : [];
            return "/" + (picked.length ? "?domains=" + encodeURIComponent(picked.join(",")) : "");
        }""",
        Output("live-link", "href"),
        Input("history-domains", "value"),
    )


def register_live_link(app: dash.Dash) -> None:
    """The live page's link to History keeps its picked wikis (the page's layout has an `a#history-link`)."""
    app.clientside_callback(  # type: ignore[no-untyped-call]
        f"""function (domains) {{
            const picked = Array.isArray(domains) ? domains.filter(d => typeof d === "string") : [];
            return "{PATH}" + (picked.length ? "?domains=" + encodeURIComponent(picked.join(",")) : "");
        }}""",
        Output("history-link", "href"),
        Input("domains", "value"),
    )


def mount_history(app: dash.Dash, settings: ArchiveSettings, css: str = "", ask: Ask | None = None) -> dash.Dash:
    """Serve the History view at PATH on the live page's server, and link the live page to it."""
    from dash import _get_app

    live = _get_app.APP
    history = dash.Dash(__name__, title="wikipulse · history", update_title="", backend="fastapi",
                        requests_pathname_prefix=PATH + "/", routes_pathname_prefix=PATH + "/")  # fmt: skip
    # A new Dash() makes itself the process's "current app", which the FastAPI backend asks at startup where to route
    # the paths no route takes: that stays the live page.
    _get_app.APP = live
    history.layout = layout
    history.index_string = history.index_string.replace("{%css%}", "{%css%}<style>" + css + CSS + "</style>")
    register_callbacks(history, ask or archive_reader(settings))

    async def index() -> Any:
        from fastapi.responses import HTMLResponse

        return HTMLResponse(history.index())  # type: ignore[no-untyped-call]

    history.server.add_api_route(PATH, index, methods=["GET"])  # /history itself; Dash serves /history/ and below
    # Every path under PATH goes to the History app as it is (its routes carry the prefix), ahead of the live page's
    # catch-all route, which the backend adds at startup.
    app.server.router.routes.append(Route(PATH + "{rest:path}", history.server))
    register_live_link(app)
    return history
