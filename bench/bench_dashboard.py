"""Dashboard refresh time, side by side in one run, against a baseline built the usual way.

`pipenv run python -m bench.bench_dashboard`: 10 domains x 360 buckets (10 s resolution, 1 h window)
with the by-type breakdown, against a real Redis holding that data. Times the whole refresh callback
body (the Redis reads and every output: figure, header, lists, ticker) plus Dash's JSON encoding of
the outputs, which is what the browser waits for.
Baseline: one round trip per series and a `plotly.graph_objects` figure.

Then 20 viewers at once (threads, as the server's are): a ten-domain page, the heaviest page the caps
allow (10 domains, 1 h over 120 days, by type) and, as its baseline, the heaviest a page could ask for
before them (12 domains, 1 h over 400 days, by type): latency per refresh and bytes sent.

Last, one pushed update (issue 12), interleaved: the whole refresh as before against the refresh that sends a
Patch of the figure (figure_patch.py), which reads only the buckets it sends, for a live batch: the page drew its
figure one bucket earlier, and the batch moved the last two buckets. Server time (read, render, patch, encode) and
the figure's bytes.
"""

from __future__ import annotations

import statistics
import time
from typing import Any
from unittest import mock

import pandas as pd
import plotly.graph_objects as go
import redis
from dash import Patch
from dash._utils import to_json as dash_to_json

from bench.common import redis_server
from wikipulse.core import model
from wikipulse.core.settings import Settings
from wikipulse.dashboard import layout as dashboard_layout
from wikipulse.dashboard.callbacks import refresh_view
from wikipulse.dashboard.data import read_snapshot, window_buckets
from wikipulse.dashboard.figure_patch import shown_state
from wikipulse.dashboard.layout import render
from wikipulse.dashboard.view import Selection, Snapshot, fill_gaps
from wikipulse.devtools.reference import fold
from wikipulse.fold.series import SeriesRead, bucket_range
from wikipulse.store import keys

DOMAINS = tuple(f"d{i}.wikipedia.org" for i in range(10))
RUNS = 40


def seed(client: redis.Redis, now: int, retention: dict[str, int]) -> None:
    events: list[dict[str, Any]] = []
    for t in range(now - 3600, now, 2):
        for i, domain in enumerate(DOMAINS):
            kind = model.EVENT_TYPES[(t + i) % 4]
            events.append({"meta": {"domain": domain}, "timestamp": t, "type": kind, "bot": t % 3 == 0})
    inc = fold(events, now, retention)
    pipe = client.pipeline(transaction=False)
    for (key, fld), n in inc.counts.items():
        pipe.hincrby(key, fld, n)
    pipe.execute()


def naive_snapshot(client: redis.Redis, sel: Selection, now: float) -> Snapshot:
    """The same reads, one round trip each (no pipeline)."""
    snap = read_snapshot(client, "wiki:events", Selection((), sel.resolution, sel.window, sel.breakdown), now)
    buckets = bucket_range(sel.res, int(now) - sel.seconds + sel.res.step, int(now))
    read = SeriesRead.plan(sel.res, buckets, sel.dims)
    for domain in sel.domains:
        snap.series[domain] = read.decode([client.hgetall(key) for key in read.hashes(domain)])
    return snap


def graph_objects_figure(snap: Snapshot, sel: Selection, _zoom: Any = None) -> go.Figure:
    """The same figure built the usual way, through plotly's validating graph_objects."""
    x = pd.to_datetime(snap.buckets, unit="s")
    up = [v is not None for v in snap.series.get(keys.ALL_DOMAINS, {}).get("", [None] * len(snap.buckets))]
    fig = go.Figure()
    for domain in sel.domains:
        for dim in sel.dims:
            values = fill_gaps(snap.series.get(domain, {}).get(dim, [None] * len(snap.buckets)), up)
            fig.add_trace(go.Scatter(x=x, y=values, mode="lines", name=f"{domain} · {dim}", connectgaps=False))
    current = pd.to_datetime(snap.buckets[-1], unit="s")
    fig.add_vrect(x0=current, x1=current + pd.Timedelta(seconds=sel.res.step), fillcolor="#999", opacity=0.15,
                  annotation_text="filling")  # fmt: skip
    fig.update_layout(uirevision="same", template="plotly_white", height=460, xaxis={"type": "date"})
    return fig


def to_json(outputs: tuple[Any, ...]) -> str:
    """The callback's outputs encoded the way Dash sends them to the browser."""
    return str(dash_to_json(outputs))  # type: ignore[no-untyped-call]


def baseline_refresh(client: redis.Redis, sel: Selection) -> str:
    with mock.patch.object(dashboard_layout, "make_figure", graph_objects_figure):
        return to_json(render(naive_snapshot(client, sel, time.time()), sel))


