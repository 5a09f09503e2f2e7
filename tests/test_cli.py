"""The command line as an operator uses it, against a real Redis: bounded queries, one clear line for every mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from wikipulse.core import model
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.store import keys


def wikipulse(*args: str, redis_url: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RETENTION")}
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return subprocess.run([sys.executable, "-m", "wikipulse", *args], env=env, capture_output=True, text=True, timeout=timeout)


def one_clear_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    for word in words:
        assert word in error_lines[0], result.stderr


async def test_counts_since_the_epoch_is_bounded_by_retention(redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    await redis_client.hset(keys.series_key("en.wikipedia.org", model.RESOLUTION_BY_NAME["10s"], 0), "0", 1)  # 1970: long expired
    result = wikipulse("counts", "en.wikipedia.org", "--since", "0", "--resolution", "10s", redis_url=redis_server.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{}"  # nothing older than the 6 h retention is read (it was 9.5 million buckets)


def test_a_range_over_the_bucket_cap_is_a_clear_error(redis_server: RedisServer) -> None:
    args = ("counts", "en.wikipedia.org", "--since", "0", "--resolution", "10s", "--retention", "10s=400d")
    result = wikipulse(*args, redis_url=redis_server.url)
    one_clear_line(result, "buckets", "coarser")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("counts", "en.wikipedia.org", "--since", "-5"), ("before 1970",)),
        (("counts", "en.wikipedia.org", "--since", "2030-01-01", "--until", "2029-01-01"), ("after",)),
        (("counts", "en.wikipedia.org", "--since", "yesterday"), ("not a time",)),
        (("counts", "en.wikipedia.org", "--redis-url", "http://example.org"), ("not a Redis URL",)),
        (("counts", "en.wikipedia.org", "--redis-url", "redis://:secret@127.0.0.1:notaport"), ("not a Redis URL",)),
        (("stats", "--redis-url", "redis:///"), ("not a Redis URL",)),
        (("publish", "--batch-size", "0"), ("batch_size",)),
        (("subscribe", "--claim-idle", "-1"), ("claim_idle",)),
        (("dash", "--port", "70000"), ("port",)),
        (("sql", "SELECT 1", "--clickhouse-url", "notaurl"), ("not a ClickHouse URL: notaurl",)),  # was: localhost, silently
        (("sql", "SELECT 1", "--clickhouse-url", "http://u:secret@:8123/db"), ("not a ClickHouse URL",)),
        (("sql", "SELECT 1", "--clickhouse-url", "clickhouse://u:secret@host"), ("not a ClickHouse URL",)),
    ],
)
def test_bad_arguments_are_one_clear_line(args: tuple[str, ...], words: tuple[str, ...]) -> None:
    result = wikipulse(*args, redis_url="redis://127.0.0.1:1/0")
    one_clear_line(result, *words)
    assert result.returncode == 2
    assert "secret" not in result.stderr


@pytest.mark.parametrize("command", [("counts", "en.wikipedia.org"), ("stats",)])
def test_redis_down_is_one_clear_line(command: tuple[str, ...]) -> None:
    result = wikipulse(*command, redis_url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    one_clear_line(result, "Redis at redis://:***@127.0.0.1")
    assert result.returncode == 1
    assert "secret" not in result.stderr


async def test_stats_names_a_missing_stream_or_group(redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    one_clear_line(wikipulse("stats", "--stream", "nope", redis_url=redis_server.url), "no stream 'nope'")
    await redis_client.xgroup_create("wiki:events", "wikipulse", id="0", mkstream=True)
    one_clear_line(wikipulse("stats", "--group", "nope", redis_url=redis_server.url), "no consumer group 'nope'", "wikipulse")
    assert wikipulse("stats", redis_url=redis_server.url).returncode == 0


async def test_publisher_refuses_an_evicting_redis_in_one_line(redis_client: aioredis.Redis, redis_server: RedisServer) -> None:
    await redis_client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        result = wikipulse("publish", "--url", f"http://127.0.0.1:{free_port()}/v2/stream/recentchange", redis_url=redis_server.url)
        one_clear_line(result, "maxmemory-policy allkeys-lru", "--allow-eviction")
        assert result.returncode == 1
    finally:
        await redis_client.config_set("maxmemory-policy", "noeviction")


def test_an_archive_directory_that_is_a_file_is_named_not_blamed_on_redis(tmp_path: Path) -> None:
    """It was "Redis at redis://…: FileExistsError"."""
    (tmp_path / "archive").write_text("")
    result = wikipulse("sql", "SELECT 1", "--archive-dir", str(tmp_path / "archive"), "--archive-port", str(free_port()))
    one_clear_line(result, "FileExistsError", str(tmp_path / "archive"))
    assert result.returncode == 1 and "Redis" not in result.stderr


def test_a_slow_archiver_is_named_not_blamed_on_redis(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An archiver that takes longer than `sql` waits: it was "Redis at redis://…: TimeoutError: timed out"."""
    from wikipulse import cli
    from wikipulse.archive import reader

    monkeypatch.setattr(reader, "ARCHIVER_TIMEOUT", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel's backlog), never answers
        port = silent.getsockname()[1]
        assert cli.main(["sql", "SELECT 1", "--archive-port", str(port)]) == 1
    error = capsys.readouterr().err
    said = f"python -m wikipulse sql: error: the archiver on 127.0.0.1:{port} did not answer within 0.5 s (a slow query?)"
    assert error.splitlines() == [said]


@pytest.mark.parametrize(
    "args",
    [
        ("dash", "--channel", "x"),  # the dashboard reads no pub/sub channel: it was accepted, and ignored
        ("history", "_all", "--redis-url", "redis://127.0.0.1:1/0"),  # the archive's, not Redis's: it was ignored
        ("sql", "SELECT 1", "--shards", "2"),
        ("archive", "--source", "pubsub"),  # the subscriber's
        ("publish", "--clickhouse-url", "http://h:8123"),  # the archiver's
    ],
)
def test_a_flag_the_role_does_not_use_is_refused(args: tuple[str, ...]) -> None:
    """Each command takes its role's settings only (settings.py): argparse's own error, before anything runs."""
    result = wikipulse(*args, timeout=15)
    assert result.returncode == 2, result
    assert f"unrecognized arguments: {' '.join(args[-2:])}" in result.stderr


def test_history_honours_its_archive_flags() -> None:
    result = wikipulse("history", "_all", "--clickhouse-url", "notaurl")
    one_clear_line(result, "not a ClickHouse URL: notaurl")
    assert result.returncode == 2


@pytest.mark.parametrize("command", [("counts", "en.wikipedia.org"), ("stats",), ("trending",), ("new-pages",)])
async def test_queries_read_a_sharded_deployment_with_cluster_and_shards(
    redis_client: aioredis.Redis, redis_server: RedisServer, command: tuple[str, ...]
) -> None:
    """The query commands take --cluster and --shards: a deployment of SHARDS=2 is read with --shards 2 (without
    it, refused in one line), with the cluster question answered by --cluster off instead of asked."""
    await redis_client.set(keys.SHARDS_RECORD, 2)
    shard = keys.Layout("wiki:events", 2, cluster=False).all_shards[0]  # stats reads shard 0's fold group
    await redis_client.xgroup_create(shard.stream, "wikipulse", id="0", mkstream=True)
    await redis_client.xadd("wiki:events", {"raw": "{}"})
    refused = wikipulse(*command, redis_url=redis_server.url)
    one_clear_line(refused, "SHARDS=2")
    result = wikipulse(*command, "--cluster", "off", "--shards", "2", redis_url=redis_server.url)
    assert result.returncode == 0, result.stderr
