"""Routes (wikipulse/ingest/routes.py, route_*.py): named slices of the feed, each a stream and a channel, against a real Redis.

The end-to-end test runs the real processes (a local EventStreams server, publisher.py with its copier) and kills the
copier's process with SIGKILL while it copies; each route's stream is then compared with a reference slice of the
events sent, worked out here from their JSON alone."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from bench.common import write_events
from tests.conftest import ServeFn
from tests.helpers import assert_same, calibrated_lines, calibrated_source, stop, wait_for
from tests.test_cluster import cluster, cluster_client, cluster_settings  # noqa: F401 (fixtures)
from tests.test_subscriber import load_stream
from wikipulse.cli import main
from wikipulse.core.errors import SettingsError
from wikipulse.core.settings import Settings
from wikipulse.core.summary import summary_of
from wikipulse.dashboard.operations import families, read_scrape
from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import LocalCluster, RedisServer, find_binary, free_port
from wikipulse.ingest.route_filters import head_of, matcher
from wikipulse.ingest.route_reader import READ_SCRIPT, Copied
from wikipulse.ingest.router import ShardWriter
from wikipulse.ingest.routes import Live, RouteCopier, add_route, parse_where
from wikipulse.ingest.writer import BatchWriter, IngestBatch
from wikipulse.queries import stats
from wikipulse.store import keys
from wikipulse.store.connect import open_client
from wikipulse.store.lease import Lease, LeaseLost

ROOT = Path(__file__).resolve().parents[1]
KNOWN_TYPES = {"edit", "new", "log", "categorize"}
Where = dict[str, set[Any]]


def reference(event: dict[str, Any], where: Where) -> bool:
    """Whether an event belongs to a route, from its JSON (the test's own reading of the feed's schema)."""
    kind = event.get("type") if event.get("type") in KNOWN_TYPES else "other"
    ns = event.get("namespace")
    seen = {"domain": event["meta"]["domain"], "type": kind, "bot": event.get("bot") is True, "namespace": ns}
    return all(seen[name] in allowed for name, allowed in where.items())


ENWIKI_HUMANS: Where = {"domain": {"en.wikipedia.org"}, "bot": {False}}
CREATIONS: Where = {"type": {"new", "log"}, "namespace": {0, 2}}
ENWIKI_ARGS = ["--where", "domain=en.wikipedia.org", "--where", "bot=false"]
CREATION_ARGS = ["--where", "type=new,log", "--where", "namespace=0,2"]


async def route_entries(client: aioredis.Redis, name: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return list(await client.xrange(keys.Route(name).stream))


def meta_ids(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[str]:
    return [orjson.loads(fields[b"data"])["meta"]["id"] for _, fields in entries]


# ---- validation ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["route", "add", "Bad:Name", "--where", "type=new"], "bad route name"),
        (["route", "add", "x" * 41, "--where", "type=new"], "bad route name"),
        (["route", "add", "ok"], "at least one --where"),
        (["route", "add", "ok", "--where", "user=Bob"], "FIELD one of domain, type, bot, namespace"),
        (["route", "add", "ok", "--where", "type"], "use FIELD=V1,V2"),
        (["route", "add", "ok", "--where", "type="], "no value"),
        (["route", "add", "ok", "--where", "type=edit,rename"], "type='rename': one of edit, new, log"),
        (["route", "add", "ok", "--where", "bot=maybe"], "true or false"),
        (["route", "add", "ok", "--where", "namespace=-1"], "a namespace number"),
        (["route", "add", "ok", "--where", "domain=not a domain"], "not a domain"),
        (["route", "remove", "{slot}"], "bad route name"),
    ],
)
def test_bad_names_and_filters_are_refused_clearly(args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--redis-url", "redis://127.0.0.1:1/0"])  # refused before Redis is asked anything
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_where_is_normalised() -> None:
    assert parse_where("Type=NEW, log,new") == ("type", ("new", "log"))
    assert parse_where("namespace=007") == ("namespace", ("7",))
    assert parse_where("domain=En.Wikipedia.org") == ("domain", ("en.wikipedia.org",))
    with pytest.raises(SettingsError, match="at most 200"):
        parse_where("namespace=" + ",".join(str(i) for i in range(201)))


def test_the_cap_a_taken_name_and_an_unknown_one(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    sync = redis.Redis.from_url(redis_server.url)
    sync.flushall()
    url = ["--redis-url", redis_server.url]
    assert main(["route", "add", "first", "--where", "type=new", *url]) == 0
    assert orjson.loads(capsys.readouterr().out)["stream"] == "wiki:route:first"
    with pytest.raises(SystemExit):
        main(["route", "add", "first", "--where", "type=log", *url])
    assert "a route 'first' exists already" in capsys.readouterr().err
    for i in range(keys.MAX_ROUTES - 1):
        assert main(["route", "add", f"r{i}", "--where", "type=new", *url]) == 0
    with pytest.raises(SystemExit):
        main(["route", "add", "one-too-many", "--where", "type=new", *url])
    assert f"there are {keys.MAX_ROUTES} routes already" in capsys.readouterr().err
    assert sync.hlen(keys.ROUTES) == keys.MAX_ROUTES
    sync.close()
    with pytest.raises(SystemExit):
        main(["route", "remove", "nosuch", *url])
    assert "no route 'nosuch'" in capsys.readouterr().err
    assert main(["route", "remove", "first", *url]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"removed": "first"}
    assert main(["route", "list", *url]) == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert len(listed) == keys.MAX_ROUTES - 1 and listed[0]["where"] == "--where type=new"


def test_each_route_has_a_slot_of_its_own_with_its_lease_and_counters() -> None:
    a, b = keys.Route("enwiki-humans"), keys.Route("creations")
    assert a.stream == a.channel == "wiki:route:enwiki-humans"
    for route in (a, b):
        assert key_slot(route.router_lease.encode()) == key_slot(route.router_stats.encode()) == key_slot(route.stream.encode())
    assert key_slot(a.stream.encode()) != key_slot(b.stream.encode())


# ---- the copier, step by step ----------------------------------------------------------------------------------------
async def test_a_replayed_copy_adds_nothing_and_a_second_copier_is_fenced(redis_client: aioredis.Redis, settings: Settings) -> None:
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:3000]
    await load_stream(redis_client, lines, with_fold=True)
    await add_route(redis_client, settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=False)  # from now: nothing yet
    await add_route(redis_client, settings, "creations", CREATION_ARGS[1::2], from_stream=True)  # what the stream holds
    copier = RouteCopier(settings, redis_client, keys.Layout(settings.stream))
    assert await copier.lease.try_acquire() is None
    await copier.refresh()  # the group is made at the earliest route's start: here, the stream's first entry
    more = [line for line in calibrated_lines() if b'"canary"' not in line][3000:6000]
    await load_stream(redis_client, more, with_fold=True)
    # Declared while the group exists: caught up at once, from the stream's first entry to its end.
    await add_route(redis_client, settings, "backfill", ["domain=de.wikipedia.org"], from_stream=True)
    await copier.refresh(force=True)
    expected_backfill = [orjson.loads(x)["meta"]["id"] for x in lines + more if orjson.loads(x)["meta"]["domain"] == "de.wikipedia.org"]
    assert meta_ids(await route_entries(redis_client, "backfill")) == expected_backfill

    reply = await redis_client.xreadgroup(keys.ROUTES_GROUP, "routes", {settings.stream: ">"}, count=10_000)
    entries = [(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1]]
    assert len(entries) == 6000
    await copier.copy(entries[:5000])
    await copier.copy(entries)  # a crash after the writes, before the XACK: the restarted copier copies them again
    creations = [orjson.loads(x)["meta"]["id"] for x in lines + more if reference(orjson.loads(x), CREATIONS)]
    assert meta_ids(await route_entries(redis_client, "creations")) == creations  # --from-stream: all the stream held
    humans = [orjson.loads(x)["meta"]["id"] for x in more if reference(orjson.loads(x), ENWIKI_HUMANS)]  # from its start
    first = sum(1 for x in more[:2000] if reference(orjson.loads(x), ENWIKI_HUMANS))
    got = await route_entries(redis_client, "enwiki-humans")
    assert meta_ids(got) == humans
    ingest = dict(await redis_client.xrange(settings.stream))
    assert all(ingest[i] == fields for i, fields in got)  # the original ids, the same fields
    stats_ = await redis_client.hgetall(keys.Route("enwiki-humans").router_stats)
    assert (int(stats_[b"copied"]), int(stats_[b"duplicates"])) == (len(humans), first)
    assert meta_ids(await route_entries(redis_client, "backfill")) == expected_backfill  # the group's copies refused

    other = RouteCopier(settings, redis_client, keys.Layout(settings.stream))  # a second copier by mistake: no lease
    live, route = copier.routes["enwiki-humans"], keys.Route("enwiki-humans")
    lease = Lease(redis_client, route.router_lease, settings.lease_ttl, "elsewhere:1:x")
    writer = ShardWriter(redis_client, route, lease, settings, "route enwiki-humans", groups=())
    other.routes = {"enwiki-humans": Live(live.definition, route, live.matches, lease, writer)}
    with pytest.raises(LeaseLost, match=r"another router .* holds the lease on route enwiki-humans"):
        await other.copy(entries[-500:])
    await writer.close()
    await copier._forget()


async def test_redis_hands_over_only_what_a_route_may_want(redis_client: aioredis.Redis, settings: Settings) -> None:
    """The copier's read (READ_SCRIPT) keeps back the entries whose fold summary no route's filter holds for; any entry
    whose summary is missing or not well-formed is handed over, and judged by its JSON (as the subscriber does)."""
    lines = [line for line in calibrated_lines() if b'"canary"' not in line]
    enwiki_human = next(x for x in lines if reference(orjson.loads(x), ENWIKI_HUMANS))
    other = next(x for x in lines if not reference(orjson.loads(x), ENWIKI_HUMANS))
    await add_route(redis_client, settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=False)
    copier = RouteCopier(settings, redis_client, keys.Layout(settings.stream))
    assert await copier.lease.try_acquire() is None
    await copier.refresh()
    fold = summary_of(orjson.loads(enwiki_human))
    added = [
        await redis_client.xadd(settings.stream, {"data": enwiki_human, "fold": fold}),  # wanted
        await redis_client.xadd(settings.stream, {"data": other, "fold": summary_of(orjson.loads(other))}),  # kept back
        await redis_client.xadd(settings.stream, {"data": enwiki_human}),  # no summary: judged by its JSON, wanted
        await redis_client.xadd(settings.stream, {"data": other, "fold": "not a summary"}),  # by its JSON: not wanted
        await redis_client.xadd(settings.stream, {"data": enwiki_human, "fold": fold.replace(" edit ", " rename ")}),
    ]
    read = redis_client.register_script(READ_SCRIPT)
    args = [keys.ROUTES_GROUP, "routes", 100, ">", "", copier.plan.filters, "0"]  # "0": hand over (as on a cluster)
    n, last, trimmed, candidates, copied = await read(keys=[settings.stream], args=args)
    assert (n, last, trimmed, copied) == (5, added[-1], 0, [])
    assert [i for i, _ in candidates] == [added[0], added[2], added[3], added[4]]
    await copier.copy(candidates, ack=False)
    assert [i for i, _ in await route_entries(redis_client, "enwiki-humans")] == [added[0], added[2], added[4]]
    await read(keys=[settings.stream], args=[keys.ROUTES_GROUP, "routes", 0, ">", last, "[]"])  # acknowledge
    assert (await redis_client.xpending(settings.stream, keys.ROUTES_GROUP))["pending"] == 0
    await copier._forget()


async def drive(copier: RouteCopier, start: str = ">") -> list[Copied | None]:
    """The copier's reads and copies, as consumer.StreamConsumer makes them (one Redis: no replica to confirm on), until
    the stream holds nothing more for it: what each read copied in Redis (None: handed over, copied by the copier)."""
    done: list[Copied | None] = []
    while True:
        await copier.reader.send(start, 1000, None)
        batch = await copier.reader.batch()
        if batch.last is None:
            return done
        done.append(copier.reader.copied)
        await copier.handle(batch)
        if start != ">":
            start = batch.last.decode()


async def test_on_one_redis_the_read_copies_in_redis(redis_client: aioredis.Redis, settings: Settings) -> None:
    """On one Redis the copier's read copies each batch itself (no entry leaves Redis, no MULTI/EXEC): each route's
    stream is its slice with the original ids and fields, its channel hears each entry added once; a batch delivered
    again is refused and counted as duplicates; a route's lease held by another process fences the whole read; a batch
    with an entry only its JSON can tell is handed over, and the copier copies it, in order."""
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:4000]
    await add_route(redis_client, settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=True)
    await add_route(redis_client, settings, "creations", CREATION_ARGS[1::2], from_stream=True)
    copier = RouteCopier(settings, redis_client, keys.Layout(settings.stream))
    assert copier.in_redis and await copier.lease.try_acquire() is None
    await copier.refresh()
    await load_stream(redis_client, lines, with_fold=True)
    await redis_client.config_resetstat()
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("wiki:route:creations")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        copied = await drive(copier)
        assert len(copied) == 4 and all(c is not None for c in copied)
        assert "cmdstat_exec" not in await redis_client.info("commandstats")  # the copier wrote nothing itself
        heard = []
        while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)) is not None:
            heard.append(message["data"])
    ingest = dict(await redis_client.xrange(settings.stream))
    for name, where in (("enwiki-humans", ENWIKI_HUMANS), ("creations", CREATIONS)):
        got = await route_entries(redis_client, name)
        assert meta_ids(got) == [orjson.loads(x)["meta"]["id"] for x in lines if reference(orjson.loads(x), where)]
        assert all(ingest[i] == fields for i, fields in got)
        assert int(await redis_client.hget(keys.Route(name).router_stats, "copied")) == len(got)
    assert heard == [x for x in lines if reference(orjson.loads(x), CREATIONS)]
    assert (await redis_client.xpending(settings.stream, keys.ROUTES_GROUP))["pending"] == 0  # acknowledged in the read
    assert copier.totals["copied"] == sum([await redis_client.xlen(keys.Route(n).stream) for n in ("enwiki-humans", "creations")])

    await redis_client.xgroup_setid(settings.stream, keys.ROUTES_GROUP, "0")  # delivered again (a group made anew)
    await drive(copier)
    humans = await redis_client.hgetall(keys.Route("enwiki-humans").router_stats)
    assert humans[b"duplicates"] == humans[b"copied"]
    assert int(humans[b"copied"]) == await redis_client.xlen(keys.Route("enwiki-humans").stream)

    route = keys.Route("creations")
    await redis_client.set(route.router_lease, "elsewhere:1:x", px=60_000)  # another copier holds the route now
    await load_stream(redis_client, lines[:10], with_fold=True)
    with pytest.raises(LeaseLost, match="elsewhere:1:x"):
        await drive(copier)
    assert (await redis_client.xinfo_groups(settings.stream))[0]["pending"] == 0  # nothing was read
    await redis_client.set(route.router_lease, copier.token, px=60_000)

    creation = next(x for x in lines if reference(orjson.loads(x), CREATIONS))
    before = await redis_client.xlen(route.stream)
    await redis_client.xadd(settings.stream, {"data": creation})  # no summary: only its JSON tells
    copied = await drive(copier)
    assert copied == [None]  # handed over, copied by the copier
    got = await route_entries(redis_client, "creations")
    assert len(got) == before + sum(1 for x in lines[:10] if reference(orjson.loads(x), CREATIONS)) + 1
    assert got[-1][1] == {b"data": creation}
    await copier.reader.close()
    await copier._forget()


@pytest.mark.parametrize(
    ("fields", "in_redis"),
    [
        ({"data": "D", "fold": "en.wikipedia.org 1764600000 edit human 0\tPage"}, True),
        ({"data": "D", "fold": "en.wikipedia.org 1764600000 new human 2"}, True),
        ({"data": "D", "fold": "en.wikipedia.org 1764600000 edit human"}, True),  # written before the namespace was
        ({"data": "D", "fold": "en.wikipedia.org 1764600000 log bot\tPage"}, True),
        ({"data": "D", "fold": "en.wikipedia.org  new human -"}, True),  # an empty part: Python's split keeps it
        ({"data": "D", "fold": "de.wikipedia.org 1 other human 007"}, True),
        ({"data": "D", "fold": "en.wikipedia.org 1 edit human 0 more"}, False),  # six parts
        ({"data": "D", "fold": "en.wikipedia.org 1 edit human 0\n"}, False),  # Python would read the namespace '0\n'
        ({"data": "D", "fold": " en.wikipedia.org 1 edit human 0"}, False),
        ({"data": "D", "fold": "En.wikipedia.org 1 edit human 0"}, False),  # the domains Python's check refuses
        ({"data": "D", "fold": "canary 1 edit human 0"}, False),
        ({"data": "D", "fold": "en..org 1 edit human 0"}, False),
        ({"data": "D", "fold": "-en.org 1 edit human 0"}, False),
        ({"data": "D", "fold": "en-.org 1 edit human 0"}, False),
        ({"data": "D", "fold": "a" * 64 + ".org 1 edit human 0"}, False),
        ({"data": "D", "fold": ".".join(["a" * 63] * 4) + ".org 1 edit human 0"}, False),  # 256 characters
        ({"data": "D", "fold": "en.wikipedia.org 1 rename human 0"}, False),
        ({"data": "D", "fold": "en.wikipedia.org 1 edit Human 0"}, False),
        ({"fold": "en.wikipedia.org 1 edit human 0", "data": "D"}, False),  # not as the publisher writes it
        ({"data": "D", "fold": "en.wikipedia.org 1 edit human 0", "x": "y"}, False),
        ({"data": "D"}, False),
    ],
)
async def test_redis_judges_a_summary_as_python_does(
    redis_client: aioredis.Redis, settings: Settings, fields: dict[str, str], in_redis: bool
) -> None:
    """The read copies in Redis only what it reads as route_filters.head_of does (the one definition of a summary's
    head); any other entry is handed over, for the copier to judge by its JSON."""
    line = next(x for x in calibrated_lines() if reference(orjson.loads(x), ENWIKI_HUMANS))
    await add_route(redis_client, settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=True)
    await add_route(redis_client, settings, "creations", CREATION_ARGS[1::2], from_stream=True)
    await add_route(redis_client, settings, "others", ["type=other", "namespace=7"], from_stream=True)
    copier = RouteCopier(settings, redis_client, keys.Layout(settings.stream))
    assert await copier.lease.try_acquire() is None
    await copier.refresh()
    entry = {k: line if v == "D" else v for k, v in fields.items()}
    await redis_client.xadd(settings.stream, entry)
    (copied,) = await drive(copier)
    await copier.reader.close()
    await copier._forget()
    assert (copied is not None) == in_redis
    if copied is not None:
        flat = [x.encode() if isinstance(x, str) else x for kv in entry.items() for x in kv]
        head = head_of(flat, settings.max_event_bytes)
        assert head is not None
        python = {name: int(matcher(d.where)(head)) for name, d in copier._wanted.items()}
        assert {name: added for name, (added, _, _) in copied.items()} == python


@pytest.mark.parametrize("in_redis", [True, False])
async def test_what_a_route_stream_loses_to_trimming_is_counted_per_route(
    redis_client: aioredis.Redis, settings: Settings, in_redis: bool
) -> None:
    """Copied in Redis (one Redis) or by the copier (as on a cluster): the same trimming, the same counters."""
    s = dataclasses.replace(settings, stream_maxlen=200)
    await add_route(redis_client, s, "creations", CREATION_ARGS[1::2], from_stream=False)
    await redis_client.xgroup_create(keys.Route("creations").stream, "reader", id="0", mkstream=True)  # a reader, stopped
    await redis_client.xgroup_create(s.stream, s.group, id="0", mkstream=True)  # the subscribers' (`stats` asks for it)
    copier = RouteCopier(s, redis_client, keys.Layout(s.stream))
    assert await copier.lease.try_acquire() is None
    await copier.refresh()
    lines = [line for line in calibrated_lines() if b'"canary"' not in line]
    await load_stream(redis_client, lines, with_fold=True)
    if in_redis:
        assert all(copied is not None for copied in await drive(copier))
        await copier.reader.close()
    else:
        reply = await redis_client.xreadgroup(keys.ROUTES_GROUP, "routes", {s.stream: ">"}, count=20_000)
        entries = [(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1]]
        for start in range(0, len(entries), 500):
            await copier.copy(entries[start : start + 500])
    await copier._forget()
    sent = sum(1 for x in lines if reference(orjson.loads(x), CREATIONS))
    kept = await redis_client.xlen(keys.Route("creations").stream)
    shown = (await stats(s))["routes"]["creations"]
    assert shown["trimmed_unread"]["reader"] + kept == sent and kept < sent
    assert shown["copied"] == sent and shown["length"] == kept
    sync = redis.Redis.from_url(s.redis_url)
    text = "\n".join(str(m) for m in families(read_scrape(sync, keys.Layout(s.stream), s, time.time()), time.time()))
    sync.close()
    assert "wikipulse_route_trimmed_unread_events" in text and "'route': 'creations', 'group': 'reader'" in text
    assert "wikipulse_route_copied_events" in text and "'role': 'routes'" in text


# ---- the channel -----------------------------------------------------------------------------------------------------
async def test_subscribe_hears_only_its_slice(redis_client: aioredis.Redis, settings: Settings, eventstreams: ServeFn) -> None:
    """A real client and redis-cli subscribe to a route's channel while the publisher's process copies."""
    from wikipulse.ingest.publisher import run_publisher

    await add_route(redis_client, settings, "creations", CREATION_ARGS[1::2], from_stream=False)
    await add_route(redis_client, settings, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=False)
    port = settings.redis_url.rsplit(":", 1)[1].split("/")[0]
    cli = await asyncio.create_subprocess_exec(
        find_binary("redis-cli"), "-p", port, "subscribe", "wiki:route:creations", stdout=subprocess.PIPE
    )
    assert cli.stdout is not None
    for _ in range(3):  # subscribe, the channel, 1: subscribed
        await asyncio.wait_for(cli.stdout.readline(), 10)
    heard: list[bytes] = []
    heard_cli: list[bytes] = []

    async def read_cli() -> None:
        assert cli.stdout is not None
        while line := await cli.stdout.readline():
            if line.startswith(b"{"):  # message, the channel, the payload
                heard_cli.append(line.rstrip(b"\n"))

    reader = asyncio.create_task(read_cli())
    raw = [line for line in calibrated_lines() if b'"canary"' not in line]
    want_humans = [x for x in raw if reference(orjson.loads(x), ENWIKI_HUMANS)]
    want_creations = [x for x in raw if reference(orjson.loads(x), CREATIONS)]
    async with redis_client.pubsub() as pubsub:
        await pubsub.subscribe("wiki:route:enwiki-humans")

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    heard.append(message["data"])

        listener = asyncio.create_task(listen())
        _, url = await eventstreams(calibrated_source(), None)
        task = asyncio.create_task(run_publisher(dataclasses.replace(settings, stream_url=url)))

        async def done() -> bool:
            return len(heard) >= len(want_humans) and len(heard_cli) >= len(want_creations)

        try:
            await wait_for(done, 60, "the routes' channels to hear their slices", task)
            await asyncio.sleep(0.5)  # anything more (a duplicate) would arrive now
        finally:
            await stop(task)
            listener.cancel()
            cli.send_signal(signal.SIGTERM)
            await cli.wait()
            await reader
    assert_same(heard, want_humans)  # only its slice, each once, in order, the raw JSON unchanged
    assert_same(heard_cli, want_creations)


# ---- end to end, with kill -9 ----------------------------------------------------------------------------------------
class Processes:
    def __init__(self, tmp: Path, redis_url: str, events: Path, rate: int) -> None:
        self.tmp, self.port = tmp, free_port()
        self.logs: list[Any] = []
        self.env = {**os.environ, "REDIS_URL": redis_url, "WIKI_STREAM_URL": f"http://127.0.0.1:{self.port}{PATH}",
                    "WIKI_BACKOFF_CAP": "0.5", "LOG_LEVEL": "INFO", "STATS_INTERVAL": "3600",
                    # The subject is the routes: wiki:events keeps every event (no other group, a window over n), so
                    # the reference slices and --from-stream's "all the stream holds" are the whole feed.
                    "STREAM_KEEP": "100000", "STREAM_CONSUMERS": ""}  # fmt: skip
        feed = [sys.executable, "-m", "wikipulse", "replay", str(events), "--port", str(self.port), "--rate", str(rate)]
        self.feed = self._start(feed, "feed")
        self.publisher = self._start([sys.executable, str(ROOT / "publisher.py")], "publisher")

    def _start(self, cmd: list[str], name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("ab")
        self.logs.append(log)
        return subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def kill_publisher(self) -> None:
        """SIGKILL, as a crash would, then start it again: the copier runs in this process."""
        self.publisher.send_signal(signal.SIGKILL)
        self.publisher.wait()
        self.publisher = self._start([sys.executable, str(ROOT / "publisher.py")], "publisher")

    def stop(self) -> None:
        for p in (self.publisher, self.feed):
            p.send_signal(signal.SIGTERM)
        for p in (self.publisher, self.feed):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()


async def cli(url: str, *args: str) -> None:
    """`python -m wikipulse route ...`, in a thread (it runs an event loop of its own)."""
    assert await asyncio.to_thread(main, ["route", *args, "--redis-url", url]) == 0


async def test_routes_through_the_real_pipeline_with_kill_9(
    redis_client: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two routes declared before the pipeline starts; the copier's process killed (SIGKILL) three times while it copies;
    one route declared while the pipeline runs (from that moment) and one with --from-stream (all the stream holds)."""
    n = 15_000
    pending = 0
    events_file = tmp_path / "events.ndjson"
    write_events(events_file, n, seed=5, start=time.time() - n / 35)
    sent = [orjson.loads(line) for line in events_file.read_bytes().splitlines()]
    url = redis_server.url
    await cli(url, "add", "enwiki-humans", *ENWIKI_ARGS)
    await cli(url, "add", "creations", *CREATION_ARGS)
    procs = Processes(tmp_path, url, events_file, rate=1500)
    try:

        def published_at_least(k: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return int(await redis_client.hget(keys.PUBLISHER_STATS, "published") or 0) >= k

            return check

        steps = [(0.15, "kill"), (0.25, "late-bots"), (0.5, "kill"), (0.6, "backfill"), (0.85, "kill")]
        for at, step in steps:
            await wait_for(published_at_least(int(at * n)), 60, f"{at:.0%} published")
            if step == "kill":
                assert int(await redis_client.hget(keys.Route("creations").router_stats, "copied") or 0) > 0  # it copies
                deadline = time.monotonic() + 3
                # Handed over, at best while a batch is read and not yet acknowledged: mid-copy. Copied in Redis (here, one
                # Redis) nothing is ever pending: a copy and the group's move are one script, which no kill splits.
                while time.monotonic() < deadline:
                    if pending := (await redis_client.xpending("wiki:events", keys.ROUTES_GROUP))["pending"]:
                        break
                procs.kill_publisher()
                print(f"killed with {pending} entries pending")
            elif step == "late-bots":  # taken up by the running copier, from now on
                await cli(url, "add", "late-bots", "--where", "bot=true")
            else:  # all the stream holds
                await cli(url, "add", "backfill", "--where", "domain=de.wikipedia.org,fr.wikipedia.org", "--from-stream")

        async def settled() -> bool:
            if await redis_client.xlen("wiki:events") < n:
                return False
            groups = {g["name"]: g for g in await redis_client.xinfo_groups("wiki:events")}
            info = await redis_client.xinfo_stream("wiki:events")
            group = groups.get(keys.ROUTES_GROUP.encode())
            return group is not None and group["last-delivered-id"] == info["last-generated-id"] and group["pending"] == 0

        await wait_for(settled, 120, "the copier to catch up")
        await asyncio.sleep(1)
    finally:
        procs.stop()
    ingest = await redis_client.xrange("wiki:events")
    assert len(ingest) == n
    by_meta = {orjson.loads(f[b"data"])["meta"]["id"]: (i, f) for i, f in ingest}
    late_start = orjson.loads(await redis_client.hget(keys.ROUTES, "late-bots"))["start"]
    wheres: dict[str, Where] = {
        "enwiki-humans": ENWIKI_HUMANS, "creations": CREATIONS, "late-bots": {"bot": {True}},
        "backfill": {"domain": {"de.wikipedia.org", "fr.wikipedia.org"}},
    }  # fmt: skip
    for name, where in wheres.items():
        expected = [by_meta[e["meta"]["id"]] for e in sent if reference(e, where)]
        if name == "late-bots":  # from the moment it was declared
            expected = [(i, f) for i, f in expected if tuple(map(int, i.split(b"-"))) > tuple(map(int, late_start.split("-")))]
            assert 0 < len(expected) < sum(1 for e in sent if reference(e, where))
        got = await route_entries(redis_client, name)
        assert_same([i for i, _ in got], [i for i, _ in expected])  # every entry once, in order, with its original id
        assert [f for _, f in got] == [f for _, f in expected]  # and its fields, unchanged
        stats_ = await redis_client.hgetall(keys.Route(name).router_stats)
        # The counters are written after the copy (as the router's): a kill between them loses one batch's count, and
        # what the restart then copies again is counted as refused duplicates.
        copied, dups = int(stats_[b"copied"]), int(stats_.get(b"duplicates", 0))
        assert copied <= len(expected) <= copied + dups, name
    duplicates = [int((await redis_client.hget(keys.Route(name).router_stats, "duplicates")) or 0) for name in wheres]
    log = (tmp_path / "publisher.log").read_text()
    assert "Traceback" not in log
    print(f"duplicates refused after the kills: {sum(duplicates)}")


# ---- on a Redis Cluster ----------------------------------------------------------------------------------------------
async def test_routes_on_a_cluster(cluster_client: RedisCluster, cluster_settings: Settings) -> None:  # noqa: F811
    """Each route's write is one MULTI/EXEC in its own slot, on its own master: the same slices, each entry once."""
    s = cluster_settings
    layout = keys.Layout(s.stream, s.shards, cluster=True)
    lines = [line for line in calibrated_lines() if b'"canary"' not in line]
    await load_stream(cluster_client, lines[:3000], with_fold=True)
    await add_route(cluster_client, s, "enwiki-humans", ENWIKI_ARGS[1::2], from_stream=True)
    await add_route(cluster_client, s, "creations", CREATION_ARGS[1::2], from_stream=True)
    copier = RouteCopier(s, cluster_client, layout)
    assert await copier.lease.try_acquire() is None
    await copier.refresh()
    # The publisher's write never copies on a cluster (the routes' streams are in slots of their own): no CROSSSLOT.
    assert not copier.in_redis and copier.plan.at_write == b""
    lease = Lease(cluster_client, layout.publisher.lease, s.lease_ttl)
    writer = BatchWriter(s, cluster_client, lease, layout.publisher, layout.sharded, lambda: copier.plan)
    assert await lease.try_acquire() is None
    events = [orjson.loads(x) for x in lines[3000:3010]]
    batch = IngestBatch(frames=lines[3000:3010], folds=[summary_of(e) for e in events], ids=[e["meta"]["id"] for e in events])
    assert (await writer.write(batch, time.time())).routed is None
    await load_stream(cluster_client, lines[3010:], with_fold=True)
    reply = await cluster_client.xreadgroup(keys.ROUTES_GROUP, "routes", {s.stream: ">"}, count=20_000)
    entries = [(i, [f for kv in fields.items() for f in kv]) for i, fields in reply[0][1]]
    await copier.copy(entries[:3000])
    await copier.copy(entries)  # again, as after a kill before the XACK
    await copier._forget()
    ingest = dict(await cluster_client.xrange(s.stream))
    for name, where in (("enwiki-humans", ENWIKI_HUMANS), ("creations", CREATIONS)):
        got = list(await cluster_client.xrange(keys.Route(name).stream))
        assert meta_ids(got) == [orjson.loads(x)["meta"]["id"] for x in lines if reference(orjson.loads(x), where)]
        assert all(ingest[i] == fields for i, fields in got)
    assert (await cluster_client.hget(keys.Route("creations").router_stats, "duplicates")) is not None


# ---- through a failover: a replica of the ingest master first ----------------------------------------------------------
@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("replicated"), masters=3, replicas=1, node_timeout_ms=30_000) as c:
        yield c


