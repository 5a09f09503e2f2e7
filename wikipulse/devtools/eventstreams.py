"""A local server that speaks the Wikimedia EventStreams wire format, for offline use and tests.

`GET /v2/stream/recentchange` answers `text/event-stream`: the comment `:ok`, then
per event `event: message`, `id: <json array like the real one>`, `data: <json>`,
blank line. `Last-Event-ID` resumes right after that event (it wins over `since`);
`since` (ms epoch or ISO date) starts at the first event at or after that time.

Fault injection for tests: `drop_every` closes the connection after that many events,
`overlap` re-delivers that many events before the requested one on each resume
(the real service seeks by timestamp and re-delivers too), `malformed_every` mixes
in a malformed frame after that many events.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import orjson
from aiohttp import web

from wikipulse.core.events import event_time
from wikipulse.devtools.simulate import Simulator
from wikipulse.ingest.sse import SSEDecoder

logger = logging.getLogger(__name__)

PATH = "/v2/stream/recentchange"
TOPIC = "eqiad.mediawiki.recentchange"
OTHER_TOPIC = "codfw.mediawiki.recentchange"
MALFORMED_FRAMES = (b"{not json", b"[1, 2]", b'{"meta": 7}', b'{"meta": {"domain": "Bad Domain!"}}', b"\xff\xfe garbage")


class EventSource(Protocol):
    def __len__(self) -> int: ...  # events available (may grow without end for a simulation)
    def data(self, offset: int) -> bytes: ...
    def seek_time(self, ms: int) -> int: ...


class ReplaySource:
    """Events from a file: JSON lines, or a raw SSE capture (`.sse`)."""

    def __init__(self, lines: Sequence[bytes]) -> None:
        self.lines = list(lines)
        self.times = [_time_ms(line) for line in self.lines]
        # seek_time needs a sorted index; the feed is only nearly ordered, so take the running max.
        self._sorted_times = list(_running_max(self.times))

    @classmethod
    def from_file(cls, path: str | Path) -> ReplaySource:
        raw = Path(path).read_bytes()
        if str(path).endswith(".sse"):
            decoder = SSEDecoder()
            events = decoder.feed(raw + b"\n\n")
            return cls([e.data for e in events])
        return cls([line for line in raw.splitlines() if line.strip()])

    def __len__(self) -> int:
        return len(self.lines)

    def data(self, offset: int) -> bytes:
        return self.lines[offset]

    def seek_time(self, ms: int) -> int:
        return bisect.bisect_left(self._sorted_times, ms)


class SimulatedSource:
    """`live`: event times follow the clock, however far a client resumes (Simulator.keep_live); else they are a
    function of the simulator's fixed start alone (a --start given, the tests' reference folds)."""

    def __init__(self, sim: Simulator, count: int | None = None, live: bool = False) -> None:
        self.sim, self.count, self.live = sim, count, live

    def __len__(self) -> int:
        return self.count if self.count is not None else 1 << 62

    def data(self, offset: int) -> bytes:
        if self.live:
            self.sim.keep_live(offset, time.time())
        return orjson.dumps(self.sim.event(offset))

    def seek_time(self, ms: int) -> int:
        return self.sim.index_at(ms / 1000)


def _running_max(values: Sequence[int]) -> Sequence[int]:
    out, top = [], -(1 << 62)
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


def _time_ms(line: bytes) -> int:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return 0
    t = event_time(event) if isinstance(event, dict) else None
    return 0 if t is None else t * 1000


def parse_since(since: str) -> int:
    """`since` (ms epoch or ISO 8601) -> ms epoch."""
    if since.strip().lstrip("-").isdigit():
        return int(since)
    parsed = datetime.fromisoformat(since.strip().replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def event_id(offset: int) -> bytes:
    """An `id:` like the real one: one entry per datacenter topic, order varying."""
    mine = b'{"topic":"%s","partition":0,"offset":%d}' % (TOPIC.encode(), offset)
    other = b'{"topic":"%s","partition":0,"offset":-1}' % OTHER_TOPIC.encode()
    return b"[" + (mine + b"," + other if offset % 2 == 0 else other + b"," + mine) + b"]"


def resume_offset(last_event_id: str) -> int | None:
    """The offset after the event named by a `Last-Event-ID`, or None if it names none of ours."""
    try:
        entries = orjson.loads(last_event_id)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("topic") == TOPIC and isinstance(entry.get("offset"), int):
            return int(entry["offset"]) + 1
    return None


def frame(offset: int, data: bytes) -> bytes:
    return b"event: message\nid: " + event_id(offset) + b"\ndata: " + data + b"\n\n"


@dataclass
class ServerOptions:
    rate: float = 0.0  # events/s; 0 = as fast as the client reads
    drop_every: int = 0
    overlap: int = 0
    malformed_every: int = 0
    chunk: int = 256  # events per write at full speed


class EventStreamsServer:
    def __init__(self, source: EventSource, options: ServerOptions | None = None) -> None:
        self.source = source
        self.options = options or ServerOptions()
        self.connections = 0
        self.events_sent = 0
        self.last_event_ids: list[str | None] = []  # what each connection asked for, for tests

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(PATH, self.handle)
        return app

    def start_offset(self, request: web.Request) -> int:
        last_id = request.headers.get("Last-Event-ID")
        if last_id:
            offset = resume_offset(last_id)
            if offset is None:  # as the real service: a position that is not JSON or names no valid one
                raise web.HTTPBadRequest(text=f"invalid Last-Event-ID: {last_id[:100]}")
            return max(0, offset - self.options.overlap)
        since = request.query.get("since")
        if since:
            return self.source.seek_time(parse_since(since))
        return 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        self.last_event_ids.append(request.headers.get("Last-Event-ID"))
        try:
            offset = self.start_offset(request)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"bad since: {exc}") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(b":ok\n\n")
        opts = self.options
        sent = 0
        started = time.monotonic()
        while offset < len(self.source):
            if opts.rate > 0:
                due = int((time.monotonic() - started) * opts.rate) - sent
                if due <= 0:
                    await asyncio.sleep(min(0.05, 1 / opts.rate))
                    continue
                n = min(due, opts.chunk)
            else:
                n = opts.chunk
            n = min(n, len(self.source) - offset)
            if opts.drop_every:
                n = min(n, opts.drop_every - sent)
            parts = []
            for i in range(offset, offset + n):
                parts.append(frame(i, self.source.data(i)))
                if opts.malformed_every and (i + 1) % opts.malformed_every == 0:
                    parts.append(
                        b"event: message\ndata: " + MALFORMED_FRAMES[(i // opts.malformed_every) % len(MALFORMED_FRAMES)] + b"\n\n"
                    )
            try:
                await resp.write(b"".join(parts))
            except ConnectionResetError:  # the client went away (aiohttp's ClientConnectionResetError is one)
                return resp
            offset += n
            sent += n
            self.events_sent += n
            if opts.drop_every and sent >= opts.drop_every:
                logger.info("dropping the connection after %d events (drop_every)", sent)
                if request.transport is not None:
                    request.transport.close()
                return resp
        await resp.write_eof()
        return resp


async def serve(source: EventSource, options: ServerOptions, host: str, port: int) -> None:
    """Run until cancelled."""
    server = EventStreamsServer(source, options)
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    logger.info("EventStreams server on http://%s:%d%s (%s events, rate %s/s)", host, port, PATH, len(source), options.rate or "max")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
