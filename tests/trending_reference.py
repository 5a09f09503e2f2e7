"""An independent reference of the trending and new-pages keys (keys.py, TREND_*), one event at a time in stream
order, and a reader of what Redis holds in the same shape; shared by tests and bench/scenarios.py."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson
import redis

from wikipulse.store import keys

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
