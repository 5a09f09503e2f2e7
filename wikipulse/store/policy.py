"""What wikipulse needs of the Redis it writes to, checked at start.

An evicting `maxmemory-policy` (allkeys-lru, volatile-ttl, ...) lets Redis delete the stream, the
consumer groups or the counts (which carry TTLs) to make room, and nothing would say so. Like the
job queues built on Redis, wikipulse refuses to write to such a Redis unless told otherwise.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import ServiceSettings, redact_url
from wikipulse.store.retry import REDIS_ERRORS, Backoff, pause_before_retry
from wikipulse.store.shards import check_shards

logger = logging.getLogger(__name__)


async def maxmemory_policy(client: aioredis.Redis) -> str | None:
    """The server's maxmemory-policy; from INFO where CONFIG is disabled (managed Redis), None if neither says."""
    try:
        reply = await client.config_get("maxmemory-policy")
        if reply.get("maxmemory-policy"):
            return str(reply["maxmemory-policy"])
    except ResponseError:
        pass
    info = await client.info("memory")
    policy = info.get("maxmemory_policy")
    return None if policy is None else str(policy)


async def check_redis(client: aioredis.Redis, settings: ServiceSettings) -> None:
    """Wait for Redis to answer, then refuse an evicting one (OperatorError) unless allow_eviction, and a shard count
    other than the deployment's (shards.py; recorded here by the first writer)."""
    await _check_policy(client, settings)
    await check_shards(client, settings)


async def _check_policy(client: aioredis.Redis, settings: ServiceSettings) -> None:
    backoff = Backoff(settings.backoff_cap)
    while True:
        try:
            policy = await maxmemory_policy(client)
            break
        except REDIS_ERRORS as exc:
            delay = backoff.next_delay()
            logger.warning("Redis at %s unavailable (%s); retrying in %.1fs", redact_url(settings.redis_url), exc, delay)
            await pause_before_retry(delay)
    if policy is None:
        logger.warning("could not read Redis's maxmemory-policy: make sure it is noeviction")
        return
    if policy == "noeviction":
        return
    message = (
        f"Redis at {redact_url(settings.redis_url)} has maxmemory-policy {policy}: when full it evicts keys, which "
        "silently drops the stream, its consumer groups and the counts. Set maxmemory-policy noeviction "
        "(wikipulse then pauses while Redis is full and loses nothing), or pass --allow-eviction to run anyway."
    )
    if not settings.allow_eviction:
        raise OperatorError(message)
    logger.warning("%s (running anyway: --allow-eviction)", message)
