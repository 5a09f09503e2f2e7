"""Connecting to Redis: one server or a Redis Cluster, detected from the server itself (INFO cluster) unless said.

Every process builds its client and the deployment's key layout (keys.Layout) here. On a cluster the client is
redis-py's RedisCluster: it follows MOVED/ASK, routes each command and script by its keys' slot, and splits a
non-transactional pipeline per node. The hot paths that keep a connection of their own (streams.StreamReader,
series.SeriesWriter, router.ShardWriter, the pub/sub reader) take it from the node that serves their key's slot
(raw_connection, NodeConnection), and make it again from the slot map as it is after an error (refresh): after a
failover, that is the new master. A write whose acknowledgement lives on another master waits for a replica of its own
first (ReplicaWait).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.cluster import ClusterNode, NodesManager, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, NoScriptError, ResponseError

from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import RedisSettings, redact_url
from wikipulse.store.keys import Layout
from wikipulse.store.retry import REDIS_ERRORS, ReplicaBehind, drop

# Either client: both have the commands, pipelines and scripts wikipulse uses.
Client: TypeAlias = aioredis.Redis | RedisCluster
SyncClient: TypeAlias = redis.Redis | redis.cluster.RedisCluster

CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30}


def _cluster_enabled(info: dict[str, Any] | None) -> bool:
    """What the server's INFO cluster says."""
    return bool(info and info.get("cluster_enabled"))


async def is_cluster(settings: RedisSettings) -> bool:
    """What settings.cluster says, or (auto) what the server says. Raises OperatorError when that is unanswerable."""
    if settings.cluster != "auto":
        return settings.cluster == "on"
    probe = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        async with probe:
            return _cluster_enabled(await probe.info("cluster"))
    except REDIS_ERRORS as exc:
        raise OperatorError(f"Redis at {redact_url(settings.redis_url)} unreachable: {type(exc).__name__}: {exc}") from None


async def open_client(settings: RedisSettings, **options: Any) -> tuple[Client, Layout]:
    """A client for settings.redis_url (a cluster's node: any of them) and the deployment's layout."""
    cluster = await is_cluster(settings)
    layout = Layout(settings.stream, settings.shards, cluster)
    kwargs = {**CLIENT_OPTIONS, **options}
    if not cluster:
        return aioredis.Redis.from_url(settings.redis_url, **kwargs), layout
    client = FailoverCluster.from_url(settings.redis_url, **kwargs)
    try:
        await client.initialize()
    except (*REDIS_ERRORS, redis.exceptions.RedisClusterException) as exc:
        await client.aclose()
        raise OperatorError(f"Redis Cluster at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}") from None
    return client, layout


def open_sync_client(settings: RedisSettings, cluster: bool, **options: Any) -> SyncClient:
    """The blocking client of the page's callbacks."""
    client: SyncClient
    if cluster:
        client = redis.cluster.RedisCluster.from_url(settings.redis_url, **options)
    else:
        client = redis.Redis.from_url(settings.redis_url, **options)
    return client


def is_cluster_sync(settings: RedisSettings) -> bool:
    if settings.cluster != "auto":
        return settings.cluster == "on"
    try:
        with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10) as probe:
            return _cluster_enabled(probe.info("cluster"))
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False  # the page starts anyway and says Redis is down; restart it once Redis is there


