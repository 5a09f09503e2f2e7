"""The page in a real headless Chromium (Debian's), against a real Redis fed with known events."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from tests.helpers import callback_body, post_callback, start_dashboard
from wikipulse.core.settings import Settings
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.reference import fold
from wikipulse.fold.series import SeriesWriter, notice
from wikipulse.store import keys

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError("CI must install Debian's chromium for the browser tests")
    pytest.skip("no chromium installed (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright  # noqa: E402
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError  # noqa: E402

RETENTION = Settings.from_args(environ={}).retention_seconds()


def fold_into(url: str, events: list[dict[str, Any]]) -> None:
    """Fold events into Redis the way the subscriber does (pub/sub style: no stream entries to ack), announcing the
    batch on the notice channel as it does."""

    async def go() -> None:
        async with aioredis.Redis.from_url(url) as client:
            inc = fold(events, time.time(), RETENTION)
            writer = SeriesWriter(client, "wiki:events", "wikipulse", "test", notices=keys.NOTICES)
            moved = notice(inc.folded, {e["meta"]["domain"] for e in events}, 0, min(e["timestamp"] for e in events))
            await writer.apply(inc, [], {"folded": inc.folded}, moved)
            await writer.close()

    # Playwright's sync API runs an event loop in this thread: fold in another one.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(go())).result()


def make_events(domain: str, n: int, t: float, kind: str = "edit", bot: bool = False) -> list[dict[str, Any]]:
    return [{"meta": {"domain": domain, "id": f"{domain}-{t}-{i}"}, "timestamp": int(t), "type": kind, "bot": bot} for i in range(n)]


@pytest.fixture(scope="module")
def dash_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("dash-redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def dash_env(dash_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    server = dash_redis
    port = free_port()
    log = tmp_path_factory.mktemp("dash-log") / "dash.log"
    process = start_dashboard(server.url, port, log)
    base = f"http://127.0.0.1:{port}/"
    yield server.url, base
    process.terminate()
    assert process.wait(10) == 0
    output = log.read_text(errors="replace")
    assert "development server" not in output.lower() and "Traceback" not in output, output[-2000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        yield b
        b.close()


@pytest.fixture(autouse=True)
def no_page_outlives_its_test(browser: Browser) -> Iterator[None]:
    """A failed test's pages would go on polling and being pushed to, skewing the next tests' counts."""
    yield
    for context in browser.contexts:
        context.close()


@pytest.fixture
def seeded(dash_env: tuple[str, str]) -> Iterator[tuple[redis.Redis, str]]:
    url, base = dash_env
    client = redis.Redis.from_url(url)
    client.flushall()
    now = time.time()
    fold_into(url, make_events("en.wikipedia.org", 30, now - 15) + make_events("commons.wikimedia.org", 50, now - 15, "categorize", True)
              + make_events("www.wikidata.org", 40, now - 15) + make_events("de.wikipedia.org", 5, now - 15, "new"))  # fmt: skip
    client.hset(keys.PUBLISHER_STATS, mapping={"updated_at": now, "last_publish_at": now, "lag_seconds": 1.2})
    event = {
        "meta": {"domain": "en.wikipedia.org"},
        "type": "edit",
        "title": "Zürich",
        "title_url": "https://en.wikipedia.org/wiki/Z%C3%BCrich",
        "user": "Ann",
        "bot": False,
    }
    client.xadd("wiki:events", {"data": orjson.dumps(event)})
    yield client, base
    client.close()


def open_page(browser: Browser, url: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            errors.append(msg.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_function(
        "() => { const g = document.querySelector('#graph .js-plotly-plot'); return g && g.data && g.data.length > 0 }", timeout=15000
    )
    return page, errors


def pick_option(page: Page, dropdown: str, search: str, option: str) -> None:
    """Open a picker, search it and click the option, as a user would: again if a redraw closed the picker first."""
    for _ in range(3):
        if not page.locator(".dash-dropdown-search").is_visible():
            page.click(dropdown)
        try:
            page.fill(".dash-dropdown-search", search, timeout=3000)
            page.click(f".dash-dropdown-option:has-text('{option}')", timeout=3000)
            return
        except PlaywrightTimeoutError:
            continue
    raise AssertionError(f"no option {option!r} in {dropdown} after searching {search!r}")


def trace_names(page: Page) -> list[str]:
    return list(page.evaluate("() => document.querySelector('#graph .js-plotly-plot').data.map(t => t.name)"))


def test_page_loads_with_defaults_and_no_console_errors(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, errors = open_page(browser, base)
    assert sorted(trace_names(page)) == ["commons.wikimedia.org", "en.wikipedia.org", "www.wikidata.org"]
    page.wait_for_function("() => document.querySelector('#h-hour').textContent === '125'", timeout=10000)
    assert "Zürich" in page.inner_text("#ticker")
    assert page.get_attribute("#ticker a", "href") == "https://en.wikipedia.org/wiki/Z%C3%BCrich"
    assert "domains=" in page.url  # the selection is in the URL: a reload keeps it
    page.wait_for_timeout(2500)  # a refresh or two
    assert errors == []
    page.close()


def test_picking_a_domain_changes_the_traces_and_survives_reload(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, errors = open_page(browser, base + "?domains=en.wikipedia.org")
    assert trace_names(page) == ["en.wikipedia.org"]
    pick_option(page, "#domains", "de.wikipedia", "de.wikipedia.org")
    page.wait_for_function("() => document.querySelector('#graph .js-plotly-plot').data.length === 2", timeout=10000)
    assert trace_names(page) == ["en.wikipedia.org", "de.wikipedia.org"]
    page.wait_for_function("() => location.search.includes('de.wikipedia.org')", timeout=10000)
    page.reload()
    page.wait_for_function("() => document.querySelector('#graph .js-plotly-plot')?.data?.length === 2", timeout=10000)
    assert trace_names(page) == ["en.wikipedia.org", "de.wikipedia.org"]
    assert errors == []
    page.close()


def test_a_newly_folded_event_shows_up_within_3_seconds(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    page, _ = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s")
    total = "() => document.querySelector('#graph .js-plotly-plot').data[0].y.reduce((a, b) => a + (b || 0), 0)"
    assert page.evaluate(total) == 0
    url = client.connection_pool.connection_kwargs
    fold_into(f"redis://127.0.0.1:{url['port']}/0", make_events("fr.wikipedia.org", 7, time.time()))
    started = time.monotonic()
    page.wait_for_function(f"() => ({total})() === 7", timeout=3000)
    assert time.monotonic() - started < 3
    page.close()


def test_a_refresh_keeps_the_users_zoom(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    page, errors = open_page(browser, base + "?domains=en.wikipedia.org&res=10s")
    xrange = "() => document.querySelector('#graph .js-plotly-plot').layout.xaxis.range.map(v => Date.parse(v.replace(' ', 'T') + 'Z'))"
    full = page.evaluate(xrange)
    box = page.locator("#graph .nsewdrag").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.3, y)  # drag across the middle of the plot: an x zoom, as a user does
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y + 3, steps=10)
    page.mouse.up()
    zoomed = page.evaluate(xrange)
    assert zoomed[1] - zoomed[0] < (full[1] - full[0]) / 2
    page.evaluate("() => { window.redraws = 0; document.querySelector('#graph .js-plotly-plot')"
                  ".on('plotly_afterplot', () => window.redraws++) }")  # fmt: skip
    url = f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"
    for _ in range(2):  # new counts, pushed to the page: a refresh each
        fold_into(url, make_events("en.wikipedia.org", 1, time.time()))
        time.sleep(0.5)
    page.wait_for_function("() => window.redraws >= 2", timeout=10000)  # two refreshes redrew the graph
    assert page.evaluate(xrange) == zoomed
    page.dblclick("#graph .nsewdrag", position={"x": box["width"] / 2, "y": box["height"] / 2})  # back to the whole window
    page.wait_for_function(f"() => ({xrange})()[1] - ({xrange})()[0] > {(full[1] - full[0]) * 0.9}", timeout=10000)
    assert errors == []
    page.close()


def test_switching_resolution(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, errors = open_page(browser, base + "?domains=en.wikipedia.org&res=10s")
    page.click("#resolution >> text=1m")
    page.wait_for_function("() => location.search.includes('res=1m') && location.search.includes('window=6h')", timeout=10000)
    step = (
        "() => { const x = document.querySelector('#graph .js-plotly-plot').data[0].x; return (Date.parse(x[1]) - Date.parse(x[0])) / 1e3 }"
    )
    page.wait_for_function(f"() => ({step})() === 60", timeout=10000)
    assert errors == []
    page.close()


def test_breakdown_by_bot(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, _ = open_page(browser, base + "?domains=commons.wikimedia.org&by=bot")
    assert trace_names(page) == ["commons.wikimedia.org · bot", "commons.wikimedia.org · human"]
    page.close()


def test_stale_banner(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    client.hset(keys.PUBLISHER_STATS, "last_publish_at", time.time() - 120)
    page, _ = open_page(browser, base)
    page.wait_for_selector("#stale-banner", state="visible", timeout=10000)
    assert "Stale" in page.inner_text("#stale-banner")
    page.close()


def test_clicking_a_top_domain_adds_it(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, _ = open_page(browser, base + "?domains=en.wikipedia.org")
    page.click("#top-hour >> text=www.wikidata.org")
    page.wait_for_function("() => document.querySelector('#graph .js-plotly-plot').data.length === 2", timeout=10000)
    assert trace_names(page) == ["en.wikipedia.org", "www.wikidata.org"]
    page.close()


def test_export_downloads_the_shown_series_as_csv(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    _, base = seeded
    page, _ = open_page(browser, base + "?domains=en.wikipedia.org,de.wikipedia.org&res=10s&window=10m")
    with page.expect_download(timeout=10000) as download:
        page.click("#export")
    assert download.value.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text(encoding="utf-8"))))
    assert list(rows[0]) == ["bucket_start", "en.wikipedia.org", "de.wikipedia.org"]
    assert len(rows) in (60, 61)  # 10 minutes of 10 s buckets (the clock may tick into the next one)
    assert sum(int(r["en.wikipedia.org"] or 0) for r in rows) == 30
    assert sum(int(r["de.wikipedia.org"] or 0) for r in rows) == 5
    page.close()


def test_a_malicious_domain_is_refused(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    before = sorted(client.keys("*"))
    page, _ = open_page(browser, base + "?domains=en.wikipedia.org")
    # Send the refresh callback a hostile value directly, as a crafted request would.
    response = page.evaluate(
        """async () => {
            const deps = await (await fetch('/_dash-dependencies')).json();
            const refresh = deps.find(d => d.output.includes('graph.figure'));
            const values = {domains: ['en.wikipedia.org}:*', 'x\\r\\nFLUSHALL'], resolution: '10s', window: '30m', breakdown: 'total'};
            const inputs = refresh.inputs.map(i => ({...i, value: i.id in values ? values[i.id] : 1}));
            const r = await fetch('/_dash-update-component', {method: 'POST', headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({output: refresh.output, outputs: refresh.output.slice(2, -2).split('...').map(s => {
                    const [id, property] = s.split('.'); return {id, property}}), inputs, changedPropIds: ['domains.value'],
                    state: refresh.state.map(s => ({...s, value: null}))})});
            return {status: r.status, body: await r.text()};
        }"""
    )
    assert response["status"] == 200, response["body"][:2000]
    assert "Refused" in response["body"] and "FLUSHALL" not in response["body"].replace("Refused: not a domain", "")
    assert sorted(client.keys("*")) == before  # nothing was read or written under a crafted key
    page.close()


def test_debug_is_off_and_bound_to_loopback(dash_env: tuple[str, str]) -> None:
    _, base = dash_env
    assert base.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(base, timeout=10) as page:
        assert page.headers["server"] == "uvicorn"  # a production ASGI server, not a development one
    # A callback request naming no callback makes Dash raise: in debug mode Werkzeug would answer with its debugger.
    bogus = {"output": "nope.children", "outputs": {"id": "nope", "property": "children"}, "inputs": [], "changedPropIds": []}
    request = urllib.request.Request(
        base + "_dash-update-component", data=orjson.dumps(bogus), headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    body = failure.value.read().decode(errors="replace")
    failure.value.close()
    assert failure.value.code == 400  # refused before Dash (guard.py), never a 500
    assert "Werkzeug Debugger" not in body
    assert "Traceback" not in body


HOSTILE: tuple[Any, ...] = ([], ["en.wikipedia.org", ["nested"]], {"a": 1}, 5, 2.5, True, None, "x" * 10_000, "1h")


def test_every_callback_input_of_any_json_type_gets_an_answer_not_a_500(seeded: tuple[redis.Redis, str]) -> None:
    """A crafted request can send any JSON for any input or state: a list or an object where a string is expected."""
    _, base = seeded
    with urllib.request.urlopen(base + "_dash-dependencies", timeout=10) as response:
        callbacks = [c for c in orjson.loads(response.read()) if not c.get("clientside_function")]
    assert len(callbacks) >= 4
    failures = []
    for callback in callbacks:
        for s in (*callback["inputs"], *callback["state"]):
            if isinstance(s["id"], dict):
                continue  # pattern-matching ids are answered in the browser (clientside)
            for value in HOSTILE:
                status, body = post_callback(base, orjson.dumps(callback_body(callback, {(s["id"], s["property"]): value})))
                if status not in (200, 204) and not (status == 400 and b"a websocket callback" in body):  # those: socket only
                    failures.append((callback["output"][:60], s["id"], repr(value)[:30], status, body[:200]))
    assert not failures, failures[:10]


def test_the_work_one_refresh_can_ask_for_is_capped(seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    with urllib.request.urlopen(base + "_dash-dependencies", timeout=10) as response:
        refresh = next(c for c in orjson.loads(response.read()) if "graph.figure" in c["output"])
    domains = [f"d{i}.wikipedia.org" for i in range(10)]

    def ask(domains: list[str], resolution: str, window: str) -> tuple[int, bytes, int]:
        before = int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))
        values = {("domains", "value"): domains, ("resolution", "value"): resolution, ("window", "value"): window,
                  ("breakdown", "value"): "type", ("tick", "n_intervals"): 1}  # fmt: skip
        status, body = post_callback(base, orjson.dumps(callback_body(refresh, values)))
        return status, body, int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)) - before

    # The longest window a page offers, for the most domains a page takes: bounded reads and response.
    status, body, hgetalls = ask(domains, "1h", "120d")
    assert status == 200 and len(body) < 5_000_000, len(body)  # 50 traces of 2,880 points; 12 x 400 d was 15 MB
    assert hgetalls <= (len(domains) + 1) * (120 * 24 // 12 + 1) + 10, hgetalls
    # 400 days of hours (9,600 points a trace) is no longer a page's window: the resolution's default is served.
    status, _, hgetalls = ask(domains, "1h", "400d")
    assert status == 200 and hgetalls <= (len(domains) + 1) * (7 * 2 + 1) + 10, hgetalls
    # More domains than a page takes: refused, nothing read.
    status, body, hgetalls = ask([*domains, "x.wikipedia.org", "y.wikipedia.org"], "1h", "120d")
    assert status == 200 and b"Refused" in body and hgetalls == 0


def test_screenshot(browser: Browser, seeded: tuple[redis.Redis, str], tmp_path: Any) -> None:
    _, base = seeded
    page, _ = open_page(browser, base)
    path = os.environ.get("WIKIPULSE_SCREENSHOT", str(tmp_path / "dashboard.png"))
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 10_000
    page.close()


LIVE = "() => document.querySelector('#push-status').textContent === 'live'"
TOTAL = "() => document.querySelector('#graph .js-plotly-plot').data[0].y.reduce((a, b) => a + (b || 0), 0)"
# A component's prop, and a store's data, from Dash's own state in the page.
PROP = "(id, prop) => { const s = window.dash_stores[0].getState(); return s.paths.strs[id].reduce((n, k) => n[k], s.layout).props[prop]; }"
STORE = f"id => ({PROP})(id, 'data')"
PUSHED_MARK = f"() => (({STORE})('pushed') || {{then: {{}}}}).then.mark"
SHOWN_MARK = f"() => (({STORE})('shown') || {{}}).mark"


def redis_url_of(client: redis.Redis) -> str:
    return f"redis://127.0.0.1:{client.connection_pool.connection_kwargs['port']}/0"


def push_status(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "_wikipulse/push", timeout=5) as response:
        return dict(orjson.loads(response.read()))


def test_a_new_event_is_pushed_with_no_polling_request_in_between(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    """The update itself comes over the page's websocket (issue 24): no request at all, before or after it."""
    client, base = seeded
    page, errors = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function(LIVE, timeout=10000)
    page.wait_for_timeout(1000)  # the page load's own callbacks are done
    posts: list[float] = []
    page.on("request", lambda r: posts.append(time.monotonic()) if r.method == "POST" else None)
    page.wait_for_timeout(5000)  # nothing new: a page polling every 2 s would have asked twice by now
    assert posts == []
    sent = time.monotonic()
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 7, time.time()))
    page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=3000)
    shown = time.monotonic() - sent
    page.wait_for_timeout(1000)
    assert posts == []  # no refresh asked for: the update came with the push
    assert page.evaluate(PUSHED_MARK) == page.evaluate(SHOWN_MARK) is not None  # it came as a push, and was applied
    assert shown < 1.5, f"{shown:.2f}s from the fold to the screen"
    assert errors == []
    page.close()


