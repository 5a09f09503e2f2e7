"""The deployment's shard count is recorded in Redis: another count is refused in one line, and changed on purpose
with `shards --set N`, without counting an event twice (SHARDS 1 -> 3 -> 1 used to count 2,466 of 6,948 twice)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from wikipulse.core import model
from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import Settings
from wikipulse.devtools.redis_server import LocalCluster, RedisServer, free_port
from wikipulse.store import keys
from wikipulse.store.connect import open_client
from wikipulse.store.shards import change_shards, check_shards, is_fold_key, is_lease
from wikipulse.store.status import read_status

ROOT = Path(__file__).resolve().parent.parent
PHASE = 1000  # events each phase adds
START = time.time() - 4 * PHASE / 35  # the feed's clock, fixed: each phase's feed serves the same events, and more


def env_of(redis_url: str, shards: int) -> dict[str, str]:
    drop = ("REDIS_URL", "SHARDS", "SUBSCRIBER_SHARDS", "WIKI_STREAM_URL", "CONSUMER_NAME")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "REDIS_URL": redis_url, "SHARDS": str(shards),
            "LOG_LEVEL": "WARNING", "LEASE_TTL": "2"}  # fmt: skip


def wikipulse(redis_url: str, shards: int, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "wikipulse", *args]
    return subprocess.run(command, env=env_of(redis_url, shards), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@contextmanager
def pipeline(redis_url: str, shards: int, events: int) -> Iterator[None]:
    """A feed serving the first `events` of the fixed simulation, a publisher (which routes, sharded) and a subscriber,
    as separate processes; stopped with SIGINT as an operator would."""
    port = free_port()
    env = {**env_of(redis_url, shards), "WIKI_STREAM_URL": f"http://127.0.0.1:{port}/v2/stream/recentchange"}
    feed = ["-m", "wikipulse", "simulate", "--count", str(events), "--rate", "0", "--start", str(START), "--seed", "5", "--port", str(port)]
    processes = [subprocess.Popen([sys.executable, *feed], env=env, stdin=subprocess.DEVNULL)]
    time.sleep(1.0)
    for script in ("publisher.py", "subscriber.py"):
        processes.append(subprocess.Popen([sys.executable, str(ROOT / script)], env=env, cwd=ROOT, stdin=subprocess.DEVNULL))
    try:
        yield
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGINT)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def folded(redis_url: str, shards: int, n: int, timeout: float = 60) -> dict[str, object]:
    """The pipeline's status once it folded n events (and published no more than n)."""
    settings = Settings.from_args(environ={}, redis_url=redis_url, shards=shards)
    client, layout = await open_client(settings)
    deadline = time.monotonic() + timeout
    async with client:
        while True:
            status = await read_status(client, layout, settings.group)
            if status["folded"] >= n or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)


def counted(redis_url: str, shards: int) -> int:
    """`counts _all` by the hour, summed: what the page and `counts` show for every event."""
    result = wikipulse(redis_url, shards, "counts", "_all", "--resolution", "1h", "--since", str(int(START) - 7200))
    assert result.returncode == 0, result.stderr
    return sum(orjson.loads(result.stdout).values())


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
async def forget(redis_server: RedisServer) -> AsyncIterator[None]:
    """Leave no record behind for the next test on this Redis, whatever happens."""
    yield
    async with aioredis.Redis.from_url(redis_server.url) as client:
        await client.flushall()


