"""Shell queries: `python -m wikipulse counts` and `python -m wikipulse stats`."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from wikipulse import keys
from wikipulse.events import is_valid_domain
from wikipulse.eventstreams import parse_since
from wikipulse.series import bucket_range, read_series
from wikipulse.settings import Settings, SettingsError
from wikipulse.status import read_status

BY = {"type": keys.EVENT_TYPES, "bot": keys.BOT_DIMENSIONS}


def parse_time(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        return int(float(text)) if text.replace(".", "", 1).isdigit() else parse_since(text) // 1000
    except ValueError:
        raise SettingsError(f"not a time: {text!r} (unix seconds or ISO date)") from None


async def counts(settings: Settings, domain: str, resolution: str, since: str | None, until: str | None, by: str | None) -> dict[int, Any]:
    if domain not in (keys.ALL_DOMAINS, keys.OTHER_DOMAINS) and not is_valid_domain(domain):
        raise SettingsError(f"not a domain: {domain!r}")
    res = keys.RESOLUTION_BY_NAME[resolution]
    end = parse_time(until, int(time.time()))
    start = parse_time(since, end - 60 * res.step)
    dims = BY[by] if by else ("",)
    async with aioredis.Redis.from_url(settings.redis_url) as client:
        series = (await read_series(client, [domain], res, start, end, dims))[domain]
    out: dict[int, Any] = {}
    for i, bucket in enumerate(bucket_range(res, start, end)):
        if by:
            row = {d: series[d][i] for d in dims if series[d][i] is not None}
            if row:
                out[bucket] = row
        elif series[""][i] is not None:
            out[bucket] = series[""][i]
    return out


async def stats(settings: Settings) -> dict[str, Any]:
    async with aioredis.Redis.from_url(settings.redis_url) as client:
        return await read_status(client, settings.stream, settings.group)
