"""End to end: `up --simulate` as a user runs it, against its own embedded Redis."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import orjson
import psutil
import redis

from tests.helpers import up_running


def test_up_simulate_reaches_the_counters_and_stops_cleanly(tmp_path: Path) -> None:
    with up_running(tmp_path, rate=200, log_level="INFO") as up:
        assert f"http://127.0.0.1:{up.dash_port}/" in up.banner
        children = psutil.Process(up.process.pid).children(recursive=True)
        assert len(children) >= 6  # redis-server, feed, publisher, subscriber, archiver, dashboard
        client = redis.Redis.from_url(up.redis_url)
        wait_for_count(client, "wp:subscriber:stats", "folded", 50, 10)
        assert any(k.startswith(b"wp:ts:{") for k in client.scan_iter("wp:ts:*"))
        with urllib.request.urlopen(f"http://127.0.0.1:{up.dash_port}/", timeout=10) as page:
            assert page.status == 200 and b"wikipulse" in page.read()
        # The archiver keeps every event in the embedded ClickHouse beside Redis's data, and answers queries.
        archived = wait_for_count(client, "wp:archiver:stats", "archived", 50, 30)
        query = urllib.request.Request(f"http://127.0.0.1:{up.archive_port}/query", data=b"SELECT count() AS n FROM events", method="POST")
        with urllib.request.urlopen(query, timeout=30) as answer:
            assert orjson.loads(answer.read())["n"] >= archived
        assert (tmp_path / "clickhouse").is_dir()
        client.close()
        assert (tmp_path / "redis" / "appendonly.aof").exists() or (tmp_path / "redis" / "appendonlydir").exists()
        up.process.send_signal(signal.SIGINT)
        assert up.process.wait(30) == 0
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], "orphans left behind"


def wait_for_count(client: redis.Redis, key: str, counter: str, n: int, timeout: float) -> int:
    """The counter once it reached n, within timeout seconds."""
    deadline = time.monotonic() + timeout
    while (value := int(client.hget(key, counter) or 0)) < n:
        assert time.monotonic() < deadline, f"{key} {counter} did not reach {n} within {timeout} s"
        time.sleep(0.2)
    return value


def test_a_second_up_in_the_same_folder_is_refused_with_one_line_naming_the_first(tmp_path: Path) -> None:
    """Before: the second printed the first's URL as its own, its dashboard failed to bind, and it ran on, with no
    Redis and a crash-looping publisher, once the first stopped."""
    with up_running(tmp_path, rate=100, log_level="WARNING", stderr=subprocess.DEVNULL) as first:
        second = subprocess.run(first.command, env=first.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert second.returncode == 1
        assert second.stdout == ""  # no URL of its own
        lines = second.stderr.splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.process.pid}" in lines[0] and f"http://127.0.0.1:{first.dash_port}/" in lines[0] and "another `up`" in lines[0]
        # The first runs on untouched, and stops cleanly.
        client = redis.Redis.from_url(first.redis_url)
        folded = wait_for_count(client, "wp:subscriber:stats", "folded", 1, 20)
        wait_for_count(client, "wp:subscriber:stats", "folded", folded + 50, 20)
        client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{first.dash_port}/", timeout=10) as page:
            assert page.status == 200
        first.process.send_signal(signal.SIGINT)
        assert first.process.wait(30) == 0
