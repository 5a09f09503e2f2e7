"""`/history` in a real headless Chromium, against the real embedded archive (chDB) held by a real archiver process,
fed through a real Redis with known events (a re-delivered one among them): the exact total, the graph's split, the
top pages and editors, the links to and from the live page, crafted URLs, and no archive at all."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.helpers import callback_body, post_callback
from tests.test_dashboard_browser import HOSTILE, browser, no_page_outlives_its_test
from tests.test_history_queries import DEC_1, NOV_1, crafted_events, expected_rows, expected_top
from wikipulse.core.settings import Settings
from wikipulse.dashboard.history_queries import HistorySelection
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.store import keys

pytest.importorskip("chdb")
pytestmark = pytest.mark.browser
__all__ = ["browser", "no_page_outlives_its_test"]  # the live page's browser fixtures, shared

from playwright.sync_api import Browser, Page  # noqa: E402

EVENTS = crafted_events(3000, 11)
LINES = [orjson.dumps(e) for e in EVENTS]
AGAIN = LINES[::25]  # re-delivered: the same events again, later in the stream (two rows each, one event)
PICKED = ("en.wikipedia.org", "de.wikipedia.org")
URL = "history?domains=en.wikipedia.org,de.wikipedia.org&since=2026-11-01&until=2026-11-30&by=type"


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "LOG_LEVEL": "WARNING", **extra}


def _wait(check: Any, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert process is None or process.poll() is None, f"exited before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_dashboard(settings: Settings, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "dash_app.py"], env=_env(settings, DASH_PORT=str(port)), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/history", timeout=2).close()
            return True
        except OSError:
            return False

    _wait(answers, 30, "the dashboard", process)
    return process, f"http://127.0.0.1:{port}/"


def stop_dashboard(process: subprocess.Popen[bytes], log: Path) -> None:
    process.terminate()
    assert process.wait(10) == 0
    output = log.read_text(errors="replace")
    assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A Redis, a stream of the known events, and an archiver that archived them all and answers queries."""
    base = tmp_path_factory.mktemp("history")
    server = RedisServer(base / "redis").start()
    s = Settings.from_args(environ={}, redis_url=server.url, archive_dir=str(base / "clickhouse"), archive_port=free_port(),
                           archive_from_stream=True)  # fmt: skip
    client = redis.Redis.from_url(server.url)
    pipe = client.pipeline(transaction=False)
    for line in LINES + AGAIN:
        pipe.xadd(s.stream, {"data": line})
    pipe.execute()
    archiver = subprocess.Popen([sys.executable, "archiver.py"], env=_env(s), stdin=subprocess.DEVNULL)

    def archived_all() -> bool:
        return int(client.hget(keys.ARCHIVER_STATS, "archived") or 0) >= len(LINES) + len(AGAIN)

    try:
        _wait(archived_all, 120, "every event archived", archiver)
        yield s
    finally:
        archiver.terminate()
        archiver.wait(30)
        client.close()
        server.stop()


