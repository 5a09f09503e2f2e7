#!/usr/bin/env python3
"""Event to screen: push vs polling, side by side in one run, in a real headless Chromium.

`pipenv run python -m bench.bench_push [--marks N] [--fanout P [--whole]]`: the real pipeline (redis-server, `publisher.py`,
`subscriber.py`, `dash_app.py` as processes) reads a local EventStreams server that emits a marked edit (a unique
title) every 0.6-1.4 s. Two pages watch the same marks at once: one pushed (websocket), one polling every 2 s (its
websocket worker refused, which is the page's fallback and exactly the page before push). Each page records when a
mark's title first appears in its DOM (a MutationObserver, `Date.now()`); the feed records when it sent it
(`time.time()`, the same clock).

With `--fanout P`: P - 1 more pages at once, as websocket clients that speak Dash's protocol (start the page's
persistent push callback, then ask for one refresh over HTTP per push, as a page does: a Patch of what it shows, or
with --whole the whole figure every time, as before issue 12's patches), plus the pushed browser page; reports the
dashboard process's CPU and memory and the browser page's event-to-screen times under that load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from pathlib import Path
from typing import Any

import orjson
import psutil
from aiohttp import web

from wikipulse.eventstreams import PATH
from wikipulse.redis_server import RedisServer, free_port
from wikipulse.simulate import Simulator

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
def pipeline(feed: MarkFeed, workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    redis_server = RedisServer(workdir / "redis", appendonly=False).start()
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "WIKI_STREAM_URL": feed.url, "DASH_PORT": str(port), "LOG_LEVEL": "WARNING"}
    processes = {
        name: subprocess.Popen([sys.executable, str(ROOT / f"{name}.py")], env=env, cwd=ROOT, stdin=subprocess.DEVNULL)
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
        for p in processes.values():
            p.wait(10)
        redis_server.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class FanOut:
    """P websocket clients speaking Dash's protocol, in a thread: each starts the page's persistent push callback,
    and asks for one refresh over HTTP per push it gets, as a real page does: triggered by the pulse, with what its
    graph shows (so the answer is a Patch), or, with --whole, the page's first request again (the whole figure)."""

    def __init__(self, base: str, clients: int, refresh_body: bytes, refresh_path: str, push_output: str, patched: bool) -> None:
        self.base, self.clients = base, clients
        self.refresh_body, self.refresh_path, self.push_output = refresh_body, refresh_path, push_output
        self.patched = patched  # ask as a pushed page does (a Patch of what it shows), or for the whole figure each time
        self.pushes = 0
        self.refreshes = 0
        self.received = 0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.clients)))

    async def _client(self, session: Any, i: int) -> None:
        ws_url = self.base.replace("http://", "ws://") + "_dash-ws-callback"
        async with session.ws_connect(ws_url, headers={"Origin": self.base.rstrip("/")}) as ws:
            payload = {"output": self.push_output, "outputs": [], "inputs": [], "changedPropIds": [], "state": []}
            await ws.send_json({"type": "callback_request", "requestId": f"r{i}", "rendererId": f"bench-{i}", "payload": payload})
            shown: Any = None  # what this page's graph shows, as its last refresh said
            while not self.stop.is_set():
                try:
                    message = await ws.receive(timeout=1.0)
                except TimeoutError:
                    continue
                if message.type != 1:  # not text
                    if message.type in (8, 256, 257, 258):  # close, closing, closed, error
                        return
                    continue
                for item in _messages(message.data):
                    if item.get("type") == "set_props" and item.get("payload", {}).get("componentId") == "pulse":
                        self.pushes += 1
                        body = pushed_refresh(self.refresh_body, shown) if self.patched else self.refresh_body
                        async with session.post(self.base.rstrip("/") + self.refresh_path, data=body,
                                                headers={"Content-Type": "application/json"}) as response:  # fmt: skip
                            reply = await response.read()
                        self.refreshes += 1
                        self.received += len(reply)
                        if response.status == 200:
                            shown = orjson.loads(reply)["response"].get("shown", {}).get("data", shown)


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
    parser.add_argument("--whole", action="store_true", help="the fan-out clients ask for the whole figure every time")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    feed = MarkFeed(args.marks)
    threading.Thread(target=feed.run, daemon=True).start()
    feed.started.wait()
    with tempfile.TemporaryDirectory() as tmp, pipeline(feed, Path(tmp)) as (base, dash_process), sync_playwright() as pw:
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
        process = psutil.Process(dash_process.pid)
        process.cpu_percent()
        feed.go.set()
        cpu_samples, rss = [], []
        measuring = time.monotonic()
        refreshes_before = fanout.refreshes if fanout is not None else 0
        deadline = time.monotonic() + args.marks * 1.5 + 30
        while len(feed.sent) < args.marks and time.monotonic() < deadline:
            for page in pages.values():
                page.wait_for_timeout(250)  # the pages run while this thread waits
            cpu_samples.append(process.cpu_percent())
            rss.append(process.memory_info().rss / 1e6)
        elapsed = time.monotonic() - measuring
        refreshes = (fanout.refreshes if fanout is not None else 0) - refreshes_before
        pages["push"].wait_for_timeout(3000)  # the last mark reaches the polling page
        results = {}
        for name, page in pages.items():
            seen = {int(k): v / 1000 for k, v in page.evaluate("() => window.marks").items()}
            results[name] = [seen[i] - feed.sent[i] for i in feed.sent if i in seen and i > 0]  # mark 0: the page was loading
            results[name + " missed"] = [i for i in feed.sent if i not in seen]
        if fanout is not None:
            fanout.stop.set()
        browser.close()
    print(f"\nevent to screen, {args.marks} marked edits, feed -> publisher -> subscriber -> page, both pages at once"
          + (f", {args.fanout} pages open" if args.fanout > 1 else ""))  # fmt: skip
    print("| page | p50 | p95 | max | marks seen |")
    print("|---|---|---|---|---|")
    for name in ("polling", "push"):
        times = results[name]
        print(f"| {name} | {statistics.median(times) * 1000:,.0f} ms | {percentile(times, 0.95) * 1000:,.0f} ms | "
              f"{max(times) * 1000:,.0f} ms | {len(times)} of {len(feed.sent) - 1} |")  # fmt: skip
    print(f"\ndashboard process: CPU {statistics.mean(cpu_samples):.0f}% mean, {max(cpu_samples):.0f}% peak (of one core); "
          f"RSS {max(rss):.0f} MB peak")  # fmt: skip
    if fanout is not None and refreshes:
        cpu_ms = statistics.mean(cpu_samples) / 100 * elapsed / refreshes * 1000
        print(f"fan-out clients ({'whole figure' if args.whole else 'Patch'}): {fanout.pushes} pushes received, "
              f"{fanout.refreshes} refreshes asked for, {fanout.received / max(fanout.refreshes, 1) / 1000:.1f} kB per answer; "
              f"{refreshes / elapsed:.0f} refreshes/s while measured: {cpu_ms:.1f} ms of dashboard CPU per page update")  # fmt: skip


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
