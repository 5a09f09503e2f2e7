"""No client can hurt the others (issue 24): each hostile client found by trying it, against the real dashboard process
(uvicorn, a real Redis) over real HTTP and websockets: a socket starting the push 5,000 times, garbage messages,
crafted callback bodies and states, too many pages from one address, a client that never reads. And the pages of one
view share one computed update."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
import redis

from tests.helpers import callback_body, start_dashboard
from tests.helpers import post_callback as post
from wikipulse.dashboard.guard import callback_refusal, message_refusal, parse_message
from wikipulse.dashboard.push import MIN_PUSH_GAP
from wikipulse.dashboard.socket_push import PAGE_TIMEOUT, PAGES_PER_SOCKET
from wikipulse.dashboard.view_updates import UpdateCache
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.fold.series import notice
from wikipulse.store import keys

MAX_PER_ADDRESS = 10
MAX_PAGES = 14


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path, int]]:
    """(redis url, base url, the dashboard's log, its pid): caps small enough to reach in a test."""
    server = RedisServer(tmp_path_factory.mktemp("guard-redis")).start()
    port = free_port()
    log = tmp_path_factory.mktemp("guard-log") / "dash.log"
    env = {"DASH_MAX_PAGES": str(MAX_PAGES), "DASH_MAX_PAGES_PER_ADDRESS": str(MAX_PER_ADDRESS)}
    process = start_dashboard(server.url, port, log, env)
    yield server.url, f"http://127.0.0.1:{port}/", log, process.pid
    process.terminate()
    assert process.wait(10) == 0
    server.stop()


def push_status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "_wikipulse/push", timeout=10) as response:
        return dict(orjson.loads(response.read()))