def refresh(client: redis.Redis, sel: Selection) -> str:
    return to_json(render(read_snapshot(client, "wiki:events", sel), sel))


def pushed_update(client: redis.Redis, sel: Selection, patched: bool) -> tuple[str, str]:
    """(the figure, every output) as one pushed update encodes them (callbacks.refresh_view): the whole refresh, or a
    Patch of the figure the page drew a bucket earlier, after a batch that moved the last two buckets."""
    buckets = window_buckets(sel, time.time())
    step = sel.res.step
    drawn = shown_state(sel, None, [b - step for b in buckets], len(sel.domains) * len(sel.dims), "bench:1")
    since = float(buckets[-2]) if patched else None
    figure, *rest = refresh_view(client, "wiki:events", keys.Layout("wiki:events"), sel, None, drawn, "bench:2", since)
    assert patched == isinstance(figure, Patch)
    return dash_to_json(figure), to_json((figure, *rest))  # type: ignore[no-untyped-call]


def interleaved_ms(fns: dict[str, Any]) -> dict[str, float]:
    """Median ms of each function, run in turn so that the machine's noise falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(RUNS):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def median_ms(fn: Any) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def concurrent(client: redis.Redis, sel: Selection, viewers: int = 20, each: int = 3) -> tuple[float, float, float, int]:
    """(p50 ms, p95 ms, wall s, bytes of one response) of `viewers` threads refreshing `each` times at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one() -> tuple[float, int]:
        started = time.perf_counter()
        size = len(refresh(client, sel))
        return (time.perf_counter() - started) * 1000, size

    started = time.perf_counter()
    with ThreadPoolExecutor(viewers) as pool:
        results = list(pool.map(lambda _: one(), range(viewers * each)))
    wall = time.perf_counter() - started
    times = sorted(t for t, _ in results)
    return statistics.median(times), times[int(len(times) * 0.95) - 1], wall, results[0][1]


def main() -> None:
    with redis_server() as server:
        client = redis.Redis.from_url(server.url)
        now = int(time.time())
        seed(client, now, Settings.from_args(environ={}).retention_seconds())
        sel = Selection(DOMAINS, "10s", "1h", "type")
        assert len(refresh(client, sel)) > 100_000  # the figure really holds the 50 traces
        base = median_ms(lambda: baseline_refresh(client, sel))
        mine = median_ms(lambda: refresh(client, sel))
        pool = redis.Redis.from_url(server.url, max_connections=40)
        viewers = {
            "ten-domain page (10 s over 1 h, by type)": concurrent(pool, sel),
            "before the caps, heaviest page (12 domains, 1 h over 400 d, by type)": concurrent(
                pool, Selection((*DOMAINS, "x.wikipedia.org", "y.wikipedia.org"), "1h", "400d", "type"), each=1
            ),
            "heaviest page now (10 domains, 1 h over 120 d, by type)": concurrent(pool, Selection(DOMAINS, "1h", "120d", "type"), each=1),
        }
        pool.close()
        pages = {
            "default page (3 domains, 10 s over 30 min)": Selection(DOMAINS[:3], "10s", "30m", "total"),
            "ten-domain page (10 s over 1 h, by type)": sel,
        }
        pushed = []  # one pushed update: (page, variant, server ms, figure bytes, response bytes)
        for name, page in pages.items():
            variants = {"whole refresh": False, "Patch of the figure": True}
            ms = interleaved_ms({v: lambda p=p, s=page: pushed_update(client, s, p) for v, p in variants.items()})
            for variant, patched in variants.items():
                figure_json, response_json = pushed_update(client, page, patched)
                pushed.append((name, variant, ms[variant], len(figure_json), len(response_json)))
        client.close()
    print("\none pushed update: whole refresh vs Patch of the figure (interleaved, median of", RUNS, ")")
    print("| page | update | server time | figure | whole response |")
    print("|---|---|---|---|---|")
    for name, variant, ms_, figure_bytes, response_bytes in pushed:
        print(f"| {name} | {variant} | {ms_:.1f} ms | {figure_bytes / 1000:.1f} kB | {response_bytes / 1000:.1f} kB |")
    print("\ndashboard refresh: 10 domains x 360 buckets x 5 event types, median of", RUNS)
    print("| variant | median | vs baseline |")
    print("|---|---|---|")
    print(f"| baseline: one round trip per series, graph_objects figure | {base:.1f} ms | 1.0× |")
    print(f"| wikipulse: one pipelined round trip, figure as a plain dict | {mine:.1f} ms | {base / mine:.1f}× faster |")
    print("\n20 viewers refreshing at once")
    print("| page | p50 | p95 | wall time | one response |")
    print("|---|---|---|---|---|")
    for name, (p50, p95, wall, size) in viewers.items():
        print(f"| {name} | {p50:.0f} ms | {p95:.0f} ms | {wall:.1f} s | {size / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