PAGE_STATE = f"""() => ({{status: document.querySelector('#push-status').textContent, total: ({TOTAL})(),
    pushed: ({PUSHED_MARK})(), shown: ({SHOWN_MARK})()}})"""


def wait_for_total(pages: list[Page], base: str, total: int, timeout: float = 20000) -> None:
    """Every page shows `total`; else the failure says what each page and the server's push stood at."""
    for page in pages:
        try:
            page.wait_for_function(f"() => ({TOTAL})() === {total}", timeout=timeout)
        except PlaywrightTimeoutError:
            states = [p.evaluate(PAGE_STATE) for p in pages]
            raise AssertionError(f"not every page shows {total}: {states}, push status {push_status(base)}") from None


def test_a_page_s_socket_is_never_closed_for_inactivity(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    """Dash's worker closes a socket after 5 minutes without a message, and does not reconnect it: a page watching
    through a quiet feed or an outage (nothing pushed) would freeze, polling off. The page's config turns it off."""
    _, base = seeded
    page, _ = open_page(browser, base)
    config = page.evaluate("() => JSON.parse(document.getElementById('_dash-config').textContent).websocket")
    assert config["inactivity_timeout"] == 0, config  # the worker closes only when it is > 0
    page.close()


def test_a_page_that_says_it_shows_something_older_is_pushed_to_at_once(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    """A redraw over HTTP computed before a fold can land after that fold's push: the page then shows the older
    figure and says so (resync). It is pushed to from there at once, not left behind until the next event."""
    client, base = seeded
    page, errors = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function(LIVE, timeout=10000)
    page.wait_for_function(f"() => ({SHOWN_MARK})() !== undefined", timeout=10000)
    before = page.evaluate(f"() => [({PROP})('graph', 'figure'), ({PROP})('shown', 'data')]")
    assert page.evaluate(TOTAL) == 0
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 7, time.time()))
    page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=5000)
    # The late redraw: the figure and its state from before the fold, as the refresh callback sets them.
    redraw = f"""([figure, shown]) => {{ dash_clientside.set_props('graph', {{figure}});
                  dash_clientside.set_props('shown', {{data: shown}}); return ({SHOWN_MARK})(); }}"""
    assert page.evaluate(redraw, before) == before[1]["mark"]  # it shows the older figure now (a push may follow at once)
    page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=5000)  # no event since: only the push can bring it back
    assert errors == []
    page.close()