async def test_another_shard_count_is_refused_and_changed_on_purpose_without_double_counting(
    redis_client: aioredis.Redis, redis_server: RedisServer, forget: None
) -> None:
    url = redis_server.url
    with pipeline(url, 1, PHASE):
        assert (await folded(url, 1, PHASE))["folded"] == PHASE
        assert await redis_client.get(keys.SHARDS_RECORD) == b"1"  # recorded by the first writer
        # Every role that depends on the count refuses another one, in one line naming the fix.
        for role in (("subscribe",), ("publish",), ("archive", "--archive-dir", str(redis_server.data_dir / "archive")),
                     ("counts", "_all"), ("stats",), ("trending",), ("new-pages",), ("dash", "--port", str(free_port())),
                     ("up", "--simulate", "--data-dir", str(redis_server.data_dir / "up"))):  # fmt: skip
            line = one_line(wikipulse(url, 3, *role))
            assert "is a deployment of SHARDS=1, not 3" in line and "shards --set 3" in line, (role, line)
        # The change on purpose is refused while the pipeline runs.
        assert "still runs" in one_line(wikipulse(url, 3, "shards", "--set", "3"))
    assert counted(url, 1) == PHASE

    await asyncio.sleep(2.5)  # the consumer-name lease of a stopped subscriber lapses (LEASE_TTL 2 s)
    changed = wikipulse(url, 1, "shards", "--set", "3")
    assert changed.returncode == 0, changed.stderr
    report = orjson.loads(changed.stdout)
    assert (report["was"], report["shards"], report["groups_destroyed"]) == (1, 3, ["wikipulse"])
    assert orjson.loads(wikipulse(url, 3, "shards").stdout) == {"shards": 3}
    same = orjson.loads(wikipulse(url, 3, "shards", "--set", "3").stdout)  # the count it has: nothing is dropped
    assert (same["was"], same["fold_keys_removed"], same["groups_destroyed"]) == (3, 0, [])
    with pipeline(url, 3, 2 * PHASE):  # the new layout folds the ingest stream again, then the new events
        status = await folded(url, 3, 2 * PHASE)
        assert (status["published"], status["folded"], status["duplicates"]) == (2 * PHASE, 2 * PHASE, 0)
        assert "not 1" in one_line(wikipulse(url, 1, "subscribe"))
    assert counted(url, 3) == 2 * PHASE

    await asyncio.sleep(2.5)
    assert wikipulse(url, 3, "shards", "--set", "1").returncode == 0
    with pipeline(url, 1, 3 * PHASE):  # back: the publisher resumes where the second layout stopped
        status = await folded(url, 1, 3 * PHASE)
        assert (status["published"], status["folded"], status["duplicates"]) == (3 * PHASE, 3 * PHASE, 0)
    assert counted(url, 1) == 3 * PHASE  # every distinct event once (it was 9,414 for 6,948)


@pytest.mark.parametrize("sharded", [False, True])
def test_what_a_change_drops_and_keeps(sharded: bool) -> None:
    """Classified from the key names keys.py makes, so that a new key cannot drift out of the list unnoticed."""
    layout = keys.Layout("wiki:events", 3 if sharded else 1)
    shard = layout.all_shards[-1]
    res = model.RESOLUTIONS[0]
    fold = [shard.series_key("en.wikipedia.org", res, 0), shard.series_key(keys.ALL_DOMAINS, res, 0), shard.rank_key(60),
            shard.trend_key("byeditor", "en.wikipedia.org", 60), shard.trend_key("all", keys.ALL_DOMAINS, 60), shard.new_pages,
            shard.stats, shard.claims, shard.consumer_lease("wikipulse", "host"), keys.DOMAINS]  # fmt: skip
    if sharded:
        fold += [shard.stream, shard.router_lease, shard.router_stats]
    kept = [*vars(layout.publisher).values(), layout.archiver_stats, layout.archiver_batches("archiver"),
            layout.archiver_lease("archiver"), keys.ALERTS, keys.alert_marker("en.wikipedia.org", 60), keys.SHARDS_RECORD]  # fmt: skip
    assert [k for k in fold if not is_fold_key(k, layout.stream)] == []
    assert [k for k in kept if is_fold_key(k, layout.stream)] == []
    leases = {layout.publisher.lease, layout.archiver_lease("archiver"), shard.consumer_lease("wikipulse", "host")}
    leases |= {shard.router_lease} if sharded else set()
    assert {k for k in fold + kept if is_lease(k)} == leases


async def test_a_change_on_a_cluster_drops_the_fold_of_every_master(tmp_path: Path) -> None:
    """On a 3-master cluster: SCAN and UNLINK reach every master; the publisher's keys keep their names (a cluster's
    layout is sharded whatever the count); the router's group is destroyed, the archiver's kept."""
    with LocalCluster(tmp_path / "cluster", masters=3, appendonly=False) as cluster:
        settings = Settings.from_args(environ={}, redis_url=cluster.url, shards=3)
        client, layout = await open_client(settings)
        async with client:
            await check_shards(client, settings)  # records 3
            fold = [shard.stats for shard in layout.all_shards] + [shard.series_key("en.wikipedia.org", model.RESOLUTIONS[0], 0)
                                                                    for shard in layout.all_shards]  # fmt: skip
            for key in fold:
                await client.hset(key, "x", 1)
            await client.set(layout.publisher.position, "[position]")
            await client.xgroup_create(layout.stream, layout.router_group, id="0", mkstream=True)
            await client.xgroup_create(layout.stream, "archiver", id="0")
            with pytest.raises(OperatorError, match="not 2"):
                await check_shards(client, dataclasses.replace(settings, shards=2))
            change = await change_shards(client, settings, 2, cluster=True)
            assert (change.was, change.removed, change.renamed, change.groups_destroyed) == (3, len(fold), [], [layout.router_group])
            assert [k for k in fold if await client.exists(k)] == []
            assert await client.get(layout.publisher.position) == b"[position]"
            assert [g["name"] for g in await client.xinfo_groups(layout.stream)] == [b"archiver"]
            await check_shards(client, dataclasses.replace(settings, shards=2))