class FailoverCluster(RedisCluster):  # type: ignore[misc]
    """redis-py's cluster client (6.4), made to ride through a failover, where its own handling breaks the tasks that
    share it:

    - on a connection error it closes every connection it holds, to learn the slot map again: a command another task
      has in flight on one of them fails with `AttributeError: 'NoneType' object has no attribute 'writelines'` (or
      `readline`). That connection was closed under it: the connections say so, as a ConnectionError (_SurvivesResets).
    - a transaction (the archiver's MULTI) that meets a connection error records it as if it were a MOVED, and every
      command of every task then fails with `AttributeError: 'ConnectionError' object has no attribute 'host'` until the
      slot map is learnt again (redis/redis-py#3815). Only a MOVED is recorded now: the next command to a dead node
      meets its connection error again, and the client learns the slot map then (_NodesManager).
    - a script's EVALSHA that finds no script on a new master (a replica's script cache is its own) loads it on the
      masters the client knows, which may not yet include the new one, and fails again with NoScriptError. Scripts
      fall back to EVAL, which goes to the master of their keys (_Script).
    - a connection error takes its node out of the nodes the client learns the slot map from; with several tasks
      meeting errors at once, none can be left, and the client never connects again ("Redis Cluster cannot be
      connected. Please provide at least one reachable node: None"). Every node it ever knew stays one (initialize).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ssl = self.connection_kwargs.get("connection_class") is SSLConnection
        cls = _ClusterSSLConnection if ssl else _ClusterConnection
        self.connection_kwargs["connection_class"] = cls  # the nodes manager makes every node it learns with these
        for node in self.nodes_manager.startup_nodes.values():
            node.connection_class = cls
        self.nodes_manager.__class__ = _NodesManager  # the same object (its class has slots: no attribute can be set)
        self._known: dict[str, tuple[str, int]] = {}  # every node ever known, by name: (host, port)

    def register_script(self, script: str) -> _Script:
        return _Script(self, script)

    async def initialize(self) -> FailoverCluster:
        if self._initialize:
            manager = self.nodes_manager
            nodes = [*manager.startup_nodes.values(), *manager.nodes_cache.values()]
            self._known.update({node.name: (node.host, node.port) for node in nodes})
            for name, (host, port) in self._known.items():
                if name not in manager.startup_nodes:
                    manager.startup_nodes[name] = ClusterNode(host, port, **self.connection_kwargs)
        await super().initialize()
        return self


class _SurvivesResets:
    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await cast(Any, super()).send_packed_command(command, check_health)
        except AttributeError as exc:
            raise _closed_under_us(exc) from None

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await cast(Any, super()).read_response(*args, **kwargs)
        except AttributeError as exc:
            raise _closed_under_us(exc) from None


class _ClusterConnection(_SurvivesResets, Connection):  # type: ignore[misc]
    pass


class _ClusterSSLConnection(_SurvivesResets, SSLConnection):  # type: ignore[misc]
    pass


def _closed_under_us(exc: AttributeError) -> Exception:
    if "'NoneType' object has no attribute" not in str(exc):
        return exc  # not a closed connection's reader or writer: a real bug, raised as it is
    closed: Exception = RedisConnectionError("the connection was closed while in use (the cluster client is re-learning the slot map)")
    return closed


class _NodesManager(NodesManager):  # type: ignore[misc]
    __slots__ = ()

    def update_moved_exception(self, exception: Exception) -> None:
        if isinstance(exception, MovedError):
            super().update_moved_exception(exception)


class _Script(AsyncScript):  # type: ignore[misc]
    async def __call__(self, keys: Sequence[Any] | None = None, args: Sequence[Any] | None = None, client: Any = None) -> Any:
        try:
            return await super().__call__(keys, args, client)
        except NoScriptError:
            keys, args = list(keys or []), list(args or [])
            return await (client or self.registered_client).eval(self.script, len(keys), *keys, *args)


def raw_connection(client: Client, key: str) -> Connection:
    """A new connection of its own to the server that holds `key`, with the client's options (TLS, password,
    timeouts). On a cluster, the node that serves key's slot now; a caller that meets MOVED makes a new one."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(key)
        connection: Connection = node.connection_class(**node.connection_kwargs)
        return connection
    return client.connection_pool.make_connection()


