"""What the dashboard shows, computed from plain values: pure, testable without Redis or a browser.

Data shapes:
  Selection   validated choices from the browser (domains, resolution, window, breakdown)
  Snapshot    what one pipelined Redis round trip returned, already decoded
  series      {domain: {dimension: [count or None per bucket]}}; '' is the total
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pandas as pd

from wikipulse.core import model
from wikipulse.core.events import is_valid_domain
from wikipulse.core.settings import parse_duration
from wikipulse.store import keys
from wikipulse.store.status import STALE_AFTER
from wikipulse.store.trimming import trimmed_unread

# The work one page refresh may ask for. A refresh reads one HGETALL per domain and window hash and sends
# every point of every trace: ten domains by type over the longest window (120 d of 1 h, 2,880 buckets a trace)
# are ~30 k points and 2,400 HGETALLs at most (12 domains of 1 h over 400 days were 10,000 HGETALLs, 15 MB and 2 s
# a request before these caps). Longer ranges are for `counts` (and its coarser resolutions).
MAX_DOMAINS = 10  # picked at once
WINDOWS = {
    "10s": ("10m", "30m", "1h", "6h"),
    "1m": ("1h", "6h", "24h", "2d"),
    "1h": ("24h", "7d", "30d", "120d"),
}
DEFAULT_WINDOW = {"10s": "30m", "1m": "6h", "1h": "7d"}
BREAKDOWNS = {"total": ("",), "type": model.EVENT_TYPES, "bot": model.BOT_DIMENSIONS}
NAMESPACES = {"all": "all namespaces", "0": "articles", "1": "talk", "2": "user", "4": "project", "6": "file", "14": "category"}
assert {str(k) for k in model.GRAPH_NAMESPACES} <= set(NAMESPACES)
WHO_DIMENSION = {"all": "", "humans": "human", "bots": "bot"}


class SelectionError(ValueError):
    """A value from the browser that may not become part of a Redis key."""


WHO = model.WHO


@dataclass(frozen=True)
class Selection:
    domains: tuple[str, ...]
    resolution: str = "10s"
    window: str = "30m"
    breakdown: str = "total"
    who: str = "all"  # the total of humans or of bots only (the by-type breakdown has no such split in Redis)
    namespace: str = "all"  # or one of NAMESPACES: the lists' filter; the graph's where model.GRAPH_NAMESPACES has it

    @property
    def res(self) -> model.Resolution:
        return model.RESOLUTION_BY_NAME[self.resolution]

    @property
    def seconds(self) -> int:
        return parse_duration(self.window)

    @property
    def graph_namespace(self) -> int | None:
        """The namespace the graph's total and bot breakdown narrow to (None: every namespace)."""
        if self.namespace == "all" or self.breakdown == "type" or int(self.namespace) not in model.GRAPH_NAMESPACES:
            return None
        return int(self.namespace)

    @property
    def dims(self) -> tuple[str, ...]:
        namespace = self.graph_namespace
        if namespace is not None:
            if self.breakdown == "bot":
                return tuple(keys.namespace_dimension(namespace, who) for who in model.BOT_DIMENSIONS)
            return (keys.namespace_dimension(namespace, WHO_DIMENSION[self.who]),)
        if self.breakdown == "total" and self.who != "all":
            return (WHO_DIMENSION[self.who],)
        return BREAKDOWNS[self.breakdown]


def dimension_label(dim: str) -> str:
    """How a trace names its dimension: "bot", "articles", "articles · human"."""
    match = re.fullmatch(r"ns(\d+)(human|bot)?", dim)
    if match is None:
        return dim
    label = NAMESPACES.get(match[1], f"namespace {match[1]}")
    return label if match[2] is None else f"{label} · {match[2]}"


