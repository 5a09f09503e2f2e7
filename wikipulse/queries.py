"""Shell queries: `python -m wikipulse counts`, `stats`, `trending`, `new-pages`, `sql` and `history`."""

from __future__ import annotations

import time
from typing import Any

from wikipulse.archive.reader import archive_query
from wikipulse.core import model
from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.events import is_valid_domain
from wikipulse.core.settings import ArchiveSettings, CountsSettings, RedisSettings, StatsSettings
from wikipulse.devtools.eventstreams import parse_since
from wikipulse.fold.series import bucket_range, read_series
from wikipulse.ingest.routes import read_route_counters
from wikipulse.store import keys
from wikipulse.store.connect import Client, open_client
from wikipulse.store.shards import check_shards
from wikipulse.store.status import read_status

BY = {"type": model.EVENT_TYPES, "bot": model.BOT_DIMENSIONS}
MAX_BUCKETS = 20_000  # buckets one `counts` call may ask for: a year of hours, a day of 10 s buckets


def parse_time(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        t = int(float(text)) if text.strip().lstrip("-").replace(".", "", 1).isdigit() else parse_since(text) // 1000
    except ValueError:
        raise SettingsError(f"not a time: {text!r} (unix seconds or ISO date)") from None
    if t < 0:
        raise SettingsError(f"not a time: {text!r} is before 1970")
    return t


def bounded_range(res: model.Resolution, since: str | None, until: str | None, retention: int, now: int) -> tuple[int, int]:
    """(start, end) of a counts query: nothing older than the resolution's retention is kept, so the start
    is clamped to it; what is left must fit in MAX_BUCKETS."""
    end = parse_time(until, now)
    start = parse_time(since, end - 60 * res.step)
    if start > end:
        raise SettingsError(f"--since ({start}) is after --until ({end})")
    start = max(start, min(end, now - retention))
    buckets = (end - start) // res.step + 1
    if buckets > MAX_BUCKETS:
        raise SettingsError(
            f"{buckets} buckets of {res.name} asked for, at most {MAX_BUCKETS}: use a coarser --resolution or a shorter range"
        )
    return start, end


async def open_reader(settings: RedisSettings) -> tuple[Client, keys.Layout]:
    """open_client for a command that only reads: it refuses a shard count other than the deployment's (shards.py),
    which would read other keys than the pipeline writes."""
    client, layout = await open_client(settings)
    try:
        await check_shards(client, settings, record=False)
    except BaseException:
        await client.aclose()
        raise
    return client, layout


async def counts(
    settings: CountsSettings, domain: str, resolution: str, since: str | None, until: str | None, by: str | None
) -> dict[int, Any]:
    if domain not in (keys.ALL_DOMAINS, keys.OTHER_DOMAINS) and not is_valid_domain(domain):
        raise SettingsError(f"not a domain: {domain!r}")
    res = model.RESOLUTION_BY_NAME[resolution]
    start, end = bounded_range(res, since, until, settings.retention_seconds()[res.name], int(time.time()))
    dims = BY[by] if by else ("",)
    client, layout = await open_reader(settings)
    async with client:
        series = (await read_series(client, [domain], res, start, end, dims, layout))[domain]
    out: dict[int, Any] = {}
    for i, bucket in enumerate(bucket_range(res, start, end)):
        if by:
            row = {d: series[d][i] for d in dims if series[d][i] is not None}
            if row:
                out[bucket] = row
        elif series[""][i] is not None:
            out[bucket] = series[""][i]
    return out


async def stats(settings: StatsSettings) -> dict[str, Any]:
    client, layout = await open_reader(settings)
    async with client:
        if not await client.exists(settings.stream):
            raise OperatorError(f"no stream {settings.stream!r} in this Redis: has the publisher run, and is --stream right?")
        folded = layout.all_shards[0].stream  # the stream the subscribers read (sharded: each shard's, made alike)
        if not await client.exists(folded):
            raise OperatorError(f"no stream {folded!r}: the router (in the publisher's process) has not routed anything yet")
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in await client.xinfo_groups(folded)}
        if settings.group not in groups:
            raise OperatorError(f"no consumer group {settings.group!r} on {folded!r} (there are: {sorted(groups) or 'none'})")
        status = await read_status(client, layout, settings.group)
        status["routes"] = await read_route_counters(client)  # per route: copied, duplicates, length, trimmed_unread
        return status


MAX_LIMIT = 1000


def _domains(domain: str | None) -> list[str] | None:
    if domain is None or domain == keys.ALL_DOMAINS:
        return None
    if not is_valid_domain(domain):
        raise SettingsError(f"not a domain: {domain!r}")
    return [domain]


def parse_namespaces(text: str | None) -> list[int] | None:
    """ "0,1" -> [0, 1]; "all" or None -> None (every namespace)."""
    if text is None or text == "all":
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise SettingsError(f"not namespaces: {text!r} (numbers such as 0 or 0,1,4, or all)") from None


async def trending(
    settings: RedisSettings, domain: str | None, minutes: int, limit: int, who: str = "all", namespaces: str | None = None
) -> dict[str, Any]:
    from wikipulse.fold.trending import links, read_trending

    if minutes not in keys.TREND_WINDOWS:
        raise SettingsError(f"--minutes {minutes}: trending is kept for {' or '.join(map(str, keys.TREND_WINDOWS))} minutes")
    if not 1 <= limit <= MAX_LIMIT:
        raise SettingsError(f"--limit {limit}: from 1 to {MAX_LIMIT}")
    domains, wanted = _domains(domain), parse_namespaces(namespaces)
    now = int(time.time())
    client, layout = await open_reader(settings)
    async with client:
        rows = await read_trending(client, layout, now, minutes, limit, domains, who, wanted)
    return {
        "domain": domain or keys.ALL_DOMAINS, "minutes": minutes, "who": who, "humans": who == "humans", "namespaces": wanted,
        "at": now,
        "pages": [{**row.as_json(), **links(row.domain, row.title)} for row in rows],
    }  # fmt: skip


async def new_pages(
    settings: RedisSettings, domain: str | None, limit: int, humans: bool, namespaces: str | None = "0"
) -> list[dict[str, Any]]:
    from wikipulse.fold.trending import links, read_new_pages

    if not 1 <= limit <= keys.NEW_PAGES_KEEP:
        raise SettingsError(f"--limit {limit}: from 1 to {keys.NEW_PAGES_KEEP}")
    client, layout = await open_reader(settings)
    async with client:
        items = await read_new_pages(client, layout, limit, _domains(domain), parse_namespaces(namespaces), humans)
    return [{**item, **links(item["domain"], item["title"], item["revision"])} for item in items]


def history(settings: ArchiveSettings, domain: str, since: str | None, until: str | None) -> bytes:
    """Events a day for a domain (or _all) from the archive, over any range it holds (default: the last 30 days)."""
    from wikipulse.archive.table import daily_counts_sql

    if domain != keys.ALL_DOMAINS and not is_valid_domain(domain):
        raise SettingsError(f"not a domain: {domain!r}")
    end = parse_time(until, int(time.time()))
    start = parse_time(since, end - 30 * 86400)
    if start > end:
        raise SettingsError(f"--since ({start}) is after --until ({end})")
    return archive_query(settings, daily_counts_sql(domain, start, end))