class NodeConnection:
    """A connection of its own to the server that holds `key`. Dropped after an error, it is made again on its next use,
    from the client's slot map as it is then: after a failover (and refresh), to the new master of the slot."""

    def __init__(self, client: Client, key: str) -> None:
        self.client, self.key = client, key
        self._connection: Connection | None = None

    @property
    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = raw_connection(self.client, self.key)
        return self._connection

    async def drop(self) -> None:
        """Close it, with any reply still on its way (see retry.drop)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await drop(connection)

    async def transaction(self, commands: Sequence[Sequence[bytes | str | int | float]]) -> list[Any]:
        """MULTI, the commands (their keys in one slot), EXEC: the replies, or the first error raised (a command refused
        when queued, OOM or MOVED, makes EXEC refuse all). In one round trip, on this connection: redis-py 6.4's
        cluster transactions run each queued command in a thread of its own with an event loop of its own and wait
        for it, which deadlocks the whole process on the client's lock while it is learning the slot map (a failover).
        Any other error drops the connection: the transaction was applied whole or not at all."""
        try:
            connection = self.connection
            await connection.send_packed_command(b"".join(pack(command) for command in [("MULTI",), *commands, ("EXEC",)]))
            refused: ResponseError | None = None
            for _ in range(len(commands) + 1):  # OK, then QUEUED each
                try:
                    await connection.read_response()
                except ResponseError as exc:
                    refused = refused or exc
            try:
                replies = list(await connection.read_response())
            except ResponseError as exc:
                raise (refused or exc) from None
        except BaseException:
            await self.drop()
            raise
        failed = next((r for r in replies if isinstance(r, ResponseError)), None)
        if failed is not None:
            raise failed
        return replies


# How long a write whose acknowledgement lives elsewhere waits for a replica to confirm it. A healthy replica on the
# same network confirms within a millisecond or two; longer is a replica that fell behind (or is going away).
REPLICA_WAIT_MS = 2000
REPLICAS_TTL = 5.0  # seconds a master's count of replicas is trusted before ROLE is asked again


class ReplicaWait:
    """Making a write on a cluster master survive a failover of that master before its effect is acknowledged
    elsewhere (on another master, or in ClickHouse). Replication is asynchronous: a master can acknowledge a write and
    die before any replica has it, and the replica that replaces it knows nothing of it. `WAIT 1 <ms>` on the
    connection that wrote returns once a replica has everything that connection wrote.

    How many replicas to ask for: a master without one (a cluster run without replicas, or a new master whose old one
    has not rejoined) has nothing to wait for, and WAIT would hold each write for the whole timeout; so the master's
    online replicas are counted (ROLE, through the cluster client) every REPLICAS_TTL seconds. On one Redis, nothing
    waits (its acknowledgements and effects fail together)."""

    def __init__(self, client: Client, key: str) -> None:
        self.client, self.key = client, key
        self._replicas, self._counted_at = 0, -1e9

    async def wanted(self) -> int:
        """How many replicas WAIT should ask for now: 1, or 0 (WAIT need not be sent)."""
        if not isinstance(self.client, RedisCluster):
            return 0
        if time.monotonic() - self._counted_at > REPLICAS_TTL:
            await self._count()
        return min(1, self._replicas)

    def command(self, wanted: int) -> bytes:
        return pack(("WAIT", wanted, REPLICA_WAIT_MS))

    async def check(self, wanted: int, confirmed: int) -> None:
        """WAIT answered `confirmed`; raise ReplicaBehind when a replica that is there did not confirm in time."""
        if confirmed >= wanted:
            return
        await self._count()  # the replica may have gone (a failover under way): nothing left to wait for
        if self._replicas:
            raise ReplicaBehind(f"no replica of the master of {self.key!r} confirmed the write within {REPLICA_WAIT_MS} ms")

    async def _count(self) -> None:
        assert isinstance(self.client, RedisCluster)
        node = self.client.get_node_from_key(self.key)
        role = await self.client.execute_command("ROLE", target_nodes=node)
        # A master answers [b"master", offset, [[ip, port, offset], ...]] with its online replicas; after a failover the
        # node may be a replica now: its slot moved, and the write is routed again from the new slot map.
        self._replicas = len(role[2]) if role and role[0] in (b"master", "master") else 0
        self._counted_at = time.monotonic()


async def refresh(client: Client) -> None:
    """On a cluster, learn which node serves which slot again (after a failover or a resharding); best effort."""
    if isinstance(client, RedisCluster):
        with contextlib.suppress(*REDIS_ERRORS, redis.exceptions.RedisClusterException):
            await client.nodes_manager.initialize()


def pack(args: Sequence[bytes | str | int | float]) -> bytes:
    """One command in Redis's wire format (RESP). redis-py's pack_command costs ~0.7 µs an argument, which a batch's
    ~1,400 declared keys would make 3% of the fold; this costs a third of that."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(parts)
