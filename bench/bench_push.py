#!/usr/bin/env python3
"""Event to screen: push vs polling, side by side in one run, in a real headless Chromium.

`pipenv run python -m bench.bench_push [--marks N] [--fanout P [--whole]] [--root TREE]`: the real pipeline (redis-server,
`publisher.py`,
`subscriber.py`, `dash_app.py` as processes) reads a local EventStreams server that emits a marked edit (a unique
title) every 0.6-1.4 s. Two pages watch the same marks at once: one pushed (websocket), one polling every 2 s (its
websocket worker refused, which is the page's fallback and exactly the page before push). Each page records when a
mark's title first appears in its DOM (a MutationObserver, `Date.now()`); the feed records when it sent it
(`time.time()`, the same clock).

With `--fanout P`: P - 1 more pages at once, as websocket clients that speak Dash's protocol, plus the pushed browser
page; reports the dashboard process's CPU and memory and the browser page's event-to-screen times under that load. A
client draws its page once over HTTP, as a page does, starts the persistent push callback, then does what a page of
the tree under test does: answers the server's questions about what it shows and applies the update it is pushed
(issue 24), or, before, asks for one refresh over HTTP per push (a Patch of what it shows, or with --whole the whole
figure every time, as before issue 12's patches). `--root` runs another tree's scripts (a worktree of the baseline
commit), so both designs are measured by the same clients. The run fails (exit 1, saying why) when a client cannot
connect, the dashboard does not count every page, a client is never pushed to, or the pushed page misses a mark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web

from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.simulate import Simulator

ROOT = Path(__file__).resolve().parents[1]
OBSERVE = """
window.marks = {};
new MutationObserver(() => {
  const t = document.querySelector('#ticker');
  if (!t) return;
  for (const m of t.innerText.matchAll(/wpmark-(\\d+)/g)) { if (!(m[1] in window.marks)) window.marks[m[1]] = Date.now(); }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


class MarkFeed:
    """An EventStreams-shaped feed of marked edits, one every 0.6-1.4 s, in a thread of its own."""

    def __init__(self, marks: int) -> None:
        self.marks, self.sent = marks, {}  # type: tuple[int, dict[int, float]]
        self.port = free_port()
        self.sim = Simulator(seed=3, canary_every=0)
        self.started = threading.Event()
        self.go = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b":ok\n\n")
        i = len(self.sent)
        while i < self.marks:
            if not self.go.is_set():
                await asyncio.sleep(0.1)
                continue
            await asyncio.sleep(random.uniform(0.6, 1.4))
            now = time.time()
            event = self.sim.event(i)
            event.update(type="edit", title=f"wpmark-{i}", timestamp=int(now), bot=False)
            event["meta"].update(domain="en.wikipedia.org", id=f"wpmark-{i}", dt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)))
            self.sent[i] = time.time()
            await response.write(b"event: message\ndata: " + orjson.dumps(event) + b"\n\n")
            i += 1
        await asyncio.sleep(3600)
        return response

    def run(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_get(PATH, self.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.started.set()
            await asyncio.sleep(1e9)

        asyncio.run(main())


@contextlib.contextmanager
def pipeline(feed: MarkFeed, workdir: Path, root: Path = ROOT) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    redis_server = RedisServer(workdir / "redis", appendonly=False).start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "WIKI_STREAM_URL": feed.url, "DASH_PORT": str(port), "LOG_LEVEL": "WARNING",
           "DASH_MAX_PAGES_PER_ADDRESS": "100000", "PYTHONPATH": str(root)}  # every client is on 127.0.0.1  # fmt: skip
    processes = {
        name: subprocess.Popen([sys.executable, str(root / f"{name}.py")], env=env, cwd=root, stdin=subprocess.DEVNULL)
        for name in ("publisher", "subscriber", "dash_app")
    }
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the dashboard did not start") from None
                time.sleep(0.2)
        yield base, processes["dash_app"]
    finally:
        for p in processes.values():
            p.terminate()
        try:
            for name, p in processes.items():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop within 30 s of SIGTERM: killed", file=sys.stderr)
                    p.kill()
                    p.wait(10)
        finally:
            redis_server.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class BenchFailed(Exception):
    """The run measured less than it says: the message says what."""


LISTS_SHOWN = [["en.wikipedia.org"], "all", "all", 5]  # what the bench page's lists show (its URL's selection)


class FanOut:
    """P websocket clients speaking Dash's protocol, in a thread: each draws its page once over HTTP, starts the
    page's persistent push callback, then does what a page does when pushed to: answers the server's questions about
    what its graph and lists show and applies the update pushed for them (checked to be for what it shows, as
    view_updates.APPLY_TO_GRAPH does); or, with the baseline's push (a `pulse`), asks for one refresh over HTTP, with
    what its graph shows (so the answer is a Patch), or, with `patched` False, the page's first request again."""

    def __init__(self, base: str, clients: int, refresh_body: bytes, refresh_path: str, push_output: str, patched: bool) -> None:
        self.base, self.clients = base, clients
        self.refresh_body, self.refresh_path, self.push_output = refresh_body, refresh_path, push_output
        self.patched = patched
        self.pushes = 0  # graph updates received: a pulse, or an update
        self.lists_pushes = 0
        self.refreshes = 0  # refreshes asked for over HTTP, the first draws excepted
        self.received = 0  # bytes of the refreshes' answers and of the pushed updates
        self.refused = 0  # pushed updates not for what the client shows (dropped, as a page drops them)
        self.connected = 0
        self.failed: list[str] = []
        self.pushed_clients: set[int] = set()
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp

        # No connection limit (aiohttp's default of 100 made every client past the 100th wait, measuring nothing), and
        # idle connections closed before uvicorn closes them (5 s): reusing one it just closed is a reset, not a 500.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session: Any, i: int) -> None:
        try:
            await self._page(session, i)
        except Exception as exc:  # every failure is reported, and fails the run
            self.failed.append(f"client {i}: {type(exc).__name__}: {exc}"[:300])
            self._check_ready()

    def _check_ready(self) -> None:
        if self.connected + len(self.failed) >= self.clients:
            self.ready.set()

    async def _refresh(self, session: Any, body: bytes) -> Any:
        import aiohttp

        url = self.base.rstrip("/") + self.refresh_path
        for attempt in range(2):  # a reused connection the server closed meanwhile: once more, as a browser does
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                    reply = await response.read()
                    break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt:
                    raise
        if response.status != 200:
            raise BenchFailed(f"a refresh got HTTP {response.status}: {reply[:200]!r}")
        self.received += len(reply)
        return orjson.loads(reply)["response"].get("shown", {}).get("data")

    async def _page(self, session: Any, i: int) -> None:
        shown: Any = await self._refresh(session, self.refresh_body)  # the page's first draw
        ws_url = self.base.replace("http://", "ws://") + "_dash-ws-callback"
        async with session.ws_connect(ws_url, headers={"Origin": self.base.rstrip("/")}, max_msg_size=0) as ws:
            payload = {"output": self.push_output, "outputs": [], "inputs": [], "changedPropIds": [], "state": []}
            await ws.send_json({"type": "callback_request", "requestId": f"r{i}", "rendererId": f"bench-{i}", "payload": payload})
            self.connected += 1
            self._check_ready()
            stores: dict[str, Any] = {"shown": shown, "lists-shown": LISTS_SHOWN}
            while not self.stop.is_set():
                try:
                    message = await ws.receive(timeout=1.0)
                except TimeoutError:
                    continue
                if message.type != 1:  # not text
                    if message.type in (8, 256, 257, 258):  # close, closing, closed, error
                        if not self.stop.is_set():
                            raise BenchFailed(f"the socket closed ({message.type}, {message.data!r})")
                        return
                    continue
                for item in _messages(message.data):
                    await self._handle(session, ws, i, item, stores)

    async def _handle(self, session: Any, ws: Any, i: int, item: dict[str, Any], stores: dict[str, Any]) -> None:
        kind, payload = item.get("type"), item.get("payload") or {}
        if kind == "get_props_request":
            store = str(payload.get("componentId"))
            answer = {prop: stores.get(store) for prop in payload.get("properties", [])}
            await ws.send_json({"type": "get_props_response", "requestId": item.get("requestId"), "payload": answer})
        elif kind == "set_props" and payload.get("componentId") in ("pushed", "lists-pushed"):
            store = "shown" if payload["componentId"] == "pushed" else "lists-shown"
            if store == "shown":
                self.pushes += 1
                self.pushed_clients.add(i)
            else:
                self.lists_pushes += 1
            update = payload["props"]["data"]
            current = stores[store]
            expected = drawn(current) if store == "shown" and isinstance(current, dict) else current
            self.received += len(str(update))  # about its size: the client's time is measured too
            if update["for"] == expected:
                stores[store] = update["then"]
            else:
                self.refused += 1
        elif kind == "set_props" and payload.get("componentId") == "pulse":  # the baseline: refresh over HTTP
            self.pushes += 1
            self.pushed_clients.add(i)
            body = pushed_refresh(self.refresh_body, stores["shown"]) if self.patched else self.refresh_body
            stores["shown"] = await self._refresh(session, body) or stores["shown"]
            self.refreshes += 1


def drawn(shown: dict[str, Any]) -> list[Any]:
    """What a pushed update says it is for (view_updates.drawn; not imported: the baseline tree has no such module)."""
    return [shown.get("view"), shown.get("mark"), shown.get("first"), shown.get("last"), shown.get("traces")]


def pushed_refresh(first_request: bytes, shown: Any) -> bytes:
    """The page's first refresh request turned into the one a push sends: the pulse changed, and `shown` is the
    state of its graph."""
    body = orjson.loads(first_request)
    body["changedPropIds"] = ["pulse.data"]
    for state in body.get("state", []):
        if state.get("id") == "shown":
            state["value"] = shown
    return orjson.dumps(body)


def _messages(data: str) -> list[dict[str, Any]]:
    parsed = orjson.loads(data)
    return parsed if isinstance(parsed, list) else [parsed]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--marks", type=int, default=30)
    parser.add_argument("--fanout", type=int, default=0, help="pages at once (websocket clients + the browser page)")
    parser.add_argument("--whole", action="store_true", help="the fan-out clients ask for the whole figure every time (baseline)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree whose scripts run (e.g. a worktree of the baseline)")
    args = parser.parse_args()
    try:
        run(args)
    except BenchFailed as exc:
        print(f"\nbench_push FAILED: {exc}", file=sys.stderr)
        sys.exit(1)


def run(args: argparse.Namespace) -> None:
    from playwright.sync_api import sync_playwright

    feed = MarkFeed(args.marks)
    threading.Thread(target=feed.run, daemon=True).start()
    feed.started.wait()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, pipeline(feed, Path(tmp), args.root) as (base, dash_process), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=["--no-sandbox"])
        pages: dict[str, Any] = {}
        captured: dict[str, Any] = {}
        for name in ("push", "polling"):
            context = browser.new_context()
            if name == "polling":
                context.route("**/dash-ws-worker*", lambda route: route.abort())  # no websocket: the page polls
            page = context.new_page()
            page.add_init_script(OBSERVE)
            if name == "push":
                page.on("request", lambda r: captured.setdefault("refresh", r) if is_refresh(r) else None)
            page.goto(base + "?domains=en.wikipedia.org&res=10s")
            pages[name] = page
        pages["push"].wait_for_function("() => document.querySelector('#push-status').textContent === 'live'", timeout=30000)
        fanout = None
        if args.fanout > 1:
            fanout = start_fanout(base, args.fanout - 1, captured["refresh"], patched=not args.whole)
            wait_for_clients(fanout, base, args.fanout, pages["push"])
        process, bench = psutil.Process(dash_process.pid), psutil.Process()
        process.cpu_percent()
        bench.cpu_percent()
        psutil.cpu_percent()
        feed.go.set()
        cpu_samples, machine, rss, clients = [], [], [], []
        measuring = time.monotonic()
        pushes_before = fanout.pushes if fanout is not None else 0
        deadline = time.monotonic() + args.marks * 1.5 + 30
        while len(feed.sent) < args.marks and time.monotonic() < deadline:
            for page in pages.values():
                page.wait_for_timeout(250)  # the pages run while this thread waits
            cpu_samples.append(process.cpu_percent())
            machine.append(psutil.cpu_percent())
            clients.append(bench.cpu_percent())
            rss.append(process.memory_info().rss / 1e6)
        elapsed = time.monotonic() - measuring
        updates = (fanout.pushes if fanout is not None else 0) - pushes_before
        pages["push"].wait_for_timeout(3000)  # the last mark reaches the polling page
        results = {}
        for name, page in pages.items():
            seen = {int(k): v / 1000 for k, v in page.evaluate("() => window.marks").items()}
            results[name] = [seen[i] - feed.sent[i] for i in feed.sent if i in seen and i > 0]  # mark 0: the page was loading
            results[name + " missed"] = [i for i in feed.sent if i not in seen and i > 0]
        if fanout is not None:
            fanout.stop.set()
        browser.close()
    sent = len(feed.sent)
    report(args, sent, results, Samples(cpu_samples, machine, rss, clients, load_before, elapsed), fanout, updates)


