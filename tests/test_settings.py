from __future__ import annotations

import argparse

import pytest

from wikipulse.cli import build_parser
from wikipulse.core.errors import SettingsError
from wikipulse.core.settings import LIVE_STREAM_URL, Settings, parse_duration, redact_url


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