def clean_selection(domains: Any, resolution: Any, window: Any, breakdown: Any, who: Any = "all", namespace: Any = "all") -> Selection:
    """Validate everything the browser sent before any of it names a Redis key. A crafted request can
    send any JSON for any value (a list, an object, a number): each is checked for its type first."""
    if domains is None:
        domains = []
    if isinstance(domains, str):
        domains = [domains]
    if not isinstance(domains, list) or len(domains) > MAX_DOMAINS:
        raise SelectionError(f"domains must be a list of at most {MAX_DOMAINS}")
    bad = [d for d in domains if not isinstance(d, str) or not is_valid_domain(d)]
    if bad:
        raise SelectionError(f"not a domain: {str(bad[0])[:80]!r}")
    if not isinstance(resolution, str) or resolution not in model.RESOLUTION_BY_NAME:
        raise SelectionError(f"unknown resolution: {str(resolution)[:20]!r}")
    if not isinstance(window, str) or window not in WINDOWS[resolution]:
        window = DEFAULT_WINDOW[resolution]  # none yet, or after switching resolution: fall back, do not fail
    if not isinstance(breakdown, str) or breakdown not in BREAKDOWNS:
        raise SelectionError(f"unknown breakdown: {str(breakdown)[:20]!r}")
    namespace = namespace if isinstance(namespace, str) and namespace in NAMESPACES else "all"
    return Selection(tuple(dict.fromkeys(domains)), resolution, window, breakdown, who if who in WHO else "all", namespace)


def window_choices(resolution: Any) -> list[str]:
    return list(WINDOWS[resolution] if isinstance(resolution, str) and resolution in WINDOWS else WINDOWS["10s"])


def selection_from_query(search: Any) -> dict[str, Any]:
    """`?domains=a,b&res=1m&window=6h&by=type&who=humans&ns=0&trend=60` -> the raw values (validated later)."""
    query = parse_qs((search if isinstance(search, str) else "").lstrip("?"))
    first = {k: v[0] for k, v in query.items() if v}
    domains = [d for d in first.get("domains", "").split(",") if d]
    trend = first.get("trend", "")
    trend_value = int(trend) if trend.isascii() and trend.isdigit() and len(trend) < 6 else None  # "²" is a digit int() refuses
    return {
        "domains": domains, "resolution": first.get("res"), "window": first.get("window"), "breakdown": first.get("by"),
        "who": first.get("who"), "ns": first.get("ns"), "trend": trend_value,
    }  # fmt: skip


def query_from_selection(sel: Selection, trend: int = 5) -> str:
    return "?" + urlencode({
        "domains": ",".join(sel.domains), "res": sel.resolution, "window": sel.window, "by": sel.breakdown, "who": sel.who,
        "ns": sel.namespace, "trend": trend,
    })  # fmt: skip


def default_domains(ranked: list[tuple[str, float]], n: int = 3) -> list[str]:
    """The n most active domains, en.wikipedia.org among them when it is active at all."""
    names = [d for d, _ in ranked]
    top = names[:n]
    if "en.wikipedia.org" in names and "en.wikipedia.org" not in top:
        top = [*top[: n - 1], "en.wikipedia.org"]
    return top


@dataclass
class Snapshot:
    now: float
    buckets: list[int]
    series: dict[str, dict[str, list[int | None]]]  # includes keys.ALL_DOMAINS totals
    ranked_hour: list[tuple[str, float]] = field(default_factory=list)
    ranked_5min: list[tuple[str, float]] = field(default_factory=list)
    publisher: dict[str, Any] = field(default_factory=dict)
    recent_10s: list[int | None] = field(default_factory=list)  # global totals, last few 10 s buckets
    last_hour_1m: list[int | None] = field(default_factory=list)  # global totals, last 60 minutes
    latest: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # spike alerts, newest first (spikes.py)


def fill_gaps(values: list[int | None], pipeline_up: list[bool]) -> list[int | None]:
    """A missing bucket is 0 where the pipeline recorded anything at all, and a gap (None) where it did not."""
    return [v if v is not None else (0 if up else None) for v, up in zip(values, pipeline_up, strict=True)]


def utc_iso(t: int) -> str:
    """A bucket start as the naive UTC timestamp Plotly's date axis reads."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def ui_revision(sel: Selection) -> str:
    """Plotly keeps UI state (hidden traces) while this stays the same; a new selection starts afresh."""
    return f"{','.join(sel.domains)}|{sel.resolution}|{sel.window}|{sel.breakdown}|{sel.who}|{sel.namespace}"


def zoomed_ranges(zoom: Any, sel: Selection) -> dict[str, list[Any]]:
    """{axis: [low, high]} the user zoomed to for this selection, from the browser's zoom store.

    The zoom is applied by the server, not left to uirevision: Dash re-plots the figure object that
    Plotly mutated on a zoom, which erases Plotly's record of the zoom (checked in Chromium)."""
    if not isinstance(zoom, dict) or zoom.get("rev") != ui_revision(sel):
        return {}
    out = {}
    for axis in ("xaxis", "yaxis"):
        r = zoom.get(axis)
        if isinstance(r, list) and len(r) == 2 and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in r):
            out[axis] = [str(v)[:40] if isinstance(v, str) else v for v in r]
    return out


