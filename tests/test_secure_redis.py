"""A password-protected Redis through REDIS_URL, end to end, with the password kept out of every log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.conftest import CALIBRATED
from wikipulse.eventstreams import PATH
from wikipulse.redis_server import RedisServer, free_port

PASSWORD = "pw-Xq7!kT2#redis"  # distinctive, so any leak into a log is found


def test_publisher_and_subscriber_work_through_a_password_url_that_never_reaches_the_logs(tmp_path: Path) -> None:
    lines = CALIBRATED.read_bytes().splitlines()[:2000]
    expected = sum(1 for line in lines if b'"domain":"canary"' not in line)
    feed_file = tmp_path / "events.ndjson"
    feed_file.write_bytes(b"\n".join(lines) + b"\n")
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    (tmp_path / "redis").mkdir(exist_ok=True)
    feed_port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": server.url,
        "WIKI_STREAM_URL": f"http://127.0.0.1:{feed_port}{PATH}",
        "LOG_LEVEL": "DEBUG",  # the most a user could ask to see
        "STATS_INTERVAL": "0.5",
        "CONSUMER_NAME": "secure-test",
    }
    assert quote(PASSWORD, safe="") in env["REDIS_URL"]  # '#' and '!' percent-encoded, as a URL needs
    logs = {name: tmp_path / f"{name}.log" for name in ("feed", "publisher", "subscriber", "stats")}
    commands = {
        "feed": [sys.executable, "-m", "wikipulse", "replay", str(feed_file), "--rate", "0", "--port", str(feed_port)],
        "publisher": [sys.executable, "publisher.py"],
        "subscriber": [sys.executable, "subscriber.py"],
    }
    processes = {}
    try:
        for name, cmd in commands.items():
            with logs[name].open("wb") as log:
                processes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with pytest.raises(redis.AuthenticationError):  # the server really demands the password
            redis.Redis(port=server.port).ping()
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 60
        while int(client.hget("wp:subscriber:stats", "folded") or 0) < expected:
            assert time.monotonic() < deadline, "the events did not reach the counters"
            assert all(p.poll() is None for p in processes.values()), "a process died"
            time.sleep(0.2)
        assert int(client.hget("wp:publisher:stats", "published") or 0) == expected
        with logs["stats"].open("wb") as log:
            assert subprocess.run([sys.executable, "-m", "wikipulse", "stats"], env=env, stdout=log, stderr=log, timeout=60).returncode == 0
        assert b'"folded"' in logs["stats"].read_bytes()
        client.close()
    finally:
        for p in processes.values():
            p.send_signal(signal.SIGTERM)
        codes = {name: p.wait(30) for name, p in processes.items()}
        server.stop()
    assert codes["publisher"] == 0 and codes["subscriber"] == 0
    assert b"published" in logs["publisher"].read_bytes()  # the logs are there, and DEBUG-verbose
    for name, path in logs.items():
        text = path.read_bytes()
        for form in (PASSWORD, quote(PASSWORD, safe=""), PASSWORD[:8]):
            assert form.encode() not in text, f"the password leaked into the {name} log"
    assert b"redis://:***@127.0.0.1" in logs["publisher"].read_bytes()  # the URL is logged redacted
