"""`up`: Redis (embedded when none answers), the feed, publisher, subscriber, archiver and dashboard as one group.

A child that dies is restarted with backoff; SIGINT/SIGTERM stops every child
(SIGTERM, then SIGKILL after a grace period) and the embedded Redis, and exits 0.
Children also get SIGTERM if the supervisor itself is killed (Linux PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from wikipulse.eventstreams import PATH
from wikipulse.redis_server import RedisServer, answers, free_port, is_local
from wikipulse.retry import backoff_delay
from wikipulse.settings import Settings, SettingsError, redact_url

logger = logging.getLogger(__name__)

GRACE = 10.0  # seconds a child gets to stop after SIGTERM
STABLE = 30.0  # a child that ran this long gets its restart backoff reset


@dataclass(frozen=True)
class Plan:
    settings: Settings
    simulate: bool = False
    replay: str | None = None
    rate: float = 35.0
    data_dir: Path = Path(".wikipulse")


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name, self.args, self.env = name, args, env
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wikipulse", *self.args, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )  # fmt: skip
        logger.info("started %s (pid %d)", self.name, self.process.pid)

    async def supervise(self) -> None:
        """Keep the child running; restart it with backoff when it exits."""
        attempt = 0
        while True:
            started = time.monotonic()
            await self.start()
            assert self.process is not None
            code = await self.process.wait()
            attempt = 0 if time.monotonic() - started > STABLE else attempt + 1
            delay = backoff_delay(attempt, 30.0, base=1.0)
            self.restarts += 1
            logger.error("%s exited with %s; restarting in %.1fs", self.name, code, delay)
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), GRACE)
        except TimeoutError:
            logger.warning("%s did not stop within %ss; killing it", self.name, GRACE)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def feed_args(plan: Plan, port: int) -> list[str] | None:
    common = ["--port", str(port), "--rate", str(plan.rate)]
    if plan.simulate:
        return ["simulate", *common]
    if plan.replay:
        if not Path(plan.replay).is_file():
            raise SettingsError(f"--replay: no such file: {plan.replay}")
        return ["replay", plan.replay, *common]
    return None


async def start_redis(plan: Plan) -> RedisServer | None:
    url = plan.settings.redis_url
    if await asyncio.to_thread(answers, url):
        logger.info("using the Redis at %s", redact_url(url))
        return None
    if not is_local(url):
        raise SettingsError(f"no Redis answers at {redact_url(url)}, and it is not local, so none is started there")
    parts = urlsplit(url)
    server = RedisServer(plan.data_dir / "redis", port=parts.port or 6379, password=parts.password)
    await asyncio.to_thread(server.start)
    logger.info("started the embedded Redis on port %d (AOF in %s); `pipenv run redis-cli -p %d subscribe wiki` shows the raw events",
                server.port, server.data_dir, server.port)  # fmt: skip
    return server


async def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def run_up(plan: Plan) -> None:
    settings = plan.settings
    redis_server = await start_redis(plan)
    children: list[Child] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        feed_port = free_port()
        args = feed_args(plan, feed_port)
        if args is not None:
            settings = replace(settings, stream_url=f"http://127.0.0.1:{feed_port}{PATH}")
        if settings.archive_dir == Settings().archive_dir and not settings.clickhouse_url:
            settings = replace(settings, archive_dir=str(plan.data_dir / "clickhouse"))  # beside the embedded Redis's data
        env = {**_base_env(), **settings.to_env()}
        if args is not None:
            children.append(Child("feed", args, env))
        children += [Child("publisher", ["publish"], env), Child("subscriber", ["subscribe"], env), Child("archiver", ["archive"], env),
                     Child("dashboard", ["dash"], env)]  # fmt: skip
        for child in children:
            tasks.append(asyncio.create_task(child.supervise(), name=child.name))
            if child.name == "feed":
                await wait_for_port(feed_port)
        await wait_for_port(settings.port, 60.0)
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
        print(
            f"wikipulse is up: dashboard at http://{host}:{settings.port}/  (feed: {settings.stream_url}; Ctrl-C stops everything)",
            flush=True,
        )
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in reversed(children)))
        if redis_server is not None:
            await asyncio.to_thread(redis_server.stop)
        logger.info("everything stopped")


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)