def dependencies(base: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(base + "_dash-dependencies", timeout=10) as response:
        return list(orjson.loads(response.read()))


def push_output(base: str) -> str:
    return next(str(d["output"]) for d in dependencies(base) if not d.get("inputs"))  # the persistent push callback


def drawn_state(base: str) -> dict[str, Any]:
    """What a page's graph shows after its first draw (the refresh's `shown`), for a client to answer the push with."""
    refresh = next(c for c in dependencies(base) if "graph.figure" in c["output"])
    values = {("domains", "value"): ["fr.wikipedia.org"], ("resolution", "value"): "10s", ("window", "value"): "30m",
              ("breakdown", "value"): "total", ("who", "value"): "all", ("ns", "value"): "all"}  # fmt: skip
    status, body = post(base, orjson.dumps(callback_body(refresh, values)))
    assert status == 200, body[:300]
    return dict(orjson.loads(body)["response"]["shown"]["data"])


def start(output: str, request: str, renderer: str) -> dict[str, Any]:
    payload = {"output": output, "outputs": [], "inputs": [], "changedPropIds": [], "state": []}
    return {"type": "callback_request", "requestId": request, "rendererId": renderer, "payload": payload}


def log_since(log: Path, offset: int) -> str:
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


class Page:
    """A page speaking Dash's websocket protocol from `address` (the proxy header uvicorn trusts from 127.0.0.1): it
    answers what it shows and applies what it is pushed, recording when."""

    def __init__(self, shown: dict[str, Any] | None) -> None:
        self.stores: dict[str, Any] = {"shown": shown, "lists-shown": [["fr.wikipedia.org"], "all", "all", 5]}
        self.pushed: list[float] = []
        self.messages: list[dict[str, Any]] = []
        self.answer: dict[str, Any] | None = None  # answer get_props with this instead of the stores
        self.reader: asyncio.Task[None] | None = None  # its run, when open_pushed started it

    async def run(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                return
            parsed = orjson.loads(message.data)
            for item in parsed if isinstance(parsed, list) else [parsed]:
                self.messages.append(item)
                payload = item.get("payload") or {}
                if item.get("type") == "get_props_request":
                    store = payload["componentId"]
                    value = self.answer if self.answer is not None and store == "shown" else self.stores.get(store)
                    await ws.send_bytes(b"")  # a frame the guard refuses (binary): it must not disturb the socket
                    await ws.send_json({"type": "get_props_response", "requestId": item["requestId"], "payload": {"data": value}})
                elif item.get("type") == "set_props" and payload.get("componentId") == "pushed":
                    self.pushed.append(time.monotonic())
                    update = payload["props"]["data"]
                    shown = self.stores["shown"] or {}
                    if update["for"] == [shown.get(k) for k in ("view", "mark", "first", "last", "traces")]:
                        self.stores["shown"] = update["then"]


async def connect(session: aiohttp.ClientSession, base: str, address: str) -> aiohttp.ClientWebSocketResponse:
    headers = {"Origin": base.rstrip("/"), "X-Forwarded-For": address}
    return await session.ws_connect(base.replace("http://", "ws://") + "_dash-ws-callback", headers=headers, max_msg_size=0)


def announce(url: str, since: int | None = None) -> None:
    with redis.Redis.from_url(url) as client:
        client.publish(keys.NOTICES, notice(1, ["fr.wikipedia.org"], 0, since if since is not None else int(time.time())))


async def no_pages_left(base: str) -> None:
    await wait_for(lambda: push_status(base)["pages"] == 0 and push_status(base)["sockets"] == 0, 15, "pages left open")


async def test_one_socket_starting_the_push_5000_times_is_a_few_pages_and_costs_nothing(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """Found by trying: 5,000 starts on one socket made 5,001 pages and held the dashboard at 87-91% of a core."""
    _, base, _, pid = dashboard
    output = push_output(base)
    ws = await connect(session, base, "10.0.1.1")
    reader = asyncio.create_task(Page(None).run(ws))
    for i in range(5000):
        await ws.send_str(orjson.dumps(start(output, f"r{i}", f"page-{i % 50}")).decode())
    await asyncio.sleep(2)
    status = push_status(base)
    assert status["pages"] == PAGES_PER_SOCKET, status  # one loop for the socket, serving at most its few tabs
    cpu = psutil.Process(pid)
    before = sum(cpu.cpu_times()[:2])
    await asyncio.sleep(5)
    assert sum(cpu.cpu_times()[:2]) - before < 1.0  # under 20% of a core while nothing moves (was 87-91%)
    await ws.close()
    reader.cancel()
    await no_pages_left(base)


GARBAGE: tuple[Any, ...] = (
    "not json", "[1, 2]", "5", "null", '"a string"', "true", "[" * 5000 + "]" * 5000, '{"type": "callback_request"}',
    '{"type": "callback_request", "requestId": {"a": 1}, "payload": {}}', '{"type": "nope"}', '{"no": "type"}',
    '{"type": "callback_request", "requestId": "x", "payload": [1]}', '{"type": "get_props_response", "requestId": 5}',
)  # fmt: skip


async def test_garbage_websocket_messages_are_refused_quietly(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """Found by trying: 11 of 13 kinds of garbage logged a full traceback each (200 one-byte messages: 830 KB of log)."""
    _, base, log, _ = dashboard
    offset = log.stat().st_size
    deps = dependencies(base)
    refresh = next(c for c in deps if "graph.figure" in c["output"])  # a callback that is not a websocket one
    not_ws = orjson.dumps({"type": "callback_request", "requestId": "q", "rendererId": "z", "payload": callback_body(refresh, {})}).decode()
    no_inputs = orjson.dumps({"type": "callback_request", "requestId": "q2", "payload": {"output": push_output(base)}}).decode()
    ws = await connect(session, base, "10.0.2.1")
    for text in (*GARBAGE, not_ws, no_inputs):
        await ws.send_str(text)
    await ws.send_bytes(b"\x00\x01binary")
    for _ in range(200):
        await ws.send_str("x")
    await ws.send_str('{"type": "heartbeat"}')  # the socket still works
    replies = [orjson.loads((await ws.receive(timeout=10)).data)]
    assert replies == [{"type": "heartbeat_ack"}], replies  # and nothing else: no push was started by any of it
    await ws.close()
    await asyncio.sleep(0.5)
    written = log_since(log, offset)
    assert "Traceback" not in written and "Exception in ASGI" not in written, written[:2000]
    assert len(written.splitlines()) <= len(GARBAGE) + 4, written  # one line per kind at most, then counted
    assert sum(n for why, n in push_status(base)["refused"].items() if why.startswith("websocket")) >= len(GARBAGE) + 203


CRAFTED_BODIES: tuple[bytes, ...] = (b"not json", b"[]", b"5", b"null", b'{"output": 1}', b'{"output": "nope.children", "inputs": []}')


def test_crafted_callback_requests_get_a_refusal_never_a_500(dashboard: tuple[str, str, Path, int]) -> None:
    """Found by trying: `?trend=%C2%B2` ("²" is a digit to str.isdigit, not to int) gave a 500 and an empty page, and
    bodies without `inputs`, with `inputs={}` or `output=1` a 500 in Dash's core."""
    _, base, log, _ = dashboard
    offset = log.stat().st_size
    with urllib.request.urlopen(base + "?trend=%C2%B2", timeout=10) as page:
        assert page.status == 200
    deps = [c for c in dependencies(base) if not c.get("clientside_function")]
    from_url = next(c for c in deps if "initialized.data" in c["output"])
    bodies = [*CRAFTED_BODIES, orjson.dumps(callback_body(from_url, {("url", "search"): "?trend=%C2%B2", ("url", "pathname"): "/"}))]
    for callback in deps:
        good = callback_body(callback, {})
        bodies += [orjson.dumps({k: v for k, v in good.items() if k != "inputs"}), orjson.dumps({**good, "inputs": {}}),
                   orjson.dumps({**good, "output": 1}), orjson.dumps({**good, "inputs": [1] * len(good["inputs"])}),
                   orjson.dumps({**good, "state": [*good["state"], good["state"][0] if good["state"] else {}]}),
                   orjson.dumps({**good, "outputs": 5}), orjson.dumps({**good, "changedPropIds": {"a": 1}})]  # fmt: skip
    answers = [(post(base, body), body[:120]) for body in bodies]
    failures = [(status, reply[:200], body) for (status, reply), body in answers if status not in (200, 204, 400)]
    assert not failures, failures[:5]
    assert answers[len(CRAFTED_BODIES)][0][0] == 200  # the "²" in the URL: the page's defaults, not a 500
    written = log_since(log, offset)
    assert "Traceback" not in written, written[:2000]


async def test_a_crafted_state_answer_gets_the_whole_figure_not_a_crash(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """The page's state is the client's to send: a mark of "<this process>:²" (int() refuses it) gets a whole figure."""
    url, base, log, _ = dashboard
    offset = log.stat().st_size
    shown = drawn_state(base)
    epoch = shown["mark"].partition(":")[0]
    page = Page(shown)
    page.answer = {**shown, "mark": f"{epoch}:²", "zoom": {"rev": 5, "xaxis": [[1], {}]}}
    ws = await connect(session, base, "10.0.3.1")
    reader = asyncio.create_task(page.run(ws))
    await ws.send_json(start(push_output(base), "r", "crafted"))
    await wait_for(lambda: push_status(base)["pages"] == 1, 10, "the page was not admitted")
    await asyncio.sleep(0.5)
    announce(url)
    await wait_for(lambda: page.pushed, 10, "no update pushed")
    update = next(m for m in page.messages if (m.get("payload") or {}).get("componentId") == "pushed")["payload"]["props"]["data"]
    figure = next(value for component, _, value in update["props"] if component == "graph")
    assert "data" in figure and "__dash_patch_update" not in figure  # whole: nothing to patch from
    await ws.close()
    reader.cancel()
    await no_pages_left(base)
    assert "Traceback" not in log_since(log, offset)


async def test_pages_are_capped_per_address_and_per_process(dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession) -> None:
    _, base, _, _ = dashboard
    output = push_output(base)
    sockets = [await connect(session, base, "10.0.4.1") for _ in range(MAX_PER_ADDRESS)]
    for i, ws in enumerate(sockets):
        await ws.send_json(start(output, "r", f"a{i}"))
    await wait_for(lambda: push_status(base)["pages"] == MAX_PER_ADDRESS, 10, "the address's pages were not admitted")
    with pytest.raises(aiohttp.WSServerHandshakeError):  # one socket more from that address: refused at the handshake
        await connect(session, base, "10.0.4.1")
    others = [await connect(session, base, f"10.0.4.{2 + i}") for i in range(MAX_PAGES - MAX_PER_ADDRESS + 1)]
    for i, ws in enumerate(others):
        await ws.send_json(start(output, "r", f"b{i}"))
    await asyncio.sleep(1)
    status = push_status(base)
    assert status["pages"] == MAX_PAGES and status["pages_refused"] >= 1, status  # the last one polls instead
    busy = others[-1]
    assert any("busy" in str(orjson.loads(m.data)) for m in [await busy.receive(timeout=5) for _ in range(1)])
    for ws in (*sockets, *others):
        await ws.close()
    await no_pages_left(base)


def raw_socket_that_never_reads(port: int, address: str) -> socket.socket:
    """A websocket client that does the handshake, then only writes: its receive buffer is as small as the kernel
    allows, and it never drains it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /_dash-ws-callback HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n"
                  f"X-Forwarded-For: {address}\r\n\r\n").encode())  # fmt: skip
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def masked_frame(text: str) -> bytes:
    data, mask = text.encode(), os.urandom(4)
    n = len(data)
    head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def test_a_client_that_never_reads_is_dropped_and_does_not_slow_the_others(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    url, base, _, _ = dashboard
    output = push_output(base)
    port = int(base.rsplit(":", 1)[1].strip("/"))
    silent = raw_socket_that_never_reads(port, "10.0.5.1")
    for i in range(PAGES_PER_SOCKET):
        silent.sendall(masked_frame(orjson.dumps(start(output, f"r{i}", f"silent-{i}")).decode()))
    page = Page(drawn_state(base))
    ws = await connect(session, base, "10.0.5.2")
    reader = asyncio.create_task(page.run(ws))
    await ws.send_json(start(output, "r", "reader"))
    await wait_for(lambda: push_status(base)["pages"] == PAGES_PER_SOCKET + 1, 10, "the pages were not admitted")
    sent: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < PAGE_TIMEOUT + 4:  # a notice every 0.4 s, past the silent pages' timeout
        sent.append(time.monotonic())
        announce(url)
        await asyncio.sleep(0.4)
    await asyncio.sleep(1)
    # The reading page got an update for nearly every notice (the push coalesces within 0.25 s), each within a second.
    late = [t for t in sent[:-2] if not any(t < p < t + 1.0 for p in page.pushed)]
    assert len(late) <= 2 and len(page.pushed) >= len(sent) * 0.6, (len(late), len(page.pushed), len(sent))
    status = push_status(base)
    assert status["pages"] == 1 and status["sockets"] == 1, status  # the silent socket's pages timed out: it was dropped
    silent.close()
    await ws.close()
    reader.cancel()
    await no_pages_left(base)


async def test_pages_of_one_view_share_one_computed_update(dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession) -> None:
    url, base, _, _ = dashboard
    output = push_output(base)
    shown = drawn_state(base)
    pages = [Page(dict(shown)) for _ in range(MAX_PER_ADDRESS)]
    sockets = [await connect(session, base, f"10.0.6.{i}") for i in range(len(pages))]
    readers = [asyncio.create_task(page.run(ws)) for page, ws in zip(pages, sockets, strict=True)]
    for i, ws in enumerate(sockets):
        await ws.send_json(start(output, "r", f"v{i}"))
    await wait_for(lambda: push_status(base)["pages"] == len(pages), 10, "the pages were not admitted")
    await asyncio.sleep(2)  # the first pushes (from the version at the start) are done
    before = push_status(base)["updates_computed"]
    for page in pages:
        page.pushed.clear()
    announce(url)
    await wait_for(lambda: all(page.pushed for page in pages), 10, "a page got no update")
    # One view, one version: the graph's update computed once and sent ten times (and the lists' once, when due).
    assert push_status(base)["updates_computed"] - before <= 2
    for ws in sockets:
        await ws.close()
    for reader in readers:
        reader.cancel()
    await no_pages_left(base)


async def test_a_page_back_on_a_new_socket_is_let_go_from_its_old_one(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """Dash replaces a socket it judges dead, and the page starts its push again on the new one while the old one may
    still be open: found in CI as 21 pages counted for 20. The page is served once, on its new socket, and the old
    socket, left with no page, is closed."""
    url, base, _, _ = dashboard
    output = push_output(base)
    shown = drawn_state(base)
    old_page, new_page = Page(dict(shown)), Page(dict(shown))
    old = await connect(session, base, "10.0.7.1")
    old_reader = asyncio.create_task(old_page.run(old))
    await old.send_json(start(output, "r1", "moved"))
    await wait_for(lambda: push_status(base)["pages"] == 1, 10, "the page was not admitted")
    new = await connect(session, base, "10.0.7.1")
    new_reader = asyncio.create_task(new_page.run(new))
    await new.send_json(start(output, "r2", "moved"))
    await wait_for(lambda: old.closed, 10, "the old socket, left with no page, stayed open")
    status = push_status(base)
    assert (status["pages"], status["sockets"]) == (1, 1), status
    old_page.pushed.clear()
    announce(url)
    await wait_for(lambda: bool(new_page.pushed), 10, "the page got no update on its new socket")
    assert not old_page.pushed
    await new.close()
    for reader in (old_reader, new_reader):
        reader.cancel()
    await no_pages_left(base)


def said(page: Page, component: str, prop: str, renderer: str | None = None) -> list[Any]:
    """What the server set `component.prop` to on this socket's pages (or on `renderer`'s), in order."""
    sets = [m["payload"] for m in page.messages if m.get("type") == "set_props" and renderer in (None, m.get("rendererId"))]
    return [p["props"][prop] for p in sets if p.get("componentId") == component and prop in p.get("props", {})]


Opened = tuple[aiohttp.ClientWebSocketResponse, Page]


async def open_pushed(
    session: aiohttp.ClientSession, base: str, address: str, renderer: str, shown: dict[str, Any] | None = None
) -> Opened:
    """A page from `address` starting its push on a socket of its own, read by a task."""
    ws, page = await connect(session, base, address), Page(shown)
    page.reader = asyncio.create_task(page.run(ws))
    await ws.send_json(start(push_output(base), "r", renderer))
    return ws, page


async def fill(session: aiohttp.ClientSession, base: str, net: str, n: int) -> list[Opened]:
    """`n` pushed pages, one socket each, from addresses net.0 to net.(n-1) (page ids net-0...): admitted."""
    before = push_status(base)["pages"]
    pages = [await open_pushed(session, base, f"{net}.{i}", f"{net}-{i}") for i in range(n)]
    await wait_for(lambda: push_status(base)["pages"] == before + n, 10, "the pages were not admitted")
    return pages


async def close_all(base: str, pages: list[Opened]) -> None:
    for ws, page in pages:
        await ws.close()
        if page.reader is not None:
            page.reader.cancel()
    await no_pages_left(base)


async def test_a_page_back_on_a_new_socket_when_the_process_is_full_is_still_served(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """Its old socket's place is its own: the caps are judged once it was let go from there, not before (it was
    refused, counted twice)."""
    _, base, _, _ = dashboard
    pages = await fill(session, base, "10.0.8", MAX_PAGES)
    back = await open_pushed(session, base, "10.0.8.0", "10.0.8-0")
    await wait_for(lambda: pages[0][0].closed, 10, "the old socket, left with no page, stayed open")
    await wait_for(lambda: said(back[1], "push-status", "children") == ["live"], 10, f"not served: {back[1].messages}")
    assert push_status(base)["pages"] == MAX_PAGES
    await close_all(base, [*pages[1:], back])


async def test_a_page_pushed_to_and_refused_on_its_next_socket_polls_again(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """Its socket was lost (Dash judged it dead), another page took its place meanwhile, and the process is full: the
    page was told it is busy but left with its polling off, so it froze. It polls again."""
    _, base, _, _ = dashboard
    pages = await fill(session, base, "10.0.9", MAX_PAGES)
    await wait_for(lambda: said(pages[0][1], "tick", "disabled") == [True], 10, "not told to stop polling")  # pushed to
    await pages[0][0].close()
    await wait_for(lambda: push_status(base)["pages"] == MAX_PAGES - 1, 10, "the lost socket's page still counts")
    pages[1:1] = await fill(session, base, "10.0.10", 1)
    back = await open_pushed(session, base, "10.0.9.0", "10.0.9-0")
    await wait_for(lambda: bool(said(back[1], "push-status", "children")), 10, "the page was told nothing")
    assert said(back[1], "push-status", "children") == ["busy: polling every 2 s"]
    assert said(back[1], "tick", "disabled") == said(back[1], "lists-tick", "disabled") == [False]
    await close_all(base, [*pages, back])


async def test_a_page_pushed_to_and_refused_by_a_full_socket_polls_again(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """The same for a page that comes back on a socket already serving a browser's worth of tabs."""
    _, base, _, _ = dashboard
    old, page = await open_pushed(session, base, "10.0.12.1", "tab")
    await wait_for(lambda: said(page, "tick", "disabled") == [True], 10, "not told to stop polling")
    full, tabs = await open_pushed(session, base, "10.0.12.2", "tab-0")
    for i in range(1, PAGES_PER_SOCKET):
        await full.send_json(start(push_output(base), "r", f"tab-{i}"))
    await wait_for(lambda: push_status(base)["pages"] == 1 + PAGES_PER_SOCKET, 10, "the tabs were not admitted")
    await full.send_json(start(push_output(base), "r2", "tab"))
    await wait_for(lambda: bool(said(tabs, "push-status", "children", "tab")), 10, "the page was told nothing")
    assert said(tabs, "tick", "disabled", "tab") == said(tabs, "lists-tick", "disabled", "tab") == [False]
    await wait_for(lambda: old.closed, 10, "its old socket, left with no page, stayed open")
    assert push_status(base)["pages"] == PAGES_PER_SOCKET
    await close_all(base, [(old, page), (full, tabs)])


def resync_request(base: str, renderer: str, n: int, shown: Any, lists: Any) -> dict[str, Any]:
    """The message a page sends when what it shows is not what its last push made of it (view_updates.WATCH_SHOWN)."""
    callback = next(d for d in dependencies(base) if [i["id"] for i in d.get("inputs", [])] == ["resync"])
    body = callback_body(callback, {("resync", "data"): n, ("shown", "data"): shown, ("lists-shown", "data"): lists})
    return {"type": "callback_request", "requestId": f"s{n}", "rendererId": renderer, "payload": body}


async def test_what_a_page_says_it_shows_is_pushed_from_at_most_every_push_gap(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession
) -> None:
    """A page saying what the server holds gets nothing (a push would make it say so again, and again); one saying
    other lists gets those, and only those; one saying another figure is pushed to from there; and a crafted page
    saying another view with every message, 50 a second, gets a push per MIN_PUSH_GAP, not one per message."""
    _, base, _, _ = dashboard
    ws, page = await open_pushed(session, base, "10.0.13.1", "saying", drawn_state(base))

    def lists_pushed() -> list[Any]:
        return [d["for"] for d in said(page, "lists-pushed", "data")]

    await wait_for(lambda: bool(page.pushed) and bool(lists_pushed()), 10, "the page's first pushes")  # the lists' at 0-5 s
    lists, pushes = page.stores["lists-shown"], len(page.pushed)
    await ws.send_json(resync_request(base, "saying", 1, page.stores["shown"], lists))
    await asyncio.sleep(1.5)
    assert len(page.pushed) == pushes  # what it holds: nothing to push
    lists = [*lists[:3], 60]  # the hour's trending pages: picked over HTTP
    await ws.send_json(resync_request(base, "saying", 2, page.stores["shown"], lists))
    await wait_for(lambda: lists_pushed()[-1] == lists, 5, "the lists it said were not pushed from")
    assert len(page.pushed) == pushes  # its figure did not move
    older = {**page.stores["shown"], "mark": "another-process:1"}
    page.stores["shown"] = older
    await ws.send_json(resync_request(base, "saying", 3, older, lists))
    await wait_for(lambda: len(page.pushed) > pushes, 5, "not pushed to from what it said")
    computed, began = push_status(base)["updates_computed"], time.monotonic()
    for i in range(100):
        zoom = {"rev": "crafted", "xaxis": [i, i + 1]}
        await ws.send_json(resync_request(base, "saying", 4 + i, {**older, "zoom": zoom}, lists))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.5)
    took = time.monotonic() - began
    assert push_status(base)["updates_computed"] - computed <= took / MIN_PUSH_GAP + 2  # was one a message: 100
    await close_all(base, [(ws, page)])


async def test_two_dashboard_processes_on_one_redis_push_their_own_pages_with_no_sticky_sessions(
    dashboard: tuple[str, str, Path, int], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """More pages than one process serves: several processes behind one proxy (docs/guarantees.md), each with its own
    subscription. A page drawn over HTTP by one process and pushed to by the other (no sticky sessions) is caught up
    whole by the one pushing, and from then on shows that process's marks."""
    url, base, _, _ = dashboard
    port = free_port()
    other = start_dashboard(url, port, tmp_path / "dash-b.log")
    base_b = f"http://127.0.0.1:{port}/"
    try:
        output = push_output(base)
        shown = drawn_state(base)  # drawn by the first process: its mark
        epoch = str(shown["mark"]).partition(":")[0]
        here, there = Page(dict(shown)), Page(dict(shown))
        ws_here, ws_there = await connect(session, base, "10.0.8.1"), await connect(session, base_b, "10.0.8.2")
        readers = [asyncio.create_task(here.run(ws_here)), asyncio.create_task(there.run(ws_there))]
        await ws_here.send_json(start(output, "r", "on-a"))
        await ws_there.send_json(start(output, "r", "on-b"))
        await wait_for(lambda: push_status(base)["pages"] == 1 and push_status(base_b)["pages"] == 1, 10, "a page was not admitted")
        await asyncio.sleep(1)
        for page in (here, there):
            page.pushed.clear()
        announce(url)  # one notice, heard by both processes' subscriptions
        await wait_for(lambda: bool(here.pushed and there.pushed), 10, "a process did not push its page")
        assert str(here.stores["shown"]["mark"]).partition(":")[0] == epoch
        mark_there = str(there.stores["shown"]["mark"]).partition(":")[0]
        assert mark_there and mark_there != epoch  # the other process's mark: it drew the page whole, not patched A's
        for ws in (ws_here, ws_there):
            await ws.close()
        for reader in readers:
            reader.cancel()
        await no_pages_left(base)
    finally:
        other.terminate()
        assert other.wait(10) == 0


def test_the_guard_s_checks_are_pure_and_name_what_is_wrong() -> None:
    callbacks = {"a.children": {"callback": print, "inputs": [{"id": "x", "property": "value"}], "state": []},
                 "ws": {"callback": print, "inputs": [], "state": [], "websocket": True}}  # fmt: skip
    good = {"output": "a.children", "outputs": {"id": "a", "property": "children"}, "inputs": [{"id": "x", "property": "value"}]}
    assert callback_refusal(good, callbacks) is None
    assert callback_refusal({**good, "inputs": {}}, callbacks) == "inputs do not match the callback"
    assert callback_refusal({**good, "output": 1}, callbacks) == "names no callback"
    assert callback_refusal({"output": "ws", "inputs": []}, callbacks) == "a websocket callback"
    request = {"type": "callback_request", "requestId": "r", "rendererId": "p", "payload": {"output": "ws", "inputs": []}}
    assert message_refusal(request, callbacks) is None
    assert message_refusal({**request, "payload": good}, callbacks) == "not a websocket callback"
    assert parse_message({"type": "websocket.receive", "bytes": b"x"}, callbacks)[1] == "binary"
    assert parse_message({"type": "websocket.receive", "text": "[" * 20 + "]" * 20}, callbacks)[1] == "too deep"


async def test_an_update_is_computed_once_however_many_pages_wait_for_it() -> None:
    cache, calls = UpdateCache(), []

    def make() -> str:
        calls.append(1)
        time.sleep(0.05)
        return "update"

    assert await asyncio.gather(*(cache.get(b"view", 3, make) for _ in range(50))) == ["update"] * 50
    assert len(calls) == 1
    await cache.get(b"view", 4, make)  # a new version: computed again
    await cache.get(b"view", 3, make)  # a page behind: computed for it, without evicting version 4
    assert len(calls) == 3 and await cache.get(b"view", 4, make) == "update" and len(calls) == 3