MAX_FILLING_LAG = 300.0  # a longer ingest lag is an outage (the stale banner), not buckets still filling
EMIT_DELAY = 10  # seconds the feed takes from a change (`timestamp`) to emitting it (`meta.dt`), about


def filling_from(snap: Snapshot, step: int) -> int:
    """The first bucket still filling: events arrive the emit delay plus the ingest lag after they
    happen, so every bucket that ended less than that ago may still grow, not only the current one."""
    lag = snap.publisher.get("lag_seconds")
    lag = min(max(float(lag), 0.0), MAX_FILLING_LAG) if isinstance(lag, (int, float)) else 0.0
    t = int(snap.now - lag - EMIT_DELAY)
    return max(snap.buckets[0], min(snap.buckets[-1], t - t % step))


def make_figure(snap: Snapshot, sel: Selection, zoom: Any = None) -> dict[str, Any]:
    """Events per bucket for each picked domain (and dimension), gaps where the pipeline was down.

    A plain Plotly figure dict, not a `go.Figure`: validating every point through graph_objects costs
    more than the whole rest of a refresh (BENCHMARKS.md); tests check the dict against those validators.
    """
    x = [utc_iso(b) for b in snap.buckets]
    totals = snap.series.get(keys.ALL_DOMAINS, {}).get("", [None] * len(snap.buckets))
    up = [v is not None for v in totals]
    traces = []
    for domain in sel.domains:
        for dim in sel.dims:
            values = fill_gaps(snap.series.get(domain, {}).get(dim, [None] * len(snap.buckets)), up)
            name = domain if dim == "" else f"{domain} · {dimension_label(dim)}"
            trace = {"type": "scatter", "x": x, "y": values, "mode": "lines", "name": name, "connectgaps": False, "line": {"width": 2}}
            traces.append(trace)
    shapes, annotations = [], []
    if snap.buckets:
        first = filling_from(snap, sel.res.step)
        start, end = utc_iso(first), utc_iso(snap.buckets[-1] + sel.res.step)
        shapes.append({"type": "rect", "xref": "x", "yref": "paper", "x0": start, "x1": end, "y0": 0, "y1": 1,
                       "fillcolor": "#999", "opacity": 0.15, "line": {"width": 0}, "layer": "below"})  # fmt: skip
        annotations.append({"x": start, "y": 1, "xref": "x", "yref": "paper", "text": "filling", "showarrow": False,
                            "xanchor": "left", "yanchor": "top"})  # fmt: skip
    grid = {"gridcolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "linecolor": "#ebf0f8"}
    layout: dict[str, Any] = {
        "uirevision": ui_revision(sel),
        "margin": {"l": 50, "r": 20, "t": 30, "b": 40},
        "yaxis": {"title": {"text": f"events per {sel.resolution}{namespace_note(sel)}"}, "rangemode": "tozero", **grid},
        "xaxis": {"title": {"text": "UTC"}, "type": "date", **grid},
        "legend": {"orientation": "h", "y": -0.15},
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "height": 460,
        "shapes": shapes,
        "annotations": annotations,
    }
    for axis, r in zoomed_ranges(zoom, sel).items():
        layout[axis] = {**layout[axis], "range": r, "autorange": False}
    return {"data": traces, "layout": layout}


def namespace_note(sel: Selection) -> str:
    """What the y axis says of the namespace filter where the graph cannot narrow to it (not stored)."""
    if sel.namespace == "all":
        return ""
    if sel.graph_namespace is not None:
        return f" · {NAMESPACES[sel.namespace]}"
    return " · all namespaces (by type)" if sel.breakdown == "type" else " · all namespaces (only articles are split out)"


def events_per_second(recent_10s: list[int | None]) -> float | None:
    """From the last 10 s bucket that is complete: the current one and the one before are still
    filling (events arrive seconds after they happen; see filling_from)."""
    if len(recent_10s) < 3 or recent_10s[-3] is None:
        return None
    return recent_10s[-3] / 10


def header(snap: Snapshot) -> dict[str, str]:
    eps = events_per_second(snap.recent_10s)
    last_hour = sum(v for v in snap.last_hour_1m if v is not None)
    lag = snap.publisher.get("lag_seconds")
    seen = snap.publisher.get("updated_at")
    status = "no publisher yet"
    if isinstance(seen, (int, float)):
        status = "running" if snap.now - seen < STALE_AFTER else f"silent for {int(snap.now - seen)} s"
    return {
        "eps": "–" if eps is None else f"{eps:.1f}",
        "hour": f"{last_hour:,}",
        "active": f"{len(snap.ranked_5min):,}",
        "lag": "–" if not isinstance(lag, (int, float)) else f"{lag:.1f} s",
        "publisher": status,
    }


def trimmed_notice(snap: Snapshot) -> str:
    """What the stream lost to trimming before a consumer group read it (trimming.py), said on the page."""
    lost = trimmed_unread(snap.publisher)
    return " ".join(
        f"{n:,} events were trimmed from the stream before consumer group {group!r} read them." for group, n in sorted(lost.items()) if n
    )


# Seconds ahead of the clock the newest event's meta.dt may be before the page says so: the simulator stamps meta.dt
# up to 30 s after the change, which a live simulation stamps 3 s back (simulate.FEED_LAG).
AHEAD_SAID = 30.0


def ahead_notice(snap: Snapshot) -> str:
    """Events stamped ahead of the clock (the publisher's ingest lag below zero: the feed's clock, or this machine's, is
    off) land in buckets the page does not show yet; over model.FUTURE_TOLERANCE ahead, the fold counts them as
    `future` and leaves them out. Said on the page, which would otherwise just look empty."""
    lag = snap.publisher.get("lag_seconds")
    if not isinstance(lag, (int, float)) or -lag <= AHEAD_SAID:
        return ""
    fate = (
        f"over {model.FUTURE_TOLERANCE // 60} min ahead, they are counted as `future` and not shown (`stats`)"
        if -lag > model.FUTURE_TOLERANCE
        else "the graph shows them only once their time comes"
    )
    return f"Events arrive stamped {-lag:,.0f} s ahead of this clock: {fate}."


def stale_seconds(snap: Snapshot) -> float | None:
    """Seconds since the last event was published, when that is over STALE_AFTER (else None)."""
    last = snap.publisher.get("last_publish_at")
    if not isinstance(last, (int, float)):
        return float("inf")
    age = snap.now - last
    return age if age > STALE_AFTER else None


def safe_link(url: Any) -> str | None:
    """Only http(s) links reach the page (no javascript: URLs from the feed)."""
    if isinstance(url, str) and urlsplit(url).scheme in ("http", "https"):
        return url
    return None


def ticker_rows(latest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e in latest:
        raw_meta = e.get("meta")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        rows.append({
            "domain": str(meta.get("domain", "")),
            "type": str(e.get("type", "")),
            "title": str(e.get("title", ""))[:120],
            "url": safe_link(e.get("title_url")) or safe_link(meta.get("uri")),
            "user": str(e.get("user", ""))[:60],
            "bot": e.get("bot") is True,
        })  # fmt: skip
    return rows


def to_frame(snap: Snapshot, sel: Selection) -> pd.DataFrame:
    """The shown series as a table (CSV export): one row per bucket, one column per trace."""
    totals = snap.series.get(keys.ALL_DOMAINS, {}).get("", [None] * len(snap.buckets))
    up = [v is not None for v in totals]
    columns: dict[str, Any] = {"bucket_start": pd.to_datetime(snap.buckets, unit="s")}
    for domain in sel.domains:
        for dim in sel.dims:
            values = fill_gaps(snap.series.get(domain, {}).get(dim, [None] * len(snap.buckets)), up)
            columns[domain if dim == "" else f"{domain}:{dim}"] = pd.array(values, dtype="Int64")
    return pd.DataFrame(columns)
