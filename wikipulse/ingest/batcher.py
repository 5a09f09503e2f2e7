"""Batching the feed's events: validation, the dedup window, and when a batch is due. Pure: no I/O, the clock passed in.

The publisher hands every decoded event to `take` with the time it was read (time.monotonic), cuts the batch when
`take` says it is full or `due` says it is old enough, and reads the feed for at most `flush_in` seconds meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from wikipulse.core.events import Accepted, Canary, Reject, Rejected, validate
from wikipulse.core.summary import summary_of
from wikipulse.ingest.sse import ServerSentEvent
from wikipulse.ingest.writer import IngestBatch

logger = logging.getLogger(__name__)


class Dedup:
    """The last `size` meta.id values, oldest evicted first: this process's fast filter. The
    authority is keys.SEEN, checked inside the write script."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: dict[str, None] = {}

    def load(self, entries: list[bytes]) -> None:
        self._ids = dict.fromkeys(m.decode() for m in entries[-self.size :])

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, meta_id: str) -> bool:
        return meta_id in self._ids

    def add(self, meta_id: str) -> None:
        self._ids[meta_id] = None
        if len(self._ids) > self.size:
            del self._ids[next(iter(self._ids))]


class Batcher:
    """The batch being filled: at most `size` events, cut at the latest `delay` seconds after its first frame.
    `wall` stamps rejected frames (unix time)."""

    def __init__(self, size: int, delay: float, max_event_bytes: int, window: int, wall: Callable[[], float] = time.time) -> None:
        self.size, self.delay, self.max_event_bytes, self.wall = size, delay, max_event_bytes, wall
        self.dedup = Dedup(window)
        self.batch = IngestBatch()

    def take(self, sse: ServerSentEvent, now: float) -> bool:
        """Add one event read at `now` (monotonic seconds); whether the batch is full now."""
        batch = self.batch
        if not batch.taken:
            batch.started = now
        batch.taken += 1
        if sse.id is not None:
            batch.last_id = sse.id
        if sse.event == "error":
            logger.warning("the feed sent an error event: %r", sse.data[:500])
            batch.counters["server_errors"] += 1
            return False
        if sse.event != "message":
            return False
        verdict = Rejected(Reject.TOO_LARGE, "over max_event_bytes") if sse.oversize else validate(sse.data, self.max_event_bytes)
        if isinstance(verdict, Accepted):
            meta_id = verdict.meta_id
            if meta_id is not None:
                if meta_id in self.dedup:
                    batch.counters["duplicates"] += 1
                    return False
                self.dedup.add(meta_id)
            batch.frames.append(sse.data)
            batch.folds.append(summary_of(verdict.event))
            batch.ids.append(meta_id or "")
            meta = verdict.event["meta"]
            batch.last_dt = meta.get("dt") if isinstance(meta.get("dt"), str) else batch.last_dt
            return len(batch.frames) >= self.size
        if isinstance(verdict, Canary):
            batch.counters["canaries"] += 1
        else:
            self._reject(batch, verdict, sse.data)
        return False

    def _reject(self, batch: IngestBatch, verdict: Rejected, data: bytes) -> None:
        batch.counters[f"rejected:{verdict.reason.value}"] += 1
        frame = data[:512].decode("utf-8", "replace")
        batch.rejected.append(orjson.dumps({"reason": verdict.reason.value, "detail": verdict.detail, "at": self.wall(), "frame": frame}))
        logger.debug("rejected frame (%s): %s", verdict.reason.value, verdict.detail)

    def count(self, name: str) -> None:
        """A counter that goes to Redis with the next batch (e.g. position_rejected)."""
        self.batch.counters[name] += 1

    @property
    def empty(self) -> bool:
        return not self.batch.taken

    def flush_in(self, now: float) -> float | None:
        """Seconds until the batch is due (0 if it is), None while it is empty: how long the feed may be read meanwhile."""
        if not self.batch.taken:
            return None
        return max(0.0, self.batch.started + self.delay - now)

    def due(self, now: float) -> bool:
        return bool(self.batch.taken) and now - self.batch.started >= self.delay

    def cut(self) -> IngestBatch | None:
        """The batch to write (None if nothing was taken); a new one starts."""
        if not self.batch.taken:
            return None
        batch, self.batch = self.batch, IngestBatch()
        return batch

    def discard(self, seen: list[bytes] | None = None) -> None:
        """Drop the batch (its events will be read again), and take the dedup window stored in Redis if given."""
        self.batch = IngestBatch()
        if seen is not None:
            self.dedup.load(seen)
