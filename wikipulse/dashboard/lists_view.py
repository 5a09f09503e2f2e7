"""What the page's lists show (trending pages, new pages, spike alerts) and the alert marks on the graph: pure.

Every title, user and domain from the feed reaches the page as a Dash text child or a URL built by
trending.links (quoted), never as HTML, so a hostile title is shown as the text it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dash import html

from wikipulse.dashboard.view import NAMESPACES, Selection, utc_iso
from wikipulse.fold.trending import Trend, links
from wikipulse.store import keys

WHO_LABELS = {"all": "everyone", "humans": "humans", "bots": "bots"}
LIST_SIZE = 12


@dataclass(frozen=True)
class ListFilter:
    """The lists' filters, as the URL keeps them: who=all|humans|bots, ns=all|<namespace>, trend=5|60."""

    who: str = "all"
    namespace: str = "all"
    minutes: int = 5

    @property
    def namespaces(self) -> list[int] | None:
        return None if self.namespace == "all" else [int(self.namespace)]

    @property
    def humans(self) -> bool:
        return self.who == "humans"


def clean_filter(who: Any, namespace: Any, minutes: Any) -> ListFilter:
    """Anything the browser sends outside the choices falls back to the default (these name no Redis key)."""
    return ListFilter(
        who if isinstance(who, str) and who in WHO_LABELS else "all",
        namespace if isinstance(namespace, str) and namespace in NAMESPACES else "all",
        minutes if minutes in keys.TREND_WINDOWS else 5,
    )


def _pretty_bytes(n: int) -> str:
    return f"{n:+,}"


def trending_rows(rows: list[Trend]) -> list[html.Tr]:
    if not rows:
        return [html.Tr(html.Td("No edits in this window yet.", colSpan=5))]
    out = [html.Tr([html.Th("page"), html.Th("wiki"), html.Th("edits"), html.Th("editors"), html.Th("bytes")])]
    for row in rows:
        url = links(row.domain, row.title)["history"]
        out.append(
            html.Tr(
                [
                    html.Td(html.A(row.title[:120], href=url, target="_blank", rel="noopener noreferrer", className="trend-title")),
                    html.Td(row.domain),
                    html.Td(f"{row.edits:,}"),
                    html.Td(f"{row.editors:,}"),
                    html.Td(_pretty_bytes(row.bytes_changed)),
                ]
            )
        )
    return out


def _clock(t: Any) -> str:
    return datetime.fromtimestamp(int(t), UTC).strftime("%H:%M:%S") if isinstance(t, (int, float)) else ""


def new_page_rows(items: list[dict[str, Any]]) -> list[html.Tr]:
    if not items:
        return [html.Tr(html.Td("No new pages yet.", colSpan=4))]
    out = []
    for item in items:
        url = links(str(item["domain"]), str(item["title"]), item.get("revision"))
        target = url.get("diff", url["history"])
        out.append(
            html.Tr(
                [
                    html.Td(_clock(item.get("time"))),
                    html.Td(
                        html.A(str(item["title"])[:120], href=target, target="_blank", rel="noopener noreferrer", className="new-title")
                    ),
                    html.Td(str(item["domain"])),
                    html.Td(str(item.get("user", ""))[:60]),
                ]
            )
        )
    return out


def alert_rows(alerts: list[dict[str, Any]]) -> list[html.Li]:
    if not alerts:
        return [html.Li("No spikes in the last hours.", className="quiet")]
    out = []
    for alert in alerts:
        top = ", ".join(str(title)[:60] for title, _ in alert.get("top", [])[:3])
        text = f"{_clock(alert.get('minute'))} {alert.get('domain')}: {alert.get('rate'):,}/min, usually {alert.get('baseline', 0):,.0f}"
        out.append(html.Li([html.Strong(text), html.Span(f" · {top}" if top else "")], className="alert"))
    return out


def alert_marks(alerts: list[dict[str, Any]], sel: Selection, first: int, end: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shapes and annotations marking the picked wikis' alerts inside the graph's range [first, end)."""
    shapes, notes = [], []
    for alert in alerts:
        minute = alert.get("minute")
        if alert.get("domain") not in sel.domains or not isinstance(minute, int) or not first <= minute < end:
            continue
        x = utc_iso(minute)
        shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": x, "x1": x, "y0": 0, "y1": 1,
                       "line": {"color": "#b00020", "width": 1, "dash": "dot"}})  # fmt: skip
        notes.append({"x": x, "y": 0.95, "xref": "x", "yref": "paper", "text": f"spike · {alert['domain']}", "showarrow": False,
                      "xanchor": "left", "font": {"color": "#b00020", "size": 11}, "name": "spike"})  # fmt: skip
    return shapes, notes
