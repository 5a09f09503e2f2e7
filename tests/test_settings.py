from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path

import pytest

import wikipulse
from wikipulse.cli import build_parser
from wikipulse.core.errors import SettingsError
from wikipulse.core.options import Options
from wikipulse.core.settings import (
    LIVE_STREAM_URL,
    READ_BATCH_FACTOR,
    ArchiverSettings,
    DashboardSettings,
    PublisherSettings,
    Settings,
    SubscriberSettings,
    parse_duration,
    redact_url,
)


def test_defaults() -> None:
    s = Settings.from_args(environ={})
    assert (s.redis_url, s.stream_url, s.channel) == ("redis://127.0.0.1:6379/0", LIVE_STREAM_URL, "wiki")
    assert (s.host, s.port) == ("127.0.0.1", 8050)  # the dashboard is not reachable from other hosts by default
    assert s.retention_seconds() == {"10s": 6 * 3600, "1m": 7 * 86400, "1h": 400 * 86400}


def test_flag_beats_env_beats_default() -> None:
    args = argparse.Namespace(channel="from-flag", redis_url=None)
    s = Settings.from_args(args, environ={"PUBSUB_CHANNEL": "from-env", "REDIS_URL": "redis://h:1/2", "BATCH_SIZE": "7"})
    assert (s.channel, s.redis_url, s.batch_size) == ("from-flag", "redis://h:1/2", 7)