def settle_pages(base: str, expected: int, timeout: float = 45) -> dict[str, Any]:
    """The push status once it counts `expected` pages: a page closed by an earlier test leaves the count when the
    server sees its socket close, which on a loaded machine can wait for the websocket's ping timeout."""
    deadline = time.monotonic() + timeout
    while (status := push_status(base))["pages"] != expected:
        assert time.monotonic() < deadline, (expected, status)
        time.sleep(0.2)
    return status


# Ten real Chromium pages beside the pipeline on two cores: twenty starved the machine so that Dash judged sockets dead
# and replaced them (a page then missed a push for over 10 s in CI). The thousand-page load is bench_push's.
VIEWERS = 10


def test_ten_pages_get_the_same_push_and_leave_nothing_behind(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    settle_pages(base, 0)
    contexts = [browser.new_context(viewport={"width": 1000, "height": 800}) for _ in range(VIEWERS)]  # separate viewers
    pages = []
    for context in contexts:
        page = context.new_page()
        page.goto(base + "?domains=fr.wikipedia.org&res=10s")
        pages.append(page)
    for page in pages:
        page.wait_for_function(LIVE, timeout=30000)
    status = settle_pages(base, VIEWERS)
    assert status["subscribed"]
    assert client.pubsub_numsub(keys.NOTICES) == [(keys.NOTICES.encode(), 1)]  # one subscription for all of them
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 7, time.time()))
    wait_for_total(pages, base, 7)
    # The pages were drawn at different moments; pushed one version, they show the same, and share its next update.
    pages[0].wait_for_timeout(1000)
    computed = push_status(base)["updates_computed"]
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 2, time.time()))
    wait_for_total(pages, base, 9)
    # The graph's update once for all of them, and the lists' once or twice (each socket's lists fall due at their own
    # moment, so a slow round can straddle two versions): far from one per page (one a page before).
    assert push_status(base)["updates_computed"] - computed <= 4
    for context in contexts:
        context.close()
    deadline = time.monotonic() + 30  # the hub lets its subscription go IDLE_STOP (10 s) after the last page
    while (status := push_status(base))["pages"] or status["subscribed"]:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert client.pubsub_numsub(keys.NOTICES) == [(keys.NOTICES.encode(), 0)]


