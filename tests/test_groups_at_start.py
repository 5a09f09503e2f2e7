"""Every consumer group a deployment runs exists from the stream's first entry (trimming.py): an archiver started
seconds after the publisher archives every event, against a real Redis, a real local EventStreams server and the
real embedded ClickHouse engine (chDB)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import ServeFn
from tests.helpers import calibrated_lines, calibrated_source, non_canary_ids, run_publisher_until
from tests.test_subscriber import load_stream
from wikipulse.archive.table import Archive, connect
from wikipulse.core.settings import Settings
from wikipulse.devtools.redis_server import free_port
from wikipulse.store import keys

pytest.importorskip("chdb")

EXPECTED = non_canary_ids(calibrated_lines())


@pytest.fixture
def late(settings: Settings, tmp_path: Path) -> Settings:
    """The archiver as `up` and docker-compose run it, without --from-stream."""
    return dataclasses.replace(settings, archive_dir=str(tmp_path / "clickhouse"), archive_port=free_port(), archive_from_stream=False)


@pytest.fixture
def opened(late: Settings) -> Iterator[Archive]:
    archive = Archive(connect(late))
    archive.ensure_schema()
    yield archive
    archive.close()


async def _published(client: aioredis.Redis, n: int) -> bool:
    return int(await client.hget(keys.PUBLISHER_STATS, "published") or 0) >= n


async def test_an_archiver_started_after_the_publisher_archives_every_event(
    redis_client: aioredis.Redis, late: Settings, opened: Archive, eventstreams: ServeFn
) -> None:
    """A fresh deployment: the publisher publishes 9,996 events, the archiver starts seconds later. Today its group
    was made "from now" and it archived none of them (a fresh `up` lost its first second or so)."""
    from tests.test_archiver import archive_all

    _, url = await eventstreams(calibrated_source(), None)
    await run_publisher_until(dataclasses.replace(late, stream_url=url), lambda c: _published(c, len(EXPECTED)))
    await asyncio.sleep(2)
    await archive_all(late, redis_client, opened)
    assert opened.query("SELECT count(), uniqExact(meta_id) FROM events")[1] == [(len(EXPECTED), len(EXPECTED))]


async def test_a_new_group_starts_at_the_first_entry_over_an_empty_archive_else_from_now(
    redis_client: aioredis.Redis, late: Settings, opened: Archive
) -> None:
    """A stream the archiver's group was not made with (not declared): over an empty archive the group starts at the
    stream's first entry (nothing of it is archived yet); over an archive that holds rows, a new group (another
    ARCHIVE_GROUP) starts from now, and what the stream holds is not archived twice."""
    from tests.test_archiver import archive_all

    s = dataclasses.replace(late, stream_consumers="subscriber")
    lines = calibrated_lines()[:1000]
    await load_stream(redis_client, lines, with_fold=True)
    await archive_all(s, redis_client, opened)
    expected = len(non_canary_ids(lines))
    assert opened.query("SELECT count() FROM events")[1] == [(expected,)]
    await archive_all(dataclasses.replace(s, archive_group="archiver-2"), redis_client, opened)
    assert opened.query("SELECT count() FROM events")[1] == [(expected,)]
    groups = {g["name"]: g for g in await redis_client.xinfo_groups(s.stream)}
    last = (await redis_client.xrevrange(s.stream, count=1))[0][0]
    assert groups[b"archiver-2"]["last-delivered-id"] == last  # from now