@pytest.fixture(scope="module")
def base(archived: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("history-dash") / "dash.log"
    process, url = start_dashboard(archived, log)
    yield url
    stop_dashboard(process, log)


def open_history(browser: Browser, url: str) -> tuple[Page, list[str]]:
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_function("() => { const t = document.querySelector('#history-total'); return t && t.textContent !== '–' }",
                           timeout=20000)  # fmt: skip
    return page, errors


def traces(page: Page) -> dict[str, int]:
    data = page.evaluate("() => document.querySelector('#history-graph .js-plotly-plot').data.map(t => [t.name, t.y, t.x.length])")
    return {name: sum(y) for name, y, _ in data}


def shown_total(page: Page) -> int:
    return int(page.inner_text("#history-total").replace(",", ""))


def test_the_exact_total_the_split_and_the_top_lists(browser: Browser, base: str) -> None:
    page, errors = open_history(browser, base + URL)
    picked = expected_rows(EVENTS, HistorySelection(PICKED, NOV_1, DEC_1))
    assert expected_rows([orjson.loads(line) for line in AGAIN], HistorySelection(PICKED, NOV_1, DEC_1))  # copies among them
    assert shown_total(page) == len(picked)  # each event once: the re-delivered copies are not counted again
    kinds = Counter(e["type"] if e["type"] in ("edit", "new", "log", "categorize") else "other" for e in picked)
    page.wait_for_function("() => document.querySelector('#history-graph .js-plotly-plot')?.data?.length > 0", timeout=10000)
    assert traces(page) == dict(kinds)  # the hostile type is one "other" trace, never a name of its own
    assert page.evaluate("() => document.querySelector('#history-graph .js-plotly-plot').data[0].x.length") == 720  # hours of November
    assert "one bar per hour" in page.inner_text(".history-total")
    rows = [r.split("\t") for r in page.locator("#history-pages tr").all_inner_texts()[1:]]
    assert [(r[1], r[0], int(r[2])) for r in rows] == [(d, t[:120], n) for d, t, n in expected_top(picked, "title")]
    editors = [r.split("\t") for r in page.locator("#history-editors tr").all_inner_texts()[1:]]
    assert [(r[1], r[0], int(r[2])) for r in editors] == [(d, u, n) for d, u, n in expected_top(picked, "user")]
    # Hostile titles and names are text: no element made of them, links quoted.
    assert "<img src=x onerror=alert(1)>" in page.inner_text("#history-pages") and "<b>bold</b>" in page.inner_text("#history-editors")
    assert page.locator("#history-pages img, #history-editors b, #history-pages script").count() == 0
    hrefs = page.eval_on_selector_all("#history-pages a, #history-editors a", "links => links.map(a => a.getAttribute('href'))")
    assert hrefs and all(re.fullmatch(r"https://(en|de)\.wikipedia\.org/[!-~]+", h) for h in hrefs), hrefs
    assert "https://en.wikipedia.org/w/index.php?title=%3Cimg_src%3Dx_onerror%3Dalert%281%29%3E&action=history" in hrefs
    assert any(h.endswith("Special:Contributions/%3Cb%3Ebold%3C%2Fb%3E") for h in hrefs)
    # Another split: the same total; the URL follows, so the page can be shared and reloaded.
    page.locator("#history-by label", has_text="bot / human").click()
    page.wait_for_function("() => location.search.includes('by=bot')", timeout=10000)
    page.wait_for_function("() => document.querySelector('#history-graph .js-plotly-plot').data.some(t => t.name === 'human')",
                           timeout=10000)  # fmt: skip
    assert traces(page) == dict(Counter("bot" if e["bot"] else "human" for e in picked))
    assert "domains=en.wikipedia.org%2Cde.wikipedia.org&since=2026-11-01&until=2026-11-30&by=bot" in page.url
    page.reload()
    page.wait_for_function("() => document.querySelector('#history-graph .js-plotly-plot')?.data?.some(t => t.name === 'human')",
                           timeout=15000)  # fmt: skip
    assert shown_total(page) == len(picked)
    assert errors == []


def test_namespaces_every_wiki_and_a_year_of_days(browser: Browser, base: str) -> None:
    page, errors = open_history(browser, base + "history?since=2026-01-01&until=2026-12-31&by=namespace")
    everything = expected_rows(EVENTS, HistorySelection((), NOV_1 - 400 * 86400, DEC_1 + 100 * 86400))
    assert shown_total(page) == len(everything) == len(EVENTS)
    names = {0: "articles", 1: "talk", 14: "category"}
    assert traces(page) == dict(Counter(names.get(e["namespace"], "other namespaces") for e in everything))
    assert page.evaluate("() => document.querySelector('#history-graph .js-plotly-plot').data[0].x.length") == 365
    holds = r"The archive holds events from 2026-10-1[23] to 2026-11-30 \([0-9,]+ rows, .*\)\."
    assert re.fullmatch(holds, page.inner_text("#history-extent"))
    assert errors == []


def test_the_links_between_the_live_page_and_history_keep_the_wikis(browser: Browser, base: str) -> None:
    page = browser.new_page()
    page.goto(base + "?domains=en.wikipedia.org,de.wikipedia.org")
    page.wait_for_function("() => document.querySelector('#history-link')?.getAttribute('href')?.includes('de.wikipedia.org')",
                           timeout=15000)  # fmt: skip
    assert page.get_attribute("#history-link", "href") == "/history?domains=en.wikipedia.org%2Cde.wikipedia.org"
    page.click("#history-link")
    page.wait_for_function("() => location.pathname === '/history' && document.querySelector('#history-total')?.textContent !== '–'",
                           timeout=20000)  # fmt: skip
    assert "domains=en.wikipedia.org%2Cde.wikipedia.org" in page.url
    picker = "() => document.querySelector('#history-domains')?.innerText ?? ''"  # the picker shows them
    page.wait_for_function(f"() => ({picker})().includes('en.wikipedia.org') && ({picker})().includes('de.wikipedia.org')", timeout=10000)
    assert page.get_attribute("#live-link", "href") == "/?domains=en.wikipedia.org%2Cde.wikipedia.org"
    page.click("#live-link")
    page.wait_for_function("() => document.querySelector('#graph .js-plotly-plot')?.data?.length === 2", timeout=20000)
    assert page.evaluate("() => document.querySelector('#graph .js-plotly-plot').data.map(t => t.name)") == list(PICKED)


CRAFTED = [
    ("since=2026-13-01", "since: '2026-13-01' is not a date (no such day)"),
    ("since=%C2%B2%E2%81%B0%C2%B2%E2%81%B6-11-01", "since: '²⁰²⁶-11-01' is not a date"),
    ("by=%C2%B2", "by: '²' is not one of type, bot, namespace"),
    ("by=user%27--", 'by: "user\'--" is not one of'),
    ("since=0001-01-01&until=2026-01-01", "since: '0001-01-01' is outside what the archive can hold (1970-01-01 to 2199-12-31)"),
    ("until=99999-12-31", "until: '99999-12-31' is not a date"),
    ("since=2026-11-30&until=2026-11-01", "since (2026-11-30) is after until (2026-11-01)"),
    ("domains=en.wikipedia.org%27)%20OR%201=1%20--", "not a wiki's host name: \"en.wikipedia.org') OR 1=1 --\""),
    ("domains=%22%3E%3Cscript%3Ewindow.pwned=1%3C/script%3E", "not a wiki's host name"),
    ("domains=" + ",".join(f"w{i}.wikipedia.org" for i in range(12)), "at most 10 wikis at once, not 12"),
]


def test_crafted_urls_get_a_clear_message_never_a_500(browser: Browser, base: str) -> None:
    page = browser.new_page()
    for query, message in CRAFTED:
        response = page.goto(f"{base}history?{query}")
        assert response is not None and response.status == 200
        page.wait_for_function("() => document.querySelector('#history-refused')?.textContent", timeout=15000)
        shown = page.inner_text("#history-refused")
        assert shown.startswith("Refused the address: ") and message in shown, (query, shown)
        page.wait_for_function("() => document.querySelector('#history-total')?.textContent !== '–'", timeout=15000)
        assert page.evaluate("() => window.pwned") is None


def test_every_callback_input_of_any_json_type_gets_an_answer(base: str) -> None:
    with urllib.request.urlopen(base + "history/_dash-dependencies", timeout=10) as response:
        callbacks = [c for c in orjson.loads(response.read()) if not c.get("clientside_function")]
    assert len(callbacks) == 3
    failures = []
    for callback in callbacks:
        for s in (*callback["inputs"], *callback["state"]):
            for value in (*HOSTILE, "2026-11-01'--", "²"):
                ready = "history-extent" not in callback["output"]  # the URL's callback reads the URL only before that
                values = {("history-ready", "data"): ready, (s["id"], s["property"]): value}
                status, body = post_callback(base + "history/", orjson.dumps(callback_body(callback, values)))
                if status not in (200, 204) or b"Traceback" in body:
                    failures.append((callback["output"][:60], s["id"], repr(value)[:30], status, body[:200]))
    assert not failures, failures[:10]


def test_with_no_archive_running_the_page_says_so(browser: Browser, archived: Settings, tmp_path: Path) -> None:
    log = tmp_path / "dash.log"
    process, url = start_dashboard(dataclasses.replace(archived, archive_port=free_port()), log)  # no archiver answers there
    try:
        page = browser.new_page()
        page.goto(url + URL)
        page.wait_for_function("() => document.querySelector('#history-message')?.textContent.includes('No archive is running')",
                               timeout=20000)  # fmt: skip
        assert "No archive is running" in page.inner_text("#history-extent")
        assert page.inner_text("#history-total") == "–"
    finally:
        stop_dashboard(process, log)