def test_the_page_says_when_redis_is_gone_and_recovers_by_itself(
    browser: Browser, seeded: tuple[redis.Redis, str], dash_redis: RedisServer
) -> None:
    _, base = seeded
    page, _ = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function(LIVE, timeout=10000)
    dash_redis.stop()  # AOF on: it comes back with what it held
    page.wait_for_function("() => document.querySelector('#push-status').textContent.startsWith('Redis unavailable')", timeout=15000)
    dash_redis.start()
    page.wait_for_function(LIVE, timeout=20000)
    fold_into(dash_redis.url, make_events("fr.wikipedia.org", 7, time.time()))
    page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=5000)
    page.close()


def test_a_page_whose_socket_was_cut_reconnects_and_catches_up(browser: Browser, seeded: tuple[redis.Redis, str], tmp_path: Path) -> None:
    """The dashboard is restarted under an open page: the socket drops, Dash reconnects it and restarts the page's
    push, which refreshes at once, so what was folded meanwhile shows without a reload."""
    client, _ = seeded
    port = free_port()
    dashboard = start_dashboard(redis_url_of(client), port, tmp_path / "dash.log")
    page, _ = open_page(browser, f"http://127.0.0.1:{port}/?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function(LIVE, timeout=10000)
    dashboard.terminate()
    assert dashboard.wait(10) == 0
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 7, time.time()))  # while nobody serves the page
    dashboard = start_dashboard(redis_url_of(client), port, tmp_path / "dash.log")
    try:
        page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=30000)
        page.wait_for_function(LIVE, timeout=5000)
    finally:
        page.close()
        dashboard.terminate()
        dashboard.wait(10)


