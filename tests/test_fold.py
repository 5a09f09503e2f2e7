"""The fold against an independent, per-event reference, on a fixed clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import assert_same, calibrated_lines
from wikipulse.core import model
from wikipulse.core.settings import Settings
from wikipulse.core.summary import observe, parse_summary, summarize
from wikipulse.devtools.reference import as_reference, fold, reference_fold
from wikipulse.fold.fold import FUTURE_TOLERANCE
from wikipulse.store import keys

RETENTION = Settings.from_args(environ={}).retention_seconds()


def load() -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in calibrated_lines()]


def test_fold_equals_reference_at_every_resolution_and_dimension() -> None:
    events = [e for e in load() if e["meta"]["domain"] != "canary"]
    now = max(e["timestamp"] for e in events) + 60
    inc = fold(events, now, RETENTION)
    assert inc.folded == len(events) == 9996
    assert_same(as_reference(inc.counts), reference_fold(events, now))


def test_keys_cover_fixed_windows_and_expire_after_retention() -> None:
    t = 1_700_000_123
    inc = fold([{"meta": {"domain": "a.org"}, "timestamp": t, "type": "edit", "bot": False}], t + 1, RETENTION)
    for res in model.RESOLUTIONS:
        window = t - t % res.window
        key = keys.series_key("a.org", res, window)
        assert inc.expire_at[key] == window + res.window + RETENTION[res.name]
        assert inc.counts[(key, str(t - t % res.step))] == 1
        assert inc.counts[(key, f"{t - t % res.step}:edit")] == 1
        assert (key, f"{t - t % res.step}:human") not in inc.counts  # humans are total - bot


def test_late_future_and_untimed_are_counted_not_folded() -> None:
    now = 1_700_000_000
    events: list[dict[str, Any]] = [
        {"meta": {"domain": "a.org"}, "timestamp": now - 401 * 86400},
        {"meta": {"domain": "a.org"}, "timestamp": now + FUTURE_TOLERANCE + 1},
        {"meta": {"domain": "a.org"}},
        {"meta": {"domain": "a.org", "dt": "2023-11-14T22:13:20Z"}},  # falls back to meta.dt
    ]
    inc = fold(events, now, RETENTION)
    assert (inc.late, inc.future, inc.untimed, inc.folded) == (1, 1, 1, 1)


def test_resolutions_past_their_retention_are_skipped() -> None:
    now = 1_700_000_000
    old = now - 2 * 86400  # too old for 10 s (6 h) but kept at 1 min and 1 h
    inc = fold([{"meta": {"domain": "a.org"}, "timestamp": old}], now, RETENTION)
    resolutions = {key.split(":")[3] for key, _ in inc.counts}
    assert resolutions == {"1m", "1h"}
    assert not inc.rank  # the ranking only keeps the last hour


def test_rank_counts_per_minute() -> None:
    now = 1_700_000_000
    events = [{"meta": {"domain": d}, "timestamp": now - 5} for d in ("a.org", "a.org", "b.org")]
    inc = fold(events, now, RETENTION)
    minute = (now - 5) // 60 * 60
    assert inc.rank == Counter({(keys.rank_key(minute), "a.org"): 2, (keys.rank_key(minute), "b.org"): 1})


def test_fold_summary_of_a_real_event() -> None:
    event = load()[0]
    expected = f"{event['meta']['domain']} {event['timestamp']} {event['type']} {'bot' if event['bot'] else 'human'} {event['namespace']}"
    assert summarize(observe(event)) == expected
    assert summarize(observe({"meta": {"domain": "a.org"}, "type": "weird", "bot": "yes"})) == "a.org - other human -"
    for namespace in (True, -1, "0", 1.0, 10**7):  # not a namespace MediaWiki could send: none
        assert summarize(observe({"meta": {"domain": "a.org"}, "type": "edit", "namespace": namespace})) == "a.org - edit human -"
    # What a publisher wrote before the namespace was in the summary is still read
    assert parse_summary(b"a.org 10 edit bot") == ("a.org", 10, "edit", True, None)


_DOMAINS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True).filter(lambda d: d != "canary")


@given(
    _DOMAINS, st.none() | st.integers(0, 10**11), st.sampled_from(model.EVENT_TYPES), st.booleans(), st.none() | st.integers(0, 10**7 - 1)
)
def test_fold_summary_round_trips(domain: str, t: int | None, kind: str, bot: bool, namespace: int | None) -> None:
    assert parse_summary(summarize((domain, t, kind, bot, namespace)).encode()) == (domain, t, kind, bot, namespace)


@pytest.mark.parametrize(
    "summary",
    [b"", b"a.org 1 edit", b"a.org 1 edit human extra", b"A.org 1 edit human", b"a..org 1 edit human", b"canary 1 edit human",
     b"a.org -1 edit human", b"a.org 1.5 edit human", b"a.org 1 typo human", b"a.org 1 edit robot", b"a.org 1e9 edit human",
     b"\xff.org 1 edit human", b"a.org 1 edit  human", b"a.org 99999999999999 edit human", b"a.org 1 edit human x",
     b"a.org 1 edit human -1", b"a.org 1 edit human 99999999", b"a.org 1 edit human 0 0"],
)  # fmt: skip
def test_fold_summaries_it_did_not_write_are_refused(summary: bytes) -> None:
    assert parse_summary(summary) is None