@dataclass
class Samples:
    cpu: list[float]
    machine: list[float]
    rss: list[float]
    clients: list[float]  # this process's CPU: the fan-out clients (and the browser's driver)
    load_before: float
    elapsed: float


def report(args: argparse.Namespace, sent: int, results: dict[str, Any], samples: Samples, fanout: FanOut | None, updates: int) -> None:
    cpu_samples, machine, rss, elapsed = samples.cpu, samples.machine, samples.rss, samples.elapsed
    print(f"\nevent to screen, {args.marks} marked edits, feed -> publisher -> subscriber -> page, both pages at once"
          + (f", {args.fanout} pages open" if args.fanout > 1 else "") + f" ({args.root})")  # fmt: skip
    print("| page | p50 | p95 | max | marks seen |")
    print("|---|---|---|---|---|")
    for name in ("polling", "push"):
        times = results[name] or [math.nan]
        print(f"| {name} | {statistics.median(times) * 1000:,.0f} ms | {percentile(times, 0.95) * 1000:,.0f} ms | "
              f"{max(times) * 1000:,.0f} ms | {len(results[name])} of {sent - 1} |")  # fmt: skip
    print(f"\ndashboard process: CPU {statistics.mean(cpu_samples):.0f}% mean, {max(cpu_samples):.0f}% peak (of one core); "
          f"RSS {max(rss):.0f} MB peak")  # fmt: skip
    print(f"machine ({psutil.cpu_count()} cores, shared): {statistics.mean(machine):.0f}% of all cores busy mean while measured; "
          f"load average {samples.load_before:.1f} before, {os.getloadavg()[0]:.1f} after; the bench's own process (the clients) "
          f"{statistics.mean(samples.clients):.0f}% of a core mean")  # fmt: skip
    if fanout is not None:
        cpu_ms = statistics.mean(cpu_samples) / 100 * elapsed / max(updates, 1) * 1000
        print(f"fan-out clients: {fanout.pushes} graph updates received ({fanout.refreshes} of them asked for over HTTP), "
              f"{fanout.lists_pushes} list updates pushed, {fanout.refused} dropped as not for what the page shows; "
              f"{fanout.received / max(fanout.pushes + fanout.lists_pushes, 1) / 1000:.1f} kB per update; {updates / elapsed:.0f} page "
              f"updates/s while measured: {cpu_ms:.2f} ms of dashboard CPU per page update")  # fmt: skip
        if fanout.failed:
            raise BenchFailed(f"{len(fanout.failed)} clients failed while measuring, e.g. {fanout.failed[0]}")
        if len(fanout.pushed_clients) < fanout.clients:
            raise BenchFailed(f"{fanout.clients - len(fanout.pushed_clients)} of {fanout.clients} clients were never pushed to")
    if results["push missed"]:
        raise BenchFailed(f"the pushed page missed {len(results['push missed'])} marks: {results['push missed'][:10]}")