def test_without_a_websocket_the_page_polls_and_says_so(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    """No websocket (a proxy that refuses the upgrade, played by refusing the worker that would open it): the page polls
    as before, and says so."""
    client, base = seeded
    context = browser.new_context()
    context.route("**/dash-ws-worker*", lambda route: route.abort())
    page = context.new_page()
    page.goto(base + "?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function("() => { const g = document.querySelector('#graph .js-plotly-plot'); return g && g.data && g.data.length }")
    posts: list[float] = []
    page.on("request", lambda r: posts.append(time.monotonic()) if r.method == "POST" else None)
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 7, time.time()))
    page.wait_for_function(f"() => ({TOTAL})() === 7", timeout=5000)  # the next poll brings it
    page.wait_for_timeout(4500)
    assert len(posts) >= 2, page.inner_text("#push-status")  # it keeps asking every 2 s
    assert page.inner_text("#push-status") == "polling every 2 s"
    context.close()


def test_a_burst_of_notices_is_coalesced_into_a_few_refreshes(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    """A backfill announces batch after batch: a page is pushed to at most every MIN_PUSH_GAP (0.25 s), not per notice."""
    client, base = seeded
    page, _ = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s")
    page.wait_for_function(LIVE, timeout=10000)
    page.wait_for_timeout(1000)
    page.evaluate(RECORD_PUSHED_FIGURES)
    posts: list[float] = []
    page.on("request", lambda r: posts.append(time.monotonic()) if r.method == "POST" else None)
    started = time.monotonic()
    for _ in range(100):  # 100 notices in about a second
        client.publish(keys.NOTICES, orjson.dumps({"folded": 1, "domains": ["fr.wikipedia.org"], "shard": 0}))
        time.sleep(0.01)
    page.wait_for_timeout(1500)
    elapsed = time.monotonic() - started
    pushed = page.evaluate("() => window.pushedFigures.length")
    assert 2 <= pushed <= elapsed / 0.25 + 2, (pushed, elapsed)
    assert posts == []
    page.close()


GRAPH_DATA = "() => document.querySelector('#graph .js-plotly-plot').data.map(t => [t.name, t.x, t.y])"
# Every figure a push sets (the page applies a pushed update with dash_clientside.set_props, view_updates.py).
RECORD_PUSHED_FIGURES = """() => {
    window.pushedFigures = [];
    const original = dash_clientside.set_props;
    dash_clientside.set_props = (id, props) => {
        if (id === "graph") { window.pushedFigures.push(JSON.stringify(props.figure)); }
        return original(id, props);
    };
}"""


def test_a_push_sends_only_the_buckets_that_moved_and_the_page_ends_as_a_fresh_one(
    browser: Browser, seeded: tuple[redis.Redis, str]
) -> None:
    """After the first draw, a push sends a Patch of the figure (issue 12, over the websocket since issue 24): the moved buckets, not
    every timestamp and value again. Fresh events, a late one (five minutes back) and a window that slides must all
    leave the page's graph as a freshly loaded page draws it."""
    client, base = seeded
    url = base + "?domains=fr.wikipedia.org,en.wikipedia.org&res=10s&window=30m&breakdown=type"
    page, errors = open_page(browser, url)
    page.wait_for_function(LIVE, timeout=10000)
    page.wait_for_timeout(1000)
    page.evaluate(RECORD_PUSHED_FIGURES)
    full = len(orjson.dumps(page.evaluate("() => document.querySelector('#graph .js-plotly-plot').data")))
    sent = 0
    for i, back in enumerate((0, 0, 300, 0, 0)):  # the third batch is late: its bucket is 30 buckets back
        fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 3 + i, time.time() - back))
        sent += 3 + i
        page.wait_for_function(f"() => ({TOTAL})() === {sent}", timeout=5000)
        page.wait_for_timeout(600 if i < 4 else 11000)  # the last wait lets the window slide by a bucket
    fold_into(redis_url_of(client), make_events("fr.wikipedia.org", 1, time.time()))
    page.wait_for_function(f"() => ({TOTAL})() === {sent + 1}", timeout=5000)
    page.wait_for_timeout(500)
    pushed = page.evaluate(GRAPH_DATA)
    figures = [body.encode() for body in page.evaluate("() => window.pushedFigures")]
    fresh_page, _ = open_page(browser, url)
    fresh = fresh_page.evaluate(GRAPH_DATA)
    assert [name for name, _, _ in pushed] == [name for name, _, _ in fresh]
    for (name, x, y), (_, fresh_x, fresh_y) in zip(pushed, fresh, strict=True):
        assert x == sorted(x) and len(x) == len(set(x)) == len(fresh_x), name
        common = set(x) & set(fresh_x)  # the fresh page may be a bucket later
        assert len(common) >= len(x) - 1, name
        shown = {b: v for b, v in zip(x, y, strict=True) if b in common}
        assert shown == {b: v for b, v in zip(fresh_x, fresh_y, strict=True) if b in common}, name
    patches = [body for body in figures if b"__dash_patch_update" in body]
    assert len(patches) >= 5 and len(figures) == len(patches), [body[:300] for body in figures]
    # A late batch re-sends its traces' values whole (as cheap as an operation per moved value), never the timestamps.
    assert max(len(body) for body in patches) < full / 3, ([len(body) for body in patches], full)
    operations = [op for body in patches for op in orjson.loads(body)["operations"]]
    assert not any(op["operation"] == "Assign" and op["location"][-1] == "x" for op in operations)
    assert errors == []
    page.close()
    fresh_page.close()


