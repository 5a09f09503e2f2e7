"""Fold raw events into per-domain time series in Redis: one fold per shard, each wired from its parts.

  source          stream_source.StreamSource (default: the stream with a consumer group, exactly-once) or
                  pubsub_source.PubSubSource (the channel, at-most-once as Redis pub/sub is)
  folding         folder.Folder: what a read returned -> a FoldedBatch (observe.py, fold.py, trending.py)
  write pipeline  writes.WritePipeline: the batches applied by series.SeriesWriter, pipelined, re-folded in part
  consumer name   consumer_name.ConsumerName: the name in the group, held by one live process (its lease)

Beside the folds, in the same process: their stats in the log, the spike watch of each shard, the alert webhook.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from typing import Protocol

from redis.exceptions import ResponseError

from wikipulse.core.errors import OperatorError
from wikipulse.core.settings import SubscriberSettings
from wikipulse.fold.consumer_name import ConsumerName
from wikipulse.fold.folder import Folder
from wikipulse.fold.pubsub_source import PubSubSource
from wikipulse.fold.spikes import CHECK_EVERY, SpikeWatch
from wikipulse.fold.stream_source import StreamSource
from wikipulse.fold.webhook import AlertWebhook
from wikipulse.fold.writes import WritePipeline
from wikipulse.store import keys
from wikipulse.store.connect import Client, open_client
from wikipulse.store.policy import check_redis
from wikipulse.store.retry import REDIS_ERRORS, Backoff, Outage, is_full, pause_before_retry
from wikipulse.store.streams import Entry

logger = logging.getLogger(__name__)


class Source(Protocol):
    """Where a fold's events come from: it reads, folds (Folder) and writes (WritePipeline) until cancelled."""

    caught_up: bool  # the last read found no backlog: what was folded so far is all there is

    async def run(self) -> None: ...


class Subscriber:
    """One shard's fold: its source (settings.source), the folder, the write pipeline and the consumer name."""

    def __init__(self, settings: SubscriberSettings, client: Client, shard: keys.Shard | None = None) -> None:
        self.settings = settings
        self.shard = shard or keys.Layout(settings.stream).all_shards[0]  # the stream it folds, and where its keys live
        self.name = ConsumerName(settings, client, self.shard)
        self.folder = Folder(settings, client, self.shard)
        outage = Outage(logger, f"subscriber of {self.shard.stream}")
        self.writes = WritePipeline(settings, client, self.folder, self.name, Backoff(settings.backoff_cap), outage)
        self.stream = StreamSource(settings, client, self.name, self.folder, self.writes)
        self.pubsub = PubSubSource(settings, client, self.folder, self.writes)
        self.source: Source = self.stream if settings.source == "stream" else self.pubsub

    @property
    def consumer(self) -> str:
        return self.name.consumer

    @property
    def totals(self) -> Counter[str]:
        """What the applied batches counted (folded, late, rejected:..., ...)."""
        return self.writes.totals

    @property
    def caught_up(self) -> bool:
        return self.source.caught_up

    @caught_up.setter
    def caught_up(self, value: bool) -> None:
        self.source.caught_up = value

    async def run(self) -> None:
        await self.source.run()

    async def run_stream(self) -> None:
        await self.stream.run()

    async def run_pubsub(self) -> None:
        await self.pubsub.run()

    # The stream source's steps, one at a time (tests and benchmarks drive a fold by hand).
    async def ensure_group(self) -> None:
        await self.stream.ensure_group()

    async def take_name(self) -> None:
        await self.stream.take_name()

    async def give_up_name(self) -> None:
        await self.name.give_up()

    async def read(self, start: str, block: int | None) -> tuple[list[Entry], bytes]:
        return await self.stream.read(start, block)

    async def fold_entries(self, entries: list[Entry], claims: bytes | None = None) -> None:
        await self.stream.fold_entries(entries, claims)

    async def close(self) -> None:
        await self.stream.close()


async def log_stats(subscriber: Subscriber, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        t = subscriber.totals
        logger.info(
            "folded %d, late %d, future %d, rejected %d",
            t["folded"],
            t["late"],
            t["future"],
            sum(v for k, v in t.items() if k.startswith("rejected:")),
        )


async def watch_spikes(client: Client, subscriber: Subscriber) -> None:
    """The spike watch of the subscriber's shard, judging only while the subscriber is caught up (a minute read
    while a backlog is still being folded would look quiet).

    Redis down or full (an alert is a write: a full Redis refuses it) pauses the watch, as it pauses the fold: said
    once, then it judges again from the last minute it finished, so no spike of the pause is missed and none is raised
    twice (its marker); its state is what the fold wrote. Anything else fails the process (run_subscriber's task
    group), rather than leave it folding with no watch."""
    watch = SpikeWatch(client, subscriber.shard)
    full = False
    while True:
        if subscriber.caught_up:
            try:
                await watch.check(time.time())
            except REDIS_ERRORS as exc:
                logger.warning("spike check failed, trying again: %s: %s", type(exc).__name__, exc)
            except ResponseError as exc:
                if not is_full(exc):
                    raise
                if not full:
                    logger.error("Redis is full (%s): spike alerts paused; the minutes are judged once it takes writes again", exc)
                full = True
            else:
                if full:
                    logger.warning("Redis takes writes again: spike alerts resumed")
                full = False
        await pause_before_retry(CHECK_EVERY)


def tune_gc() -> None:
    """A batch is thousands of small lists (the reply's entries); with the default thresholds the
    cyclic GC runs dozens of times a batch and finds no cycles. Collecting far less often makes the
    fold ~20% faster (BENCHMARKS.md). Process-wide, so called by the entry point, not the class."""
    gc.set_threshold(20_000, 50, 1000)


async def run_subscriber(settings: SubscriberSettings) -> None:
    tune_gc()
    client, layout = await open_client(settings)
    async with client:
        await check_redis(client, settings)
        if settings.source == "stream":
            # One fold per shard this process takes, each with its own consumer-name lease, connections and batches.
            subscribers = [Subscriber(settings, client, layout.all_shards[i]) for i in settings.shard_indexes()]
        elif layout.sharded:
            raise OperatorError("--source pubsub folds into one Redis's keys: on a cluster or with SHARDS > 1, use the stream")
        else:
            subscribers = [Subscriber(settings, client)]
        for subscriber in subscribers:
            logger.info(
                "subscriber %s reading %s",
                subscriber.consumer,
                subscriber.shard.stream if settings.source == "stream" else f"channel {settings.channel}",
            )
        # The folds, their stats, their spike watches and the webhook's poster as one group: one that fails (in a way it
        # does not handle itself) stops the others and fails the process, rather than go on with it dead unseen.
        try:
            async with asyncio.TaskGroup() as group:
                for subscriber in subscribers:
                    group.create_task(subscriber.run())
                    group.create_task(log_stats(subscriber, settings.stats_interval))
                    group.create_task(watch_spikes(client, subscriber))
                if settings.alert_webhook:
                    group.create_task(AlertWebhook(settings, client).run())  # a failed post never holds the folds up
        except BaseExceptionGroup as failed:
            if len(failed.exceptions) > 1:
                raise
            raise failed.exceptions[0] from None  # the error itself, as the CLI reports it (an OperatorError: one line)
