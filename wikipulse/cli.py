"""Command line: `python -m wikipulse COMMAND`, and the top-level scripts users run."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from wikipulse.core.errors import OperatorError, SettingsError
from wikipulse.core.options import Options
from wikipulse.core.settings import (
    ArchiverSettings,
    ArchiveSettings,
    CountsSettings,
    DashboardSettings,
    LogSettings,
    PublisherSettings,
    RedisSettings,
    Settings,
    ShardsSettings,
    StatsSettings,
    SubscriberSettings,
    redact_url,
)

if TYPE_CHECKING:
    from wikipulse.devtools.simulate import Simulator

logger = logging.getLogger("wikipulse")
S = TypeVar("S", bound=Options)

ENV_HELP = "Every option can also be set through the environment variable named in its help; a flag wins over it."


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run_until_signal(main: Callable[[], Awaitable[Any]]) -> int:
    """Run `main` until it ends or SIGINT/SIGTERM cancels it; a signal is a clean stop (exit 0)."""

    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await main()

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        logger.info("stopped")
    return 0


def cmd_publish(settings: PublisherSettings, args: argparse.Namespace) -> int:
    from wikipulse.ingest.publisher import run_publisher

    logger.info(
        "publisher: %s -> %s (channel %r, stream %r)",
        settings.stream_url,
        redact_url(settings.redis_url),
        settings.channel,
        settings.stream,
    )
    return run_until_signal(lambda: run_publisher(settings))


def cmd_subscribe(settings: SubscriberSettings, args: argparse.Namespace) -> int:
    from wikipulse.fold.subscriber import run_subscriber

    logger.info("subscriber: %s (%s)", redact_url(settings.redis_url), settings.source)
    return run_until_signal(lambda: run_subscriber(settings))


def cmd_dash(settings: DashboardSettings, args: argparse.Namespace) -> int:
    from wikipulse.dashboard.app import serve

    serve(settings)
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from wikipulse.supervisor import Plan, run_up

    plan = Plan(settings=settings, simulate=args.simulate, replay=args.replay, rate=args.rate, data_dir=Path(args.data_dir))
    return run_until_signal(lambda: run_up(plan))


def _server_options(args: argparse.Namespace) -> Any:
    from wikipulse.devtools.eventstreams import ServerOptions

    return ServerOptions(rate=args.rate, drop_every=args.drop_every, overlap=args.overlap, malformed_every=args.malformed_every)


def cmd_replay(settings: LogSettings, args: argparse.Namespace) -> int:
    from wikipulse.devtools.eventstreams import ReplaySource, serve

    source = ReplaySource.from_file(args.file)
    return run_until_signal(lambda: serve(source, _server_options(args), args.host, args.port))


def make_simulator(args: argparse.Namespace) -> Simulator:
    """Events stamped at the rate they are served, so event time keeps pace with the clock
    (a count of them ends now; an endless feed starts a few seconds back, like the live lag)."""
    from wikipulse.devtools.simulate import FEED_LAG, LIVE_RATE, SimulatedSpike, Simulator

    rate = args.rate if args.rate > 0 else LIVE_RATE
    start = args.start if args.start is not None else time.time() - (args.count / rate if args.count else FEED_LAG)
    if not getattr(args, "spike", None):
        return Simulator(seed=args.seed, start=start, rate=rate)
    domain, _, after = args.spike.partition("@")
    try:
        return Simulator(seed=args.seed, start=start, rate=rate, spike=SimulatedSpike(domain, start + float(after or 60)))
    except ValueError as exc:  # an unknown wiki or a malformed SECONDS
        raise SettingsError(f"--spike {args.spike!r}: {exc}") from None


def cmd_simulate(settings: LogSettings, args: argparse.Namespace) -> int:
    from wikipulse.devtools.eventstreams import SimulatedSource, serve

    count = args.count
    sim = make_simulator(args)
    if args.out:
        if count is None:
            raise SettingsError("simulate --out needs --count")
        with open(args.out, "wb") as out:
            for i in range(count):
                out.write(orjson.dumps(sim.event(i)) + b"\n")
        return 0
    live = args.start is None  # a resumed feed stays live (never stamped ahead of the clock), unless a --start was given
    source = SimulatedSource(sim, count, live)
    return run_until_signal(lambda: serve(source, _server_options(args), args.host, args.port))


def cmd_counts(settings: CountsSettings, args: argparse.Namespace) -> int:
    from wikipulse.queries import counts

    result = asyncio.run(counts(settings, args.domain, args.resolution, args.since, args.until, args.by))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode() + "\n")
    return 0


def cmd_archive(settings: ArchiverSettings, args: argparse.Namespace) -> int:
    from wikipulse.archive.archiver import run_archiver

    archive = redact_url(settings.clickhouse_url) or settings.archive_dir
    logger.info("archiver: %s -> %s", redact_url(settings.redis_url), archive)
    return run_until_signal(lambda: run_archiver(settings))


def cmd_sql(settings: ArchiveSettings, args: argparse.Namespace) -> int:
    from wikipulse.archive.reader import archive_query

    sys.stdout.buffer.write(archive_query(settings, args.statement))
    return 0


def cmd_history(settings: ArchiveSettings, args: argparse.Namespace) -> int:
    from wikipulse.queries import history

    sys.stdout.buffer.write(history(settings, args.domain, args.since, args.until))
    return 0


def cmd_stats(settings: StatsSettings, args: argparse.Namespace) -> int:
    from wikipulse.queries import stats

    sys.stdout.write(orjson.dumps(asyncio.run(stats(settings)), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_trending(settings: RedisSettings, args: argparse.Namespace) -> int:
    from wikipulse.queries import trending

    who = "humans" if args.humans else "bots" if args.bots else "all"
    result = asyncio.run(trending(settings, args.domain, args.minutes, args.limit, who, args.namespace))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_new_pages(settings: RedisSettings, args: argparse.Namespace) -> int:
    from wikipulse.queries import new_pages

    result = asyncio.run(new_pages(settings, args.domain, args.limit, args.humans, args.namespace))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_shards(settings: ShardsSettings, args: argparse.Namespace) -> int:
    from wikipulse.store import keys
    from wikipulse.store.connect import open_client
    from wikipulse.store.shards import change_shards

    async def run() -> dict[str, Any]:
        client, layout = await open_client(settings)
        async with client:
            if args.set is None:
                raw = await client.get(keys.SHARDS_RECORD)
                return {"shards": None if raw is None else int(raw)}
            if args.set < 1:
                raise SettingsError(f"--set {args.set}: at least 1")
            return (await change_shards(client, settings, args.set, layout.cluster)).as_json()

    sys.stdout.write(orjson.dumps(asyncio.run(run()), option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_route(settings: RedisSettings, args: argparse.Namespace) -> int:
    from wikipulse.ingest.routes import route_command

    result = asyncio.run(route_command(settings, args.route_command, args.name, args.where, args.from_stream))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _add_route_parser(sub: Any) -> None:
    """`route add NAME --where FIELD=V1,V2 [--where ...] [--from-stream]`, `route list`, `route remove NAME` (routes.py)."""
    route = sub.add_parser("route", help="declare, list or remove routes: named slices of the feed, each a stream and a channel")
    actions = route.add_subparsers(dest="route_command", required=True, metavar="ACTION")
    for action, text in (
        ("add", "declare a route: wiki:route:NAME, a stream and a channel of the events its --where hold for"),
        ("list", "print the routes and their counters as JSON"),
        ("remove", "remove a route, its stream and its counters"),
    ):
        p = actions.add_parser(action, help=text, description=text, epilog=ENV_HELP)
        RedisSettings.add_arguments(p)
        p.set_defaults(func=cmd_route, settings_class=RedisSettings, name=None, where=[], from_stream=False)
        if action != "list":
            p.add_argument("name", help="1-40 of a-z, 0-9, - and _")
        if action == "add":
            where = "FIELD: domain, type, bot or namespace; its values are alternatives, several --where must all hold"
            p.add_argument("--where", action="append", default=[], metavar="FIELD=V1,V2", help=where)
            p.add_argument("--from-stream", action="store_true", help="fill the route from what the stream still holds (else: from now)")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port (default 8090)")
    p.add_argument("--rate", type=float, default=35.0, help="events/s, 0 = as fast as the client reads (default 35)")
    p.add_argument("--drop-every", type=int, default=0, help="fault injection: close the connection after N events")
    p.add_argument("--overlap", type=int, default=0, help="fault injection: re-deliver N events before the resume point")
    p.add_argument("--malformed-every", type=int, default=0, help="fault injection: a malformed frame after every N events")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wikipulse", description="The live pulse of the Wikimedia wikis, through Redis.", epilog=ENV_HELP
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[S, argparse.Namespace], int], help: str, settings: type[S]) -> argparse.ArgumentParser:
        """A command whose flags are its role's settings (`settings`): what the role reads, no more."""
        p = sub.add_parser(name, help=help, description=help, epilog=ENV_HELP)
        settings.add_arguments(p)
        p.set_defaults(func=func, settings_class=settings)
        return p

    command("publish", cmd_publish, "read the EventStreams feed and republish every event to Redis", PublisherSettings)
    command("subscribe", cmd_subscribe, "fold events into per-domain time series in Redis", SubscriberSettings)
    command("dash", cmd_dash, "serve the live dashboard", DashboardSettings)
    command("archive", cmd_archive, "archive every event in ClickHouse, acknowledged after ClickHouse's receipt", ArchiverSettings)
    up = command("up", cmd_up, "run everything (Redis included, if none answers) as one supervised group", Settings)
    feed = up.add_mutually_exclusive_group()
    feed.add_argument("--simulate", action="store_true", help="feed the pipeline from a local simulated EventStreams server")
    feed.add_argument("--replay", metavar="FILE", help="feed the pipeline from a local server replaying FILE (JSON lines or .sse)")
    up.add_argument("--rate", type=float, default=35.0, help="events/s of --simulate/--replay (default 35, 0 = max)")
    up.add_argument("--data-dir", default=".wikipulse", help="where the embedded Redis keeps its data (default .wikipulse)")

    replay = sub.add_parser("replay", help="serve FILE (JSON lines or an .sse capture) as a local EventStreams server")
    replay.add_argument("file")
    _add_server_args(replay)
    LogSettings.add_arguments(replay)
    replay.set_defaults(func=cmd_replay, settings_class=LogSettings)

    simulate = sub.add_parser("simulate", help="serve simulated events as a local EventStreams server, or write them with --out")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    simulate.add_argument("--count", type=int, default=None, help="events to generate (default: endless)")
    simulate.add_argument(
        "--start", type=float, default=None, help="unix time of the first event (default: now, or count/rate s ago with --count)"
    )
    simulate.add_argument("--out", help="write --count events as JSON lines to this file instead of serving")
    simulate.add_argument(
        "--spike",
        metavar="DOMAIN[@SECONDS]",
        help="inject a spike: DOMAIN at 20x its rate for 2 minutes, SECONDS after the first event (default 60)",
    )
    _add_server_args(simulate)
    LogSettings.add_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate, settings_class=LogSettings)

    counts = command("counts", cmd_counts, "print a domain's counts as JSON {bucket_start: count}", CountsSettings)
    counts.add_argument("domain", help="e.g. en.wikipedia.org, or _all for every domain together")
    counts.add_argument("--resolution", default="1m", choices=("10s", "1m", "1h"))
    counts.add_argument("--since", help="start: unix seconds or ISO date (default: one hour of buckets back)")
    counts.add_argument("--until", help="end: unix seconds or ISO date (default now)")
    counts.add_argument("--by", choices=("type", "bot"), help="break down by event type or bot/human")

    trend = command("trending", cmd_trending, "print the most-edited pages now as JSON", RedisSettings)
    trend.add_argument("--domain", help="one wiki, e.g. en.wikipedia.org (default: every wiki)")
    trend.add_argument("--minutes", type=int, default=5, help="over the last 5 or 60 minutes (default 5)")
    trend.add_argument("--limit", type=int, default=10, help="how many pages (default 10)")
    who = trend.add_mutually_exclusive_group()
    who.add_argument("--humans", action="store_true", help="edits by humans only (bots left out)")
    who.add_argument("--bots", action="store_true", help="edits by bots only")
    trend.add_argument("--namespace", help="namespaces, e.g. 0 or 0,1 (default: all)")
    new = command("new-pages", cmd_new_pages, "print the newest page creations as JSON, newest first", RedisSettings)
    new.add_argument("--domain", help="one wiki (default: every wiki)")
    new.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    new.add_argument("--humans", action="store_true", help="created by humans only")
    new.add_argument("--namespace", default="0", help="namespaces, e.g. 0,2, or all (default 0: articles)")

    command("stats", cmd_stats, "print the pipeline's counters as JSON", StatsSettings)
    shards = command(
        "shards",
        cmd_shards,
        "print the deployment's shard count recorded in Redis; --set N changes it, every process stopped (README: Changing SHARDS)",
        ShardsSettings,
    )
    shards.add_argument("--set", type=int, metavar="N", help="record N shards: the fold starts again from what the ingest stream holds")

    _add_route_parser(sub)

    sql = command("sql", cmd_sql, "query the archive (read-only): rows as JSON lines", ArchiveSettings)
    sql.add_argument(
        "statement", help='one SELECT, WITH, SHOW, DESCRIBE or EXPLAIN, e.g. "SELECT domain, count() FROM events GROUP BY domain"'
    )
    hist = command("history", cmd_history, "events a day for a domain, from the archive, as JSON lines", ArchiveSettings)
    hist.add_argument("domain", help="e.g. de.wikipedia.org, or _all for every domain")
    hist.add_argument("--since", help="start: unix seconds or ISO date (default: 30 days back)")
    hist.add_argument("--until", help="end: unix seconds or ISO date (default now)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings: LogSettings = args.settings_class.from_args(args)
    except SettingsError as exc:
        parser.error(str(exc))
    setup_logging(settings.log_level)
    from redis.exceptions import RedisError

    try:
        return int(args.func(settings, args))
    except SettingsError as exc:
        parser.error(str(exc))
    except OperatorError as exc:
        sys.stderr.write(f"{parser.prog} {args.command}: error: {exc}\n")
    except RedisError as exc:  # the one-shot commands (counts, stats): the long-running ones retry
        where = redact_url(settings.redis_url) if isinstance(settings, RedisSettings) else "?"
        sys.stderr.write(f"{parser.prog} {args.command}: error: Redis at {where}: {type(exc).__name__}: {exc}\n")
    except OSError as exc:  # not Redis's (redis-py raises its own errors for its connections): a file, a socket elsewhere
        sys.stderr.write(f"{parser.prog} {args.command}: error: {type(exc).__name__}: {exc}\n")
    return 1


def script(command: str) -> None:
    """Entry of the top-level scripts: `./publisher.py ARGS` is `python -m wikipulse publish ARGS`."""
    sys.exit(main([command, *sys.argv[1:]]))