def test_the_namespace_filter_narrows_the_graph_and_stays_in_the_url(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    now = time.time()
    events = [{**e, "namespace": 0} for e in make_events("fr.wikipedia.org", 3, now - 15)]
    events += [{**e, "namespace": 14} for e in make_events("fr.wikipedia.org", 5, now - 15, "categorize", True)]
    fold_into(redis_url_of(client), events)
    cases = [  # the URL's filters, then the trace and the events it must show
        ("ns=0", "fr.wikipedia.org · articles", 3),
        ("ns=0&who=bots", "fr.wikipedia.org · articles · bot", 0),
        ("ns=0&who=humans", "fr.wikipedia.org · articles · human", 3),
        ("ns=0&by=bot", "fr.wikipedia.org · articles · bot", 0),
        ("ns=14&who=bots", "fr.wikipedia.org · bot", 5),  # the graph splits out articles only: every namespace's bots
        ("ns=all", "fr.wikipedia.org", 8),
    ]
    for filters, name, total in cases:
        page, errors = open_page(browser, base + "?domains=fr.wikipedia.org&res=10s&" + filters)
        page.wait_for_function(f"() => ({TOTAL})() === {total}", timeout=5000)
        assert trace_names(page)[0] == name, filters
        assert f"ns={filters.split('ns=')[1].split('&')[0]}" in page.url  # kept in the URL for a reload or a link
        assert errors == []
        page.close()


def page_events(domain: str, t: float, titles: list[tuple[str, bool]], kind: str = "edit") -> list[dict[str, Any]]:
    """Edits of the given (title, by a bot) with what the trending lists read."""
    return [
        {"meta": {"domain": domain, "id": f"{domain}-{title}-{i}"}, "timestamp": int(t), "type": kind, "bot": bot, "namespace": 0,
         "title": title, "user": f"{'Bot' if bot else 'User'}{i}", "length": {"old": 100, "new": 150}, "revision": {"new": 1000 + i}}
        for i, (title, bot) in enumerate(titles)
    ]  # fmt: skip


HOSTILE_TITLE = "<img src=x onerror=window.pwned=1> & <script>window.pwned=2</script>"


def test_trending_new_pages_and_spikes_follow_the_picked_wikis_and_filters(browser: Browser, seeded: tuple[redis.Redis, str]) -> None:
    client, base = seeded
    now = time.time()
    minute = int(now) // 60 * 60
    fold_into(redis_url_of(client), page_events("en.wikipedia.org", now - 5, [(HOSTILE_TITLE, False)] * 3 + [("Bot target", True)] * 5)
              + page_events("en.wikipedia.org", now - 5, [("Fresh article", False)], "new")
              + page_events("de.wikipedia.org", now - 5, [("Anderswo", False)] * 9))  # fmt: skip
    alert = {"domain": "en.wikipedia.org", "minute": minute, "rate": 900, "baseline": 40.0, "deviation": 5.0, "top": [["Bot target", 5]]}
    client.xadd(keys.ALERTS, {"alert": orjson.dumps(alert)})
    page, errors = open_page(browser, base + "?domains=en.wikipedia.org&res=10s&window=30m")
    trending = "() => document.querySelector('#trending')?.innerText ?? ''"
    page.wait_for_function(f"() => ({trending})().includes('Bot target')", timeout=10000)
    rows = page.locator("#trending tr").all_inner_texts()
    assert rows[1].startswith("Bot target") and rows[2].startswith(HOSTILE_TITLE), rows  # 5 edits, then 3; not de's 9
    assert "Anderswo" not in page.locator("#trending").inner_text()
    assert page.evaluate("() => window.pwned") is None and page.locator("#trending img, #trending script").count() == 0
    href = page.locator("#trending a.trend-title").nth(1).get_attribute("href") or ""
    assert href.startswith("https://en.wikipedia.org/w/index.php?title=%3Cimg") and "action=history" in href
    assert "Fresh article" in page.locator("#new-pages").inner_text()
    assert "en.wikipedia.org: 900/min" in page.locator("#alerts").inner_text()
    page.wait_for_function("() => document.querySelector('#graph').innerText.includes('spike · en.wikipedia.org')", timeout=10000)
    # Humans only: the bot's page leaves the list; the filter is in the URL and survives a reload.
    page.locator("#who label", has_text="humans").click()
    page.wait_for_function("() => location.search.includes('who=humans')", timeout=10000)
    page.wait_for_function(f"() => !({trending})().includes('Bot target')", timeout=10000)
    page.reload()
    page.wait_for_function(f"() => ({trending})().includes('onerror')", timeout=15000)
    assert "Bot target" not in page.locator("#trending").inner_text()
    assert page.locator("#who input[value=humans]").is_checked()
    assert page.evaluate("() => document.querySelector('#graph .js-plotly-plot').data.map(t => t.name)") == ["en.wikipedia.org · human"]
    # Bots only: the bot's page alone, with its 5 edits, 5 editors and bytes.
    page.locator("#who label", has_text="bots").click()
    page.wait_for_function(f"() => ({trending})().includes('Bot target') && !({trending})().includes('onerror')", timeout=10000)
    assert page.locator("#trending tr").all_inner_texts()[1].split("\t") == ["Bot target", "en.wikipedia.org", "5", "5", "+250"]
    assert errors == []
    page.close()
