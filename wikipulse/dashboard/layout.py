"""The live page's components: the layout every page load gets, its CSS, and the components a refresh renders from
a snapshot (`render`, pure)."""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from wikipulse.dashboard.data import ranked_desc
from wikipulse.dashboard.history_page import PATH as HISTORY_PATH
from wikipulse.dashboard.lists_view import WHO_LABELS, alert_marks
from wikipulse.dashboard.view import (
    BREAKDOWNS,
    NAMESPACES,
    WINDOWS,
    Selection,
    Snapshot,
    ahead_notice,
    header,
    make_figure,
    stale_seconds,
    ticker_rows,
    trimmed_notice,
)
from wikipulse.store import keys

REFRESH_MS = 2000
LISTS_MS = 5000
TOP_SIZE = 10


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