async def test_a_batch_is_copied_only_once_a_replica_of_the_ingest_master_has_it(replicated: LocalCluster, settings: Settings) -> None:
    """The replica of the ingest stream's master stopped (SIGSTOP: it falls behind): entries added meanwhile are not
    copied to any route (a failover could take them away, and the publisher write them again under new ids) until the
    replica has them; then each is copied once."""
    s = dataclasses.replace(settings, redis_url=replicated.url, shards=3, consumer="", backoff_cap=0.5)
    client, layout = await open_client(s)
    assert isinstance(client, RedisCluster)
    lines = [line for line in calibrated_lines() if b'"canary"' not in line][:2000]
    replica = replicated.replica_of(replicated.master_of(s.stream))
    task: asyncio.Task[None] | None = None
    try:
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        await add_route(client, s, "creations", CREATION_ARGS[1::2], from_stream=True)
        copier = RouteCopier(s, client, layout)
        task = asyncio.create_task(copier.run())
        first = [x for x in lines[:1000] if reference(orjson.loads(x), CREATIONS)]
        await load_stream(client, lines[:1000], with_fold=True)

        async def copied(n: int) -> bool:
            return int(await client.xlen(keys.Route("creations").stream)) >= n

        await wait_for(lambda: copied(len(first)), 30, "the first entries copied", task)
        replicated.pause(replica)
        try:
            await load_stream(client, lines[1000:], with_fold=True)
            await asyncio.sleep(5)  # WAIT's 2 s, twice over: the copier retries, copying nothing
            assert await client.xlen(keys.Route("creations").stream) == len(first)
        finally:
            replicated.resume(replica)
        every = [x for x in lines if reference(orjson.loads(x), CREATIONS)]
        await wait_for(lambda: copied(len(every)), 30, "the rest copied once the replica has it", task)
        await asyncio.sleep(0.5)
        got = await route_entries(client, "creations")
        assert meta_ids(got) == [orjson.loads(x)["meta"]["id"] for x in every]  # each once, in order
    finally:
        if task is not None:
            await stop(task)
        await client.aclose()