@pytest.mark.parametrize(
    "env", [{"BATCH_SIZE": "many"}, {"SUBSCRIBER_SOURCE": "kafka"}, {"RETENTION": "2s=1h"}, {"WIKI_RESET_POSITION": "maybe"}]
)
def test_bad_values_are_clear_errors(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_args(environ=env)


def test_durations_and_retention() -> None:
    assert parse_duration("6h") == 21600 and parse_duration("90") == 90
    assert Settings.from_args(environ={"RETENTION": "10s=1m"}).retention_seconds()["10s"] == 60


def test_password_is_redacted() -> None:
    assert redact_url("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_help_shows_env_names_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["publish", "--help"])
    out = capsys.readouterr().out
    for text in ("REDIS_URL", "WIKI_STREAM_URL", "PUBSUB_CHANNEL", "redis://127.0.0.1:6379/0", "'wiki'"):
        assert text in out


# ---- each command's flags are its role's settings, and its role reads every one of them ----

# The module each command's role starts from (the settings reach the rest of the role through its imports);
# `up`'s are every role's (test_commands_take_only_the_flags_they_use).
ROLE_ENTRY = {
    "publish": "wikipulse.ingest.publisher", "subscribe": "wikipulse.fold.subscriber", "archive": "wikipulse.archive.archiver",
    "dash": "wikipulse.dashboard.app", "counts": "wikipulse.queries", "stats": "wikipulse.queries",
    "trending": "wikipulse.queries", "new-pages": "wikipulse.queries", "history": "wikipulse.queries", "sql": "wikipulse.archive.reader",
    "shards": "wikipulse.store.shards", "route": "wikipulse.ingest.routes", "replay": "wikipulse.devtools.eventstreams",
    "simulate": "wikipulse.devtools.eventstreams",
}  # fmt: skip
SETTINGS_MODULES = ("wikipulse.core.settings", "wikipulse.core.options", "wikipulse.core.checks")


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (`route`'s actions each as route)."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
        for name, sub in action.choices.items():  # type: ignore[union-attr]
            nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
            out[name] = next(iter(nested[0].choices.values())) if nested else sub
    return out


def settings_flags(parser: argparse.ArgumentParser) -> tuple[type[Options], set[str]]:
    """The command's settings class, and the flags of the parser that are settings (dest is a field of it)."""
    cls: type[Options] = parser.get_default("settings_class")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls, {s for a in parser._actions if a.dest in names for s in a.option_strings if s.startswith("--")}


def module_file(name: str) -> Path | None:
    base = Path(wikipulse.__file__).parent.parent / name.replace(".", "/")
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def closure(entry: str) -> set[str]:
    """The wikipulse modules `entry` imports, at module level or in a function, directly or not."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wikipulse"):
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return {m for m in seen if m.startswith("wikipulse")}


def is_settings(node: ast.expr) -> bool:
    """`settings`, `self.settings` or the roles' short alias `s` (s = self.settings)."""
    if isinstance(node, ast.Name):
        return node.id in ("settings", "s")
    return isinstance(node, ast.Attribute) and node.attr == "settings"


def attributes_read(modules: set[str]) -> set[str]:
    """Every `settings.name` read in these modules, and the fields read by the settings' methods they call."""
    read = {
        node.attr
        for m in modules - set(SETTINGS_MODULES)
        for node in ast.walk(ast.parse(module_file(m).read_text()))  # type: ignore[union-attr]
        if isinstance(node, ast.Attribute) and is_settings(node.value)
    }
    derived: dict[str, set[str]] = {}  # method -> the fields it reads (shard_indexes -> shard, shards)
    for node in ast.walk(ast.parse(module_file("wikipulse.core.settings").read_text())):  # type: ignore[union-attr]
        if isinstance(node, ast.FunctionDef):
            derived[node.name] = {a.attr for a in ast.walk(node) if isinstance(a, ast.Attribute)}
    return read | {f for method in read & derived.keys() for f in derived[method]} | {"log_level"}  # cli.main's, for all


def test_each_commands_flags_are_its_settings_class() -> None:
    for name, parser in commands().items():
        cls, flags = settings_flags(parser)
        assert flags == set(cls.flags()), name


@pytest.mark.parametrize("command", sorted(ROLE_ENTRY))
def test_every_flag_of_a_command_is_read_by_its_role(command: str) -> None:
    """No flag accepted and ignored: each field of a command's settings is read somewhere its role reaches."""
    cls, _ = settings_flags(commands()[command])
    read = attributes_read(closure(ROLE_ENTRY[command]))
    unread = [f.name for f in dataclasses.fields(cls) if f.name not in read]
    assert not unread, f"{command} takes settings its role never reads: {unread}"


def test_commands_take_only_the_flags_they_use() -> None:
    """The flags the flat Settings gave commands that ignored them, and those the query commands lacked."""
    flags = {name: settings_flags(parser)[1] for name, parser in commands().items()}
    assert "--channel" not in flags["dash"]  # the dashboard reads no pub/sub channel
    assert "--group" in flags["dash"] and "--archive-group" in flags["dash"]  # its /metrics reads both groups' state
    assert not {"--redis-url", "--cluster", "--shards"} & (flags["history"] | flags["sql"])  # the archive, not Redis
    for query in ("counts", "stats", "trending", "new-pages", "shards", "route"):
        assert {"--redis-url", "--cluster", "--shards", "--stream"} <= flags[query], query
    assert flags["replay"] == flags["simulate"] == {"--log-level"}
    roles = (PublisherSettings, SubscriberSettings, ArchiverSettings, DashboardSettings)
    assert flags["up"] == {flag for role in roles for flag in role.flags()}  # up runs every role: all of theirs, no more


def test_a_role_reads_only_its_own_environment() -> None:
    """A bad value for another role's setting is not this role's error (it was: every command checked all 43)."""
    env = {"SUBSCRIBER_SOURCE": "kafka", "DASH_PORT": "0"}
    assert ArchiverSettings.from_args(environ=env).archive_port == 8124
    with pytest.raises(SettingsError, match="source"):
        SubscriberSettings.from_args(environ=env)
    with pytest.raises(SettingsError, match="port"):
        Settings.from_args(environ={"DASH_PORT": "0"})


def test_up_hands_every_role_its_settings() -> None:
    """`up` passes its settings to each child as environment variables: every role's, each one's value."""
    up = Settings(group="g", archive_group="a", archive_batch=7, channel="c", max_pages=3, shards=2, stream="s")
    for role in (PublisherSettings, SubscriberSettings, ArchiverSettings, DashboardSettings):
        child = role.from_args(environ=up.to_env())
        assert all(getattr(child, f.name) == getattr(up, f.name) for f in dataclasses.fields(role)), role


def test_a_stream_read_takes_read_batch_factor_batches() -> None:
    """The x10 of a read is one named property; no role multiplies BATCH_SIZE itself."""
    assert Settings(batch_size=7).read_batch_size == 7 * READ_BATCH_FACTOR == 70
    package = Path(wikipulse.__file__).parent
    roles = [p for p in package.rglob("*.py") if p != package / "core" / "settings.py"]
    multiplied = [str(p) for p in roles if "batch_size * " in p.read_text() or "batch_size*" in p.read_text()]
    assert not multiplied
