"""Independent references of what Redis should hold after a list of events, readers of what it holds in the
same shape, and the real fold of a list in one call; shared by the tests and the benchmarks (bench/scenarios.py).

  reference_fold / as_reference          the time series (keys.series_key), per event, with no shared code path
  reference_trending / stored_trending   the trending and new-pages keys (keys.py, TREND_*), in stream order
  fold                                   the subscriber's fold (fold.tally, fold.expand, trending.fold_pages) of a
                                         list, on one Redis's keys: what the reference is compared with

Here rather than under tests/ so that the benchmarks need not import the tests (the tests import bench.common).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import redis

from wikipulse.core import model
from wikipulse.core.summary import observe
from wikipulse.core.wiki_page import PageEdit, page_of
from wikipulse.fold.fold import Increments, expand, tally
from wikipulse.fold.trending import fold_pages
from wikipulse.store import keys


def fold(events: Iterable[dict[str, Any]], now: float, retention: Mapping[str, int]) -> Increments:
    """The counts and the trending work of validated events, on one Redis's keys, as the subscriber folds them."""
    out = Increments()
    observed = [(observe(e), page_of(e)) for e in events]
    classes = tally(((obs, 1) for obs, _ in observed), now, retention, out)
    expand(classes, now, retention, out)
    edits = (PageEdit(d, t, kind, bot, page) for (d, t, kind, bot, _), page in observed if page is not None and t is not None)
    out.pages = fold_pages(edits, now, {key[0] for key in classes})
    return out


