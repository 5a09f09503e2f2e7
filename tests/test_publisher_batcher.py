"""The publisher's batcher on a fixed clock: when a batch is full, when it is due, what it keeps. Pure: no I/O, no sleeps."""

from __future__ import annotations

import orjson
import pytest

from tests.helpers import calibrated_lines
from wikipulse.ingest.batcher import Batcher
from wikipulse.ingest.sse import ServerSentEvent

LINES = [line for line in calibrated_lines()[:50] if b'"domain":"canary"' not in line]


def event(i: int, data: bytes | None = None, kind: str = "message") -> ServerSentEvent:
    return ServerSentEvent(kind, LINES[i] if data is None else data, f"[{i}]")


def batcher(size: int = 1000, delay: float = 0.5, window: int = 100) -> Batcher:
    return Batcher(size, delay, 1 << 20, window, wall=lambda: 1234.5)


def test_an_empty_batch_has_no_deadline() -> None:
    b = batcher()
    assert b.empty and b.flush_in(100.0) is None and not b.due(1e9)
    assert b.cut() is None


def test_the_deadline_counts_from_the_first_event_of_the_batch() -> None:
    b = batcher(delay=0.5)
    b.take(event(0), now=10.0)
    assert b.flush_in(10.0) == 0.5
    b.take(event(1), now=10.3)  # a later event does not move the deadline
    assert b.flush_in(10.3) == pytest.approx(0.2)
    assert not b.due(10.49)
    assert b.due(10.5) and b.flush_in(10.5) == 0.0
    assert b.flush_in(11.0) == 0.0  # overdue: read no longer, flush
    batch = b.cut()
    assert batch is not None and len(batch.frames) == 2 and batch.started == 10.0 and batch.last_id == "[1]"
    assert b.empty and b.flush_in(11.0) is None  # the next batch has no deadline until its first event
    b.take(event(2), now=20.0)
    assert b.flush_in(20.0) == 0.5 and not b.due(20.4)


def test_what_is_not_published_starts_the_deadline_too() -> None:
    """An error event, a canary or a rejected frame is counted with the next write, so it is due as soon as an event."""
    for sse in (event(0, b"boom", kind="error"), event(0, b"not json"), event(0, b"{}", kind="other")):
        b = batcher(delay=2.0)
        assert b.take(sse, now=5.0) is False
        assert b.flush_in(5.0) == 2.0 and b.due(7.0)
        batch = b.cut()
        assert batch is not None and not batch.frames and batch.taken == 1


def test_take_says_when_the_batch_is_full() -> None:
    b = batcher(size=3)
    assert [b.take(event(i), now=1.0) for i in range(2)] == [False, False]
    assert b.take(event(0), now=1.0) is False  # a duplicate is not a frame of the batch
    assert b.take(event(1, b"not json"), now=1.0) is False
    assert b.take(event(2), now=1.0) is True
    batch = b.cut()
    assert batch is not None and len(batch.frames) == 3 and batch.counters == {"duplicates": 1, "rejected:not_json": 1}


def test_the_dedup_window_is_bounded_and_outlives_the_batch() -> None:
    b = batcher(window=3)
    for i in range(5):
        b.take(event(i), now=1.0)
    b.cut()
    b.take(event(4), now=2.0)  # still in the window
    b.take(event(0), now=2.0)  # evicted: the window keeps the last 3 only
    batch = b.cut()
    assert batch is not None and batch.frames == [LINES[0]] and batch.counters["duplicates"] == 1


def test_discard_drops_the_batch_and_takes_the_stored_window() -> None:
    b = batcher()
    b.take(event(0), now=1.0)
    meta_id = orjson.loads(LINES[1])["meta"]["id"]
    b.discard([meta_id.encode()])
    assert b.empty and b.flush_in(1.0) is None
    assert b.take(event(0), now=2.0) is False and b.take(event(1), now=2.0) is False
    batch = b.cut()
    assert batch is not None and batch.frames == [LINES[0]] and batch.counters["duplicates"] == 1


def test_a_rejected_frame_is_kept_with_the_wall_clock_given() -> None:
    b = batcher()
    b.take(event(0, b"[1, 2]"), now=1.0)
    b.count("position_rejected")
    batch = b.cut()
    assert batch is not None
    (kept,) = [orjson.loads(r) for r in batch.rejected]
    assert (kept["reason"], kept["at"], kept["frame"]) == ("not_object", 1234.5, "[1, 2]")
    assert batch.counters == {"rejected:not_object": 1, "position_rejected": 1}
