"""A pure, incremental Server-Sent Events decoder.

Follows the WHATWG HTML "Server-sent events" parsing rules
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
lines end in CRLF, LF or CR; `:` starts a comment; `field: value` with one optional
space removed; `data` lines join with LF; a blank line dispatches; an event with an
empty data buffer is not dispatched; the last event ID persists across events; an
`id` containing NUL is ignored. The I/O layer only feeds it bytes.

Data stays bytes, so that invalid UTF-8 can be rejected by the validator instead
of being silently replaced, and so that the raw JSON is republished unchanged.
Memory is bounded: an event (or a line) larger than `max_event_bytes` is
dispatched as `oversize` with its data dropped.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str
    data: bytes
    id: str | None
    oversize: bool = False


class SSEDecoder:
    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self.max_event_bytes = max_event_bytes
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self._pending = b""  # an incomplete line
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF belongs to it
        self._discarding_line = False  # the current line is over the limit
        self._data: list[bytes] = []
        self._data_size = 0
        self._event = ""
        self._oversize = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Decode a chunk of the body; return the events it completes."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if not chunk:
            return []
        lines = chunk.splitlines()  # bytes.splitlines splits on \r\n, \n and \r only
        last_complete = chunk[-1:] in (b"\n", b"\r")
        if chunk[-1:] == b"\r":
            self._skip_lf = True
        tail = b"" if last_complete else lines.pop()
        events: list[ServerSentEvent] = []
        for line in lines:
            if self._pending:
                line, self._pending = self._pending + line, b""
            if self._discarding_line:
                self._discarding_line = False
                continue
            event = self._line(line)
            if event is not None:
                events.append(event)
        if tail:
            self._pending += tail
            if len(self._pending) > self.max_event_bytes:
                # A line that never ends must not eat memory: drop it, remember the event is oversize.
                self._pending = b""
                self._discarding_line = True
                self._oversize = True
        return events

    def _line(self, line: bytes) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line[:1] == b":":
            return None
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data_size += len(value) + 1
            if self._data_size > self.max_event_bytes:
                self._oversize = True
                self._data.clear()
            elif not self._oversize:
                self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\0" not in value:
                self.last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, oversize, event = self._data, self._oversize, self._event or "message"
        had_data = self._data_size > 0
        self._data, self._data_size, self._event, self._oversize = [], 0, "", False
        if not had_data and not oversize:
            return None
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        return ServerSentEvent(event, b"" if oversize else payload, self.last_event_id, oversize)