def reference_fold(events: list[dict[str, Any]], now: float) -> Counter[tuple[str, str, int, str]]:
    """(domain, resolution, bucket, dimension) -> count, one event at a time, with no shared code path."""
    out: Counter[tuple[str, str, int, str]] = Counter()
    for e in events:
        if e["meta"]["domain"] == "canary":
            continue
        t = int(e["timestamp"])
        kind = e["type"] if e["type"] in ("edit", "new", "log", "categorize") else "other"
        who = "bot" if e["bot"] else "human"
        namespace = e.get("namespace")
        for name, step in (("10s", 10), ("1m", 60), ("1h", 3600)):
            for d in (e["meta"]["domain"], "_all"):
                for dim in ("", kind, who):
                    out[(d, name, t // step * step, dim)] += 1
            if type(namespace) is int and namespace == 0:  # articles, the graph's namespace, per domain only
                for dim in (f"ns{namespace}", f"ns{namespace}{who}"):
                    out[(e["meta"]["domain"], name, t // step * step, dim)] += 1
    return out


def as_reference(counts: Mapping[tuple[str, str], int] | Mapping[tuple[bytes, bytes], bytes]) -> Counter[tuple[str, str, int, str]]:
    """Stored {(key, field): n} -> reference_fold's shape, humans worked out as total - bot (not stored)."""
    out: Counter[tuple[str, str, int, str]] = Counter()
    for (key, fld), n in counts.items():
        parts = (key.decode() if isinstance(key, bytes) else key).split(":")
        # wp:ts:{domain}:RES:WINDOW on one Redis; wp:ts:{shard}:domain:RES:WINDOW sharded (_all: one share a shard)
        domain, res = (parts[2].strip("{}"), parts[3]) if len(parts) == 5 else (parts[3], parts[4])
        bucket, _, dim = (fld.decode() if isinstance(fld, bytes) else fld).partition(":")
        namespaces = [keys.namespace_dimension(k, who) for k in model.GRAPH_NAMESPACES for who in ("", "bot")]
        assert dim in ("", *keys.STORED_DIMENSIONS, *namespaces), f"unexpected field {fld!r}"
        out[(domain, res, int(bucket), dim)] += int(n)
    for (domain, res, start, dim), n in list(out.items()):
        if dim == "" or (dim.startswith("ns") and not dim.endswith("bot")):  # humans: everyone minus bots
            human = n - out.get((domain, res, start, dim + "bot" if dim else "bot"), 0)
            if human:
                out[(domain, res, start, dim + "human" if dim else "human")] = human
    return out


Contents = dict[str, Any]  # key -> {member: score} | {editor field: bytes} | [new page, newest first]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_REST = {"\trest", "\trest_editors"}  # the byeditor hash's counters of what its caps left out: not editors


def _admit(zset: dict[str, int], member: str, cap: int) -> bool:
    return member in zset or len(zset) < cap


def reference_trending(events: Iterable[dict[str, Any]], layout: keys.Layout) -> Contents:
    out: Contents = {}
    for e in events:
        domain = e["meta"]["domain"]
        if domain == "canary" or e["type"] not in ("edit", "new") or not e.get("title"):
            continue
        shard = layout.shard_of(domain)
        minute = e["timestamp"] // 60 * 60
        title = _CONTROL.sub("\ufffd", e["title"])[:300]
        user = _CONTROL.sub("\ufffd", e["user"])[:100]
        name = f"{e['namespace']}\t{title}"
        length = e.get("length") or {}
        changed = length["new"] - (length.get("old") or 0) if length.get("new") is not None else 0

        def key(part: str, where: str = domain) -> str:
            return shard.trend_key(part, where, minute)  # noqa: B023 (used at once)

        edits, editors = out.setdefault(key("all"), {}), out.setdefault(key("byeditor"), {})
        if _admit(edits, name, keys.TREND_CAP):
            edits[name] = edits.get(name, 0) + 1
            editor = f"{name}\t{'b' if e['bot'] else 'h'}{user}"
            if editor in editors or len(editors) - sum(k in editors for k in _REST) < keys.TREND_EDITOR_CAP:
                editors[editor] = editors.get(editor, 0) + changed
            else:
                editors["\trest_editors"] = editors.get("\trest_editors", 0) + 1
            if e["bot"]:
                bots = out.setdefault(key("bot"), {})
                bots[name] = bots.get(name, 0) + 1
        else:
            editors["\trest"] = editors.get("\trest", 0) + 1
        everywhere = out.setdefault(key("all", keys.ALL_DOMAINS), {})
        if _admit(everywhere, f"{domain}\t{name}", keys.TREND_GLOBAL_CAP):
            everywhere[f"{domain}\t{name}"] = everywhere.get(f"{domain}\t{name}", 0) + 1
            if e["bot"]:
                bots = out.setdefault(key("bot", keys.ALL_DOMAINS), {})
                bots[f"{domain}\t{name}"] = bots.get(f"{domain}\t{name}", 0) + 1
        if e["type"] == "new":
            item = {
                "domain": domain, "time": e["timestamp"], "namespace": e["namespace"], "title": title, "user": user,
                "bot": e["bot"], "bytes": length.get("new"), "revision": (e.get("revision") or {}).get("new"),
            }  # fmt: skip
            out.setdefault(shard.new_pages, []).append(item)
    for name, items in out.items():
        if name.endswith(":new"):  # the newest by event time, ties as Redis orders equal scores (by member)
            items.sort(key=lambda i: (i["time"], orjson.dumps(i)), reverse=True)
            del items[keys.NEW_PAGES_KEEP :]
    return _without_zeros(out)


def _without_zeros(contents: Contents) -> Contents:
    """Empty keys are absent. (An editor who changed no byte is a field at 0: HINCRBY by 0 makes the field.)"""
    out: Contents = {}
    for key, value in contents.items():
        if value:
            out[key] = value
    return out


def _s(raw: bytes) -> str:
    return raw.decode()


def stored_trending(client: redis.Redis[bytes] | Any) -> Contents:
    """Every trending and new-pages key Redis holds, in reference_trending's shape."""
    out: Contents = {}
    for raw in client.scan_iter(match=f"{keys.PREFIX}:*", count=1000):
        key = _s(raw)
        part = key.split(":")[-2] if ":trend:" in key else None
        if part in ("all", "bot"):
            out[key] = {_s(m): int(score) for m, score in client.zrange(key, 0, -1, withscores=True)}
        elif part == "byeditor":
            out[key] = {_s(f): int(v) for f, v in client.hgetall(key).items()}
        elif key.endswith(":new"):
            out[key] = [orjson.loads(item) for item in client.zrevrange(key, 0, -1)]
    return _without_zeros(out)
