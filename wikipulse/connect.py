"""Connecting to Redis: one server or a Redis Cluster, detected from the server itself (INFO cluster) unless said.

Every process builds its client and the deployment's key layout (keys.Layout) here. On a cluster the client is
redis-py's RedisCluster: it follows MOVED/ASK, routes each command and script by its keys' slot, and splits a
non-transactional pipeline per node. The hot paths that keep a connection of their own (streams.StreamReader,
series.SeriesWriter, the pub/sub reader) take it from the node that serves their key's slot (raw_connection).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, TypeAlias

import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from wikipulse.keys import Layout
from wikipulse.retry import REDIS_ERRORS
from wikipulse.settings import OperatorError, Settings, redact_url

# Either client: both have the commands, pipelines and scripts wikipulse uses.
Client: TypeAlias = aioredis.Redis | RedisCluster
SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30}


def _cluster_enabled(info: dict[str, Any] | None) -> bool:
    """What the server's INFO cluster says."""
    return bool(info and info.get("cluster_enabled"))


async def is_cluster(settings: Settings) -> bool:
    """What settings.cluster says, or (auto) what the server says. Raises OperatorError when that is unanswerable."""
    if settings.cluster != "auto":
        return settings.cluster == "on"
    probe = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        async with probe:
            return _cluster_enabled(await probe.info("cluster"))
    except REDIS_ERRORS as exc:
        raise OperatorError(f"Redis at {redact_url(settings.redis_url)} unreachable: {type(exc).__name__}: {exc}") from None


async def open_client(settings: Settings, **options: Any) -> tuple[Client, Layout]:
    """A client for settings.redis_url (a cluster's node: any of them) and the deployment's layout."""
    cluster = await is_cluster(settings)
    layout = Layout(settings.stream, settings.shards, cluster)
    kwargs = {**CLIENT_OPTIONS, **options}
    if not cluster:
        return aioredis.Redis.from_url(settings.redis_url, **kwargs), layout
    client = RedisCluster.from_url(settings.redis_url, **kwargs)
    try:
        await client.initialize()
    except (*REDIS_ERRORS, redis.exceptions.RedisClusterException) as exc:
        await client.aclose()
        raise OperatorError(f"Redis Cluster at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}") from None
    return client, layout


def open_sync_client(settings: Settings, cluster: bool, **options: Any) -> SyncClient:
    """The blocking client of the page's callbacks."""
    client: SyncClient
    if cluster:
        client = redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    else:
        client = redis.Redis.from_url(settings.redis_url, **options)
    return client


def is_cluster_sync(settings: Settings) -> bool:
    if settings.cluster != "auto":
        return settings.cluster == "on"
    try:
        with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10) as probe:
            return _cluster_enabled(probe.info("cluster"))
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False  # the page starts anyway and says Redis is down; restart it once Redis is there


def raw_connection(client: Client, key: str) -> Connection:
    """A new connection of its own to the server that holds `key`, with the client's options (TLS, password,
    timeouts). On a cluster, the node that serves key's slot now; a caller that meets MOVED makes a new one."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key)
        connection: Connection = node.connection_class(**node.connection_kwargs)
        return connection
    return client.connection_pool.make_connection()


async def refresh(client: Client) -> None:
    """On a cluster, learn which node serves which slot again (after a failover or a resharding); best effort."""
    if isinstance(client, RedisCluster):
        with contextlib.suppress(*REDIS_ERRORS, redis.exceptions.RedisClusterException):
            await client.nodes_manager.initialize()


def pack(args: Sequence[bytes | str | int]) -> bytes:
    """One command in Redis's wire format (RESP). redis-py's pack_command costs ~0.7 µs an argument, which a batch's
    ~1,400 declared keys would make 3% of the fold; this costs a third of that."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)
