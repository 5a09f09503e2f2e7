"""What a crafted request may not do to the dashboard: an ASGI middleware in front of Dash.

Dash trusts the shape of what reaches it: a callback body without `inputs` or with `output=1` raises in its core (a
500), and a websocket message that is not a JSON object, or names no known callback, raised out of its socket loop
with a full traceback in the log per message. Here every callback body and every websocket message is checked for
shape before Dash sees it (pure functions, below): a bad body gets a 400, a bad message is dropped, and each is
counted, with one log line per kind at most.

It also holds what the push (socket_push.py) needs per socket (`Connection`, reachable from a callback through the
CONNECTION context variable: Dash runs a socket's callbacks as tasks of the socket's handler, which copy it): the
client's address for the per-address cap, the socket's pages, and a way to send on it directly (`Guard.push`: the same
text goes to many pages, and Dash's queue and sender per socket were most of a push's cost), which drops a client
that stops reading: more than `backlog_limit` bytes in flight, or SEND_TIMEOUT for one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY = 1 << 20  # bytes of a callback body: the heaviest real one (the refresh with a zoom) is a few kB
MAX_MESSAGE = 1 << 16  # bytes of one websocket message from a page: a callback start or a prop it was asked for
MAX_DEPTH = 16  # nesting of a message's JSON: a page's deepest (a zoom inside the shown state) is 5
MAX_ID = 128  # characters of a requestId or rendererId
WS_TYPES = ("callback_request", "get_props_response", "heartbeat")
SEND_TIMEOUT = 10.0  # seconds a socket may take to take one pushed message

CONNECTION: contextvars.ContextVar[Connection | None] = contextvars.ContextVar("wikipulse_connection", default=None)


@dataclass(eq=False)
class Connection:
    """One websocket: who opened it, what the push queued on it and has not gone out yet, and its pages."""

    address: str
    send: Send | None = None  # the socket's own ASGI send
    backlog: int = 0  # bytes pushed on it that it has not taken yet
    pages: dict[str, Any] = field(default_factory=dict)  # rendererId -> Dash's handle to that page
    pusher: bool = False  # whether a push loop serves this socket's pages (one per socket)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def drop(self) -> None:
        """End the socket: Dash's loop sees a disconnect and tears its callbacks down."""
        self.dropped.set()


def depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return False


def _is_slot(item: Any) -> bool:
    """An input, state or output as Dash sends it: {"id": str or {...}, "property": str}, or a list of them (ALL)."""
    if isinstance(item, list):
        return all(_is_slot(i) for i in item if not isinstance(i, list)) and not any(isinstance(i, list) for i in item)
    return isinstance(item, dict) and isinstance(item.get("id"), (str, dict)) and isinstance(item.get("property"), str)


def callback_refusal(body: Any, callbacks: dict[str, Any], websocket: bool = False) -> str | None:
    """Why Dash must not see this callback body (None: it may): its shape is checked against the callback it names."""
    if not isinstance(body, dict):
        return "not an object"
    output = body.get("output")
    if not isinstance(output, str) or output not in callbacks:
        return "names no callback"
    spec = callbacks[output]
    if spec.get("callback") is None:
        return "a clientside callback"
    if websocket != bool(spec.get("websocket")):
        return "not a websocket callback" if websocket else "a websocket callback"
    if "inputs" not in body:
        return "no inputs"
    for name in ("inputs", "state"):
        slots = body.get(name, [])
        if not isinstance(slots, list) or len(slots) != len(spec.get(name, [])) or not all(_is_slot(s) for s in slots):
            return f"{name} do not match the callback"
    outputs = body.get("outputs", [])
    if not (isinstance(outputs, list) and all(_is_slot(o) for o in outputs)) and not _is_slot(outputs):
        return "outputs are malformed"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(c, str) and len(c) < 1024 for c in changed):
        return "changedPropIds are malformed"
    return None


def message_refusal(message: Any, callbacks: dict[str, Any]) -> str | None:
    """Why Dash's socket loop must not see this parsed websocket message (None: it may)."""
    if not isinstance(message, dict):
        return "not an object"
    kind = message.get("type")
    if kind not in WS_TYPES:
        return "unknown type"
    if kind == "heartbeat":
        return None
    request = message.get("requestId")
    if not isinstance(request, str) or not 0 < len(request) <= MAX_ID:
        return "bad requestId"
    if kind == "get_props_response":
        return None if isinstance(message.get("payload"), (dict, type(None))) else "bad payload"
    renderer = message.get("rendererId", "")
    if not isinstance(renderer, str) or len(renderer) > MAX_ID:
        return "bad rendererId"
    return callback_refusal(message.get("payload"), callbacks, websocket=True)


