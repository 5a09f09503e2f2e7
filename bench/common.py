"""Shared by the benchmarks: a real redis-server and a local EventStreams server in its own process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import RedisServer, free_port
from wikipulse.devtools.simulate import Simulator


def write_events(path: Path, count: int, seed: int = 1, start: float | None = None) -> None:
    sim = Simulator(seed=seed, start=time.time() - count / 35 if start is None else start, canary_every=0)
    with path.open("wb") as out:
        for i in range(count):
            out.write(orjson.dumps(sim.event(i)) + b"\n")


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp), appendonly=False) as server:
        yield server


@contextlib.contextmanager
def replay_server(path: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "wikipulse", "replay", str(path), "--rate", "0", "--port", str(port)]
    process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}{PATH}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with contextlib.closing(__import__("socket").create_connection(("127.0.0.1", port), 1)):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the replay server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait()


def report(title: str, rows: list[tuple[str, float, str]]) -> None:
    """rows: (name, value, unit); the first row is the baseline the ratios are against."""
    base = rows[0][1]
    print(f"\n{title}")
    print("| variant | result | vs baseline |")
    print("|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:,.0f} {unit} | {value / base:.1f}× |")