def wait_for_clients(fanout: FanOut, base: str, pages: int, page: Any) -> None:
    """Every client connected, and the dashboard counts every page, or the run fails: no number for fewer pages."""
    if not fanout.ready.wait(180):
        raise BenchFailed(f"only {fanout.connected} of {fanout.clients} clients connected within 180 s")
    if fanout.failed:
        raise BenchFailed(f"{len(fanout.failed)} of {fanout.clients} clients could not connect, e.g. {fanout.failed[0]}")
    deadline = time.monotonic() + 60
    while (counted := push_status(base)["pages"]) < pages:
        if time.monotonic() > deadline:
            raise BenchFailed(f"the dashboard pushes to {counted} pages, not {pages}")
        page.wait_for_timeout(500)


def push_status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "_wikipulse/push", timeout=10) as response:
        return dict(orjson.loads(response.read()))


def is_refresh(request: Any) -> bool:
    """The page's refresh callback (the one a push triggers): its request names the graph's figure."""
    return bool(request.method == "POST" and b"graph.figure" in (request.post_data_buffer or b""))


def start_fanout(base: str, clients: int, refresh: Any, patched: bool) -> FanOut:
    with urllib.request.urlopen(base + "_dash-dependencies", timeout=10) as response:
        dependencies = orjson.loads(response.read())
    push_output = next(d["output"] for d in dependencies if not d.get("inputs"))  # the persistent push callback
    path = "/" + refresh.url.split("/", 3)[3]
    fanout = FanOut(base, clients, refresh.post_data_buffer or b"", path, push_output, patched)
    threading.Thread(target=fanout.run, daemon=True).start()
    return fanout


if __name__ == "__main__":
    main()
