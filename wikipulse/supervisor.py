"""`up`: Redis (embedded when none answers), the feed, publisher, subscriber, archiver and dashboard as one group.

A child that dies is restarted with backoff; SIGINT/SIGTERM stops every child
(SIGTERM, then SIGKILL after a grace period) and the embedded Redis, and exits 0.
Children also get SIGTERM if the supervisor itself is killed (Linux PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.settings import Settings, redact_url
from wikipulse.core.tasks import together
from wikipulse.devtools.eventstreams import PATH
from wikipulse.devtools.redis_server import RedisServer, answers, free_port, is_local
from wikipulse.store.connect import open_client
from wikipulse.store.retry import backoff_delay
from wikipulse.store.shards import check_shards

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


class FolderLock:
    """One `up` per folder. A second `up` in the same folder would find the first's Redis answering, print the first's
    URL as its own, fail to bind the dashboard's port and, once the first stops, run on with no Redis. The live `up`
    holds an exclusive flock on DATA_DIR/up.lock (the kernel lets go when the process dies, however it dies) and
    writes its pid and URL into it, so that the second can say who holds the folder."""

    NAME = "up.lock"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or OperatorError naming the `up` that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").split() or ["?"]
            os.close(fd)
            where = f", dashboard at {holder[1]}" if len(holder) > 1 else ", still starting"
            raise OperatorError(
                f"another `up` runs in {self.path.parent} (pid {holder[0]}{where}): use that one, stop it first, "
                "or give this one another --data-dir"
            ) from None
        self.fd = fd
        self.note()

    def note(self, url: str = "") -> None:
        """What a second `up` is told: this process's pid and, once it is up, its dashboard's URL."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {url}".strip().encode() + b"\n", 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with it; the file stays (removing it would race a third `up`)
            self.fd = None


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


async def check_shards_of(settings: Settings) -> None:
    """Refuse here, in one line, a shard count the Redis does not hold: else every child would refuse and be restarted."""
    client, _ = await open_client(settings)
    async with client:
        await check_shards(client, settings)


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
    lock = FolderLock(plan.data_dir)
    lock.acquire()
    try:
        await _run_up(plan, lock)
    finally:
        lock.release()


async def _run_up(plan: Plan, lock: FolderLock) -> None:
    settings = plan.settings
    redis_server = await start_redis(plan)
    children: list[Child] = []
    try:
        await check_shards_of(settings)
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
        # One group: a supervisor that fails stops the others and the start-up (not found only once it is over), and
        # a start-up that fails stops the supervisors; the error is raised once every one has stopped.
        async with together() as group:
            for child in children:
                group.create_task(child.supervise(), name=child.name)
                if child.name == "feed":
                    await wait_for_port(feed_port)
            await wait_for_port(settings.port, 60.0)
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
            lock.note(f"http://{host}:{settings.port}/")
            print(
                f"wikipulse is up: dashboard at http://{host}:{settings.port}/  (feed: {settings.stream_url}; Ctrl-C stops everything)",
                flush=True,
            )
    finally:
        # Stopping is not a group: every child is stopped, whatever another's stop raised.
        await asyncio.gather(*(c.stop() for c in reversed(children)), return_exceptions=True)
        if redis_server is not None:
            await asyncio.to_thread(redis_server.stop)
        logger.info("everything stopped")


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)
