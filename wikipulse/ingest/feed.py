"""The EventStreams feed client: one SSE connection at a time over aiohttp, resumed with `Last-Event-ID` (else `since`).

It knows HTTP and SSE only: what it resumes from is given (the publisher's stored position), how long to wait for
the next chunk is given (the batcher's next flush), and after a failed connection it says how long to wait before
the next one (throttling, backoff, an unreachable feed said once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp

from wikipulse.core.settings import PublisherSettings
from wikipulse.ingest.sse import ServerSentEvent, SSEDecoder
from wikipulse.store.retry import Backoff, stop_if_cancelled

logger = logging.getLogger(__name__)

HTTP_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)  # no route, refused, no DNS: no network?
THROTTLE_STATUSES = (429, 503)


class StreamError(Exception):
    """The feed connection ended or failed; the message says why."""


class FeedEnded(StreamError):
    """The server closed the stream (the live feed does so every ~15 minutes)."""


class Throttled(StreamError):
    def __init__(self, status: int, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}, Retry-After {retry_after}")
        self.retry_after = retry_after


class Rejected400(StreamError):
    """The feed answered 400 to what this publisher asked for (a stored position or --since). `counter` names which
    (position_rejected, since_rejected): asking again the same way would be refused forever."""

    def __init__(self, message: str, counter: str) -> None:
        super().__init__(message)
        self.counter = counter


FEED_ERRORS = (StreamError, *HTTP_ERRORS)


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class Connection:
    """An open feed response: its chunks decoded into events, with the idle timeout. The idle timeout counts from the
    last *complete* event: the feed sends no heartbeats, and a peer that trickles bytes but no events is as dead as a
    silent one."""

    def __init__(self, response: aiohttp.ClientResponse, settings: PublisherSettings, position: str | None) -> None:
        self.response, self.idle_timeout = response, settings.idle_timeout
        self.decoder = SSEDecoder(settings.max_event_bytes)
        self.decoder.last_event_id = position  # an event without `id:` carries the last one, per the spec
        self.last_event = time.monotonic()
        self.messages = 0  # `message` events read: a connection that delivered some worked

    async def read(self, timeout: float | None) -> list[ServerSentEvent]:
        """The events of the next chunk; [] once `timeout` seconds passed without one. With no timeout (nothing to
        flush), wait until the idle timeout and then raise StreamError. FeedEnded when the server closes the stream."""
        if timeout is None:
            timeout = self.idle_timeout - (time.monotonic() - self.last_event)
            if timeout <= 0:
                raise StreamError(f"no complete event for {self.idle_timeout:g}s (idle timeout)")
        try:
            # asyncio.timeout, not wait_for: wait_for on 3.11 can swallow a cancellation (shutdown).
            async with asyncio.timeout(timeout):
                chunk = await self.response.content.readany()
        except TimeoutError:
            return []
        if not chunk:
            raise FeedEnded("the server ended the stream")
        stop_if_cancelled()
        events = self.decoder.feed(chunk)
        if events:
            self.last_event = time.monotonic()
            self.messages += sum(1 for sse in events if sse.event == "message")
        return events


class Feed:
    def __init__(self, settings: PublisherSettings, session: aiohttp.ClientSession) -> None:
        self.settings, self.session = settings, session
        self.since = settings.since  # dropped when the feed rejects it
        self.backoff = Backoff(settings.backoff_cap)
        self.connected = asyncio.Event()  # set while a connection is open (for tests and `up`)
        self.messages = 0  # `message` events of the last connection
        self._said_unreachable = False  # said once that the feed cannot be reached; the retries after it are quiet

    def request_headers(self, position: str | None) -> dict[str, str]:
        headers = {"User-Agent": self.settings.user_agent, "Accept": "text/event-stream"}
        if position:
            headers["Last-Event-ID"] = position
        return headers

    @contextlib.asynccontextmanager
    async def connect(self, position: str | None) -> AsyncIterator[Connection]:
        """One connection, resumed after `position` (else from --since, else now). Raises Throttled, Rejected400,
        StreamError for another status, or aiohttp's errors."""
        s = self.settings
        params = {"since": self.since} if self.since and not position else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
        self.messages = 0
        async with self.session.get(s.stream_url, headers=self.request_headers(position), params=params, timeout=timeout) as resp:
            if resp.status in THROTTLE_STATUSES:
                raise Throttled(resp.status, parse_retry_after(resp.headers.get("Retry-After")))
            if resp.status != 200:
                body = (await resp.content.read(300)).decode("utf-8", "replace")
                if resp.status == 400 and (position or params):
                    raise self._rejected(body, position)
                raise StreamError(f"HTTP {resp.status}: {body}")
            logger.info("connected to %s (Last-Event-ID %s)", s.stream_url, "sent" if position else "none")
            self._said_unreachable = False
            connection = Connection(resp, s, position)
            self.connected.set()
            try:
                yield connection
            finally:
                self.connected.clear()
                self.messages = connection.messages

    def _rejected(self, body: str, position: str | None) -> Rejected400:
        """The feed rejected the position or --since (too old, or invalid): the caller drops the position; --since is
        dropped here. The next connection starts from --since, or now."""
        if position:
            logger.error(
                "the feed rejected the stored position (HTTP 400: %s): it is too old or invalid. Starting from %s instead: "
                "events between them are missed",
                body.strip()[:200], f"--since {self.since}" if self.since else "now",
            )  # fmt: skip
            return Rejected400(f"HTTP 400: {body}", "position_rejected")
        logger.error("the feed rejected --since %r (HTTP 400: %s): starting from now instead", self.since, body.strip()[:200])
        self.since = ""
        return Rejected400(f"HTTP 400: {body}", "since_rejected")

    def delay_after(self, exc: BaseException) -> tuple[float, str | None]:
        """How long to wait before the next connection after `exc` (one of FEED_ERRORS), and why (None: said here)."""
        if isinstance(exc, Throttled):
            return max(exc.retry_after or 0.0, self.backoff.next_delay(extra=2, cap=self.settings.backoff_cap * 4)), str(exc)
        if isinstance(exc, Rejected400):
            return 0.0, str(exc)
        if isinstance(exc, UNREACHABLE):
            return self._unreachable(self.backoff.next_delay(), exc), None
        if self.messages:
            self.backoff.reset()  # that connection worked: its end is routine, not a failure in a row
        return self.backoff.next_delay(), f"{type(exc).__name__}: {exc}"

    def _unreachable(self, delay: float, exc: BaseException) -> float:
        """The feed cannot be reached (no network, a wrong URL): said once, clearly, with the way to run offline; the
        retries after it are quiet until a connection is made."""
        if self._said_unreachable:
            logger.debug("the feed is still unreachable (%s: %s); again in %.1fs", type(exc).__name__, exc, delay)
            return delay
        self._said_unreachable = True
        logger.warning(
            "the feed at %s cannot be reached (%s: %s): no network? Retrying quietly (at most every %gs) until it answers. "
            "To run offline, on simulated events: python -m wikipulse up --simulate",
            self.settings.stream_url, type(exc).__name__, exc, self.settings.backoff_cap,
        )  # fmt: skip
        return delay