def parse_message(frame: Message, callbacks: dict[str, Any]) -> tuple[Any, str | None]:
    """A websocket frame from a page -> (its JSON, why it is refused or None)."""
    text = frame.get("text")
    if text is None:
        return None, "binary"
    if len(text) > MAX_MESSAGE:
        return None, "too large"
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None, "not JSON"
    if depth_exceeds(message, MAX_DEPTH):
        return None, "too deep"
    return message, message_refusal(message, callbacks)


class Guard:
    """The checks and the counts; GuardMiddleware puts them in front of the app. `callbacks` is Dash's callback map
    (read at each request: callbacks may be added later)."""

    def __init__(
        self,
        callbacks: dict[str, Any],
        prefix: str = "/",
        sockets_per_address: int = 100,
        backlog_limit: int = 1 << 20,
    ) -> None:
        self.callbacks = callbacks
        self.ws_path, self.callback_path = prefix + "_dash-ws-callback", prefix + "_dash-update-component"
        self.sockets_per_address, self.backlog_limit = sockets_per_address, backlog_limit
        self.refused: Counter[str] = Counter()  # why, how often: requests and messages turned away
        self.sockets: Counter[str] = Counter()  # open sockets by client address
        self.dropped_slow = 0

    def refuse(self, why: str) -> None:
        self.refused[why] += 1
        if self.refused[why] == 1:  # one line per kind, then only counted (GET PUSH_STATUS_PATH shows the counts)
            logger.warning("refused a crafted request (%s); further ones are counted, not logged", why)

    async def handle(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == self.ws_path:
            await self._websocket(app, scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == self.callback_path and scope.get("method") == "POST":
            await self._callback(app, scope, receive, send)
        else:
            await app(scope, receive, send)

    async def _callback(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                self.refuse("callback body too large")
                await _reply(send, 413, b'{"error": "too large"}')
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            why = callback_refusal(orjson.loads(body), self.callbacks)
        except orjson.JSONDecodeError:
            why = "not JSON"
        if why is not None:
            self.refuse(f"callback body: {why}")
            await _reply(send, 400, orjson.dumps({"error": why}))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay, send)

    async def _websocket(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        address = str((scope.get("client") or ("?", 0))[0])
        if self.sockets[address] >= self.sockets_per_address:
            await self._refuse_socket(receive, send)
            return
        conn = Connection(address, send)
        self.sockets[address] += 1
        token = CONNECTION.set(conn)
        pending: asyncio.Task[Message] | None = None

        async def guarded_receive() -> Message:
            nonlocal pending
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(receive())
                dropped = asyncio.ensure_future(conn.dropped.wait())
                await asyncio.wait((pending, dropped), return_when=asyncio.FIRST_COMPLETED)
                dropped.cancel()
                if conn.dropped.is_set():
                    return {"type": "websocket.disconnect", "code": 1008}
                message, pending = pending.result(), None
                why = parse_message(message, self.callbacks)[1] if message["type"] == "websocket.receive" else None
                if why is None:
                    return message
                self.refuse(f"websocket message: {why}")

        try:
            await app(scope, guarded_receive, send)
        finally:
            CONNECTION.reset(token)
            self.sockets[address] -= 1
            if not self.sockets[address]:
                del self.sockets[address]
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def _refuse_socket(self, receive: Receive, send: Send) -> None:
        if (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1013})  # before the accept: a 403 to the handshake
        self.refuse("too many sockets from one address")

    async def push(self, conn: Connection, text: str) -> None:
        """Send `text` on `conn` now, beside Dash's own messages (uvicorn writes each frame whole). A client that stopped
        reading must not hold the server's memory or its push loop: past `backlog_limit` bytes in flight, or
        SEND_TIMEOUT for one message, it is dropped."""
        if conn.send is None or conn.dropped.is_set():
            return
        if conn.backlog + len(text) > self.backlog_limit:
            self._drop_slow(conn, f"{conn.backlog} bytes unsent")
            return
        conn.backlog += len(text)
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await conn.send({"type": "websocket.send", "text": text})
        except TimeoutError:
            self._drop_slow(conn, f"no message taken in {SEND_TIMEOUT:.0f} s")
        except OSError:  # uvicorn's ClientDisconnected: it is gone already
            conn.drop()
        finally:
            conn.backlog -= len(text)

    def _drop_slow(self, conn: Connection, why: str) -> None:
        if not conn.dropped.is_set():
            self.dropped_slow += 1
            logger.warning("dropped a websocket from %s that stopped reading (%s)", conn.address, why)
            conn.drop()


class GuardMiddleware:
    """`server.add_middleware(GuardMiddleware, guard=guard)`: outermost, so Dash's own middleware sees no bad body."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.guard.handle(self.app, scope, receive, send)


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
