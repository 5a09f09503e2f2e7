"""The fold's at-most-once source: the pub/sub channel, as Redis pub/sub is. What is published while it is
disconnected is missed, and it says so in the log when it resubscribes."""

from __future__ import annotations

import logging
import time

from redis.asyncio.connection import Connection

from wikipulse.core.settings import SubscriberSettings
from wikipulse.fold.folder import Folder
from wikipulse.fold.writes import WritePipeline
from wikipulse.store.connect import Client, raw_connection
from wikipulse.store.retry import REDIS_ERRORS, RedisFull, drop, pause_before_retry, stop_if_cancelled

logger = logging.getLogger(__name__)

PUBSUB_SILENCE = 30  # seconds without a message or a PING reply before the pub/sub connection counts as dead


class PubSubSource:
    def __init__(self, settings: SubscriberSettings, client: Client, folder: Folder, writes: WritePipeline) -> None:
        self.settings, self.client, self.folder, self.writes = settings, client, folder, writes
        self.batch_size = settings.read_batch_size  # as the stream's: bigger batches fold better
        self.caught_up = True  # pub/sub has no backlog

    async def run(self) -> None:
        first = True
        backoff = self.writes.backoff
        while True:
            # A connection of its own, read directly with read_response (~5 µs a message here):
            # redis-py's PubSub.get_message costs 15-18 µs. The connection still comes from the
            # client's settings (TLS, password, timeouts).
            connection = raw_connection(self.client, self.settings.channel)
            try:
                await connection.connect()
                await connection.send_command("SUBSCRIBE", self.settings.channel)
                if not first:
                    logger.warning(
                        "resubscribed to %r: events published while disconnected were missed "
                        "(pub/sub is at-most-once; use --source stream)",
                        self.settings.channel,
                    )
                first = False
                backoff.reset()
                await self._consume(connection)
            except REDIS_ERRORS as exc:
                delay = backoff.next_delay()
                logger.warning("pub/sub connection lost (%s); resubscribing in %.1fs", exc, delay)
                await pause_before_retry(delay)
            except RedisFull as exc:
                delay = backoff.next_delay()
                logger.error(
                    "Redis is full (%s): events of this batch are not counted (pub/sub is at-most-once); retrying in %.1fs", exc, delay
                )
                await pause_before_retry(delay)
            finally:
                await drop(connection)
                await self.writes.close()

    async def _consume(self, connection: Connection) -> None:
        payloads: list[bytes | None] = []
        deadline = 0.0
        next_beat = 0.0
        last_heard = time.monotonic()
        while True:
            stop_if_cancelled()
            timeout = max(0.0, deadline - time.monotonic()) if payloads else 1.0
            reply = await connection.read_response(timeout=timeout)
            now = time.monotonic()
            if reply is not None:
                last_heard = now
                if reply[0] == b"message":
                    if not payloads:
                        deadline = now + self.settings.batch_delay
                    payloads.append(reply[2])
            if payloads and (len(payloads) >= self.batch_size or now >= deadline):
                await self.writes.write(await self.folder.payloads(payloads))
                payloads = []
            if now >= next_beat:
                await self.writes.heartbeat()
                next_beat = now + 5
                if now - last_heard > PUBSUB_SILENCE:
                    raise ConnectionError(f"no reply from Redis on the pub/sub connection for {now - last_heard:.0f}s")
                if now - last_heard > 5:
                    await connection.send_command("PING")  # a quiet channel: prove the connection is alive
