"""Routes: named slices of the feed, each kept as a durable stream and a pub/sub channel of its own (keys.Route).

`python -m wikipulse route add NAME --where FIELD=V1,V2 ...` stores a definition in Redis (keys.ROUTES); `route list`
and `route remove` are here too, and the routes' counters (`stats`, /metrics). The filters and definitions, pure, are
route_filters.py's; the copier, in the publisher's process, that keeps each route's stream and channel is
route_copier.py's (its reads route_reader.py's).

A route starts where the ingest stream ended when it was declared (`start`; 0 with --from-stream) and holds only what
came after.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Any

from wikipulse.core.errors import SettingsError
from wikipulse.core.settings import RedisSettings
from wikipulse.ingest.route_copier import Live, RouteCopier, drop_keys, last_id
from wikipulse.ingest.route_filters import Definition, check_name, describe, parse_filter, parse_where
from wikipulse.store import keys
from wikipulse.store.connect import Client, SyncClient
from wikipulse.store.scripts import lua

__all__ = ["Live", "RouteCopier", "add_route", "list_routes", "parse_where", "read_route_counters", "remove_route", "route_command",
           "route_counters"]  # fmt: skip

ADD_SCRIPT = lua(__package__, "routes_add")


async def add_route(client: Client, settings: RedisSettings, name: str, wheres: Sequence[str], from_stream: bool) -> Definition:
    check_name(name)
    where = parse_filter(wheres)
    start = "0-0" if from_stream else await last_id(client, settings.stream)
    definition = Definition(name, where, start, secrets.token_hex(6), round(time.time(), 3))
    verdict = await client.eval(ADD_SCRIPT, 1, keys.ROUTES, name, definition.dumps(), keys.MAX_ROUTES)
    verdict = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
    if verdict == "exists":
        raise SettingsError(f"a route {name!r} exists already (route remove {name} first)")
    if verdict == "full":
        raise SettingsError(f"there are {keys.MAX_ROUTES} routes already, the most there can be: remove one first")
    return definition


async def list_routes(client: Client) -> list[dict[str, Any]]:
    raw = await client.hgetall(keys.ROUTES)
    out = []
    for name in sorted(raw):
        d = Definition.loads(name.decode(), raw[name])
        route = keys.Route(d.name)
        pipe = client.pipeline(transaction=False)
        pipe.hgetall(route.router_stats)
        pipe.xlen(route.stream)
        stats, length = await pipe.execute()
        counts = {k.decode(): v.decode() for k, v in stats.items()}
        out.append({
            "name": d.name, "where": describe(d.where), "stream": route.stream, "channel": route.channel, "length": length,
            "copied": int(counts.get("copied", 0)), "duplicates": int(counts.get("duplicates", 0)),
            "live": counts.get("live") == d.token, "start": d.start,
        })  # fmt: skip
    return out


async def remove_route(client: Client, name: str) -> None:
    check_name(name)
    if not await client.hdel(keys.ROUTES, name):
        raise SettingsError(f"no route {name!r}")
    await drop_keys(client, keys.Route(name))


async def route_command(settings: RedisSettings, action: str, name: str | None, wheres: Sequence[str], from_stream: bool) -> Any:
    """What `route add|list|remove` prints."""
    from wikipulse.store.connect import open_client

    if name is not None:
        check_name(name)
    if action == "add":
        parse_filter(wheres)  # refused before Redis is asked anything
    client, _ = await open_client(settings)
    async with client:
        if action == "add":
            assert name is not None
            d = await add_route(client, settings, name, wheres, from_stream)
            route = keys.Route(d.name)
            return {"added": d.name, "where": describe(d.where), "stream": route.stream, "channel": route.channel,
                    "from": "what the stream holds" if from_stream else f"after {d.start}"}  # fmt: skip
        if action == "remove":
            assert name is not None
            await remove_route(client, name)
            return {"removed": name}
        return await list_routes(client)


# ---- counters, for `stats` and /metrics ------------------------------------------------------------------------------
def _counters(names: Sequence[str], replies: Sequence[Any]) -> dict[str, dict[str, Any]]:
    from wikipulse.store.status import decode_hash
    from wikipulse.store.trimming import trimmed_unread

    out = {}
    for i, name in enumerate(names):
        stats = decode_hash(replies[2 * i]) if isinstance(replies[2 * i], dict) else {}
        length = replies[2 * i + 1]
        out[name] = {
            "copied": int(stats.get("copied", 0)), "duplicates": int(stats.get("duplicates", 0)),
            "length": length if isinstance(length, int) else 0, "trimmed_unread": trimmed_unread(stats),
        }  # fmt: skip
    return out


def route_counters(client: SyncClient) -> dict[str, dict[str, Any]]:
    """{route: {"copied", "duplicates", "length", "trimmed_unread": {group: n}}} for every declared route (/metrics)."""
    names = sorted(n.decode() for n in client.hkeys(keys.ROUTES))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.Route(name).router_stats)
        pipe.xlen(keys.Route(name).stream)
    return _counters(names, pipe.execute())


async def read_route_counters(client: Client) -> dict[str, dict[str, Any]]:
    """route_counters, for `stats`."""
    names = sorted(n.decode() for n in await client.hkeys(keys.ROUTES))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.Route(name).router_stats)
        pipe.xlen(keys.Route(name).stream)
    return _counters(names, await pipe.execute())
