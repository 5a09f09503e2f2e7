"""The live page's Redis reads: a refresh's snapshot, the lists and the ranking, each one pipelined round trip (on a
cluster, one per master, at once). What the page shows of them is computed by the pure functions of view.py and
lists_view.py."""

from __future__ import annotations

import time
from typing import Any

import orjson

from wikipulse.core import model
from wikipulse.dashboard.lists_view import LIST_SIZE, alert_rows, clean_filter, new_page_rows, trending_rows
from wikipulse.dashboard.view import Selection, SelectionError, Snapshot, clean_selection
from wikipulse.fold.series import SeriesRead, bucket_range, decode_reads, merge_ranking, queue_ranking, queue_reads
from wikipulse.fold.trending import TrendingQuery, queue_new_pages, take_new_pages
from wikipulse.store import keys
from wikipulse.store.connect import SyncClient
from wikipulse.store.status import decode_hash
from wikipulse.store.trimming import TRIMMED_UNREAD

ALERTS_SHOWN = 50
TICKER_SIZE = 12


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
    ten, minute = model.RESOLUTION_BY_NAME["10s"], model.RESOLUTION_BY_NAME["1m"]
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


def read_ranked(client: SyncClient, layout: keys.Layout) -> list[tuple[str, float]]:
    pipe = client.pipeline(transaction=False)
    queue_ranking(pipe, layout, int(time.time()), 3600)
    return merge_ranking(layout, pipe.execute())[0]
