"""Validation verdicts for a corpus of bad frames, the real events, and fuzzed input."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ENWIKI
from tests.helpers import calibrated_lines
from wikipulse.core import model
from wikipulse.core.events import Accepted, Canary, Reject, Rejected, event_time, is_valid_domain, validate
from wikipulse.store import keys


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xff\xfe{}", Reject.INVALID_UTF8),
        (b"{not json", Reject.NOT_JSON),
        (b"", Reject.NOT_JSON),
        (b"[1,2]", Reject.NOT_OBJECT),
        (b'"text"', Reject.NOT_OBJECT),
        (b"{}", Reject.MISSING_META),
        (b'{"meta": 1}', Reject.MISSING_META),
        (b'{"meta": {}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "En.Wikipedia.org"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "en.wikipedia.org}"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "a b"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "a.org:*"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "{a.org"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "' + b"a" * 10_000 + b'.org"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "x\\r\\ny"}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "\xd0\xb0.org"}}', Reject.BAD_DOMAIN),  # Cyrillic look-alike
        (b'{"meta": {"domain": 5}}', Reject.BAD_DOMAIN),
        (b'{"meta": {"domain": "-a.org"}}', Reject.BAD_DOMAIN),
    ],
)
def test_rejects_with_reason(frame: bytes, reason: Reject) -> None:
    verdict = validate(frame)
    assert isinstance(verdict, Rejected) and verdict.reason == reason


def test_too_large() -> None:
    verdict = validate(b'{"meta": {"domain": "a.org"}, "x": "' + b"y" * 2000 + b'"}', max_bytes=1000)
    assert isinstance(verdict, Rejected) and verdict.reason == Reject.TOO_LARGE


def test_long_domain_rejected() -> None:
    assert not is_valid_domain(("a" * 60 + ".") * 5 + "org")
    assert is_valid_domain("en.wikipedia.org") and is_valid_domain("map-bms.wikipedia.org")


def test_canary_dropped() -> None:
    assert isinstance(validate(b'{"meta": {"domain": "canary", "id": "x"}}'), Canary)


def test_every_real_event_is_accepted() -> None:
    lines = ENWIKI.read_bytes().splitlines()
    verdicts = [validate(line) for line in lines]
    assert len(verdicts) == 100
    assert all(isinstance(v, Accepted) and v.domain == "en.wikipedia.org" for v in verdicts)


def test_calibrated_sample_has_exactly_its_four_canaries() -> None:
    verdicts = [validate(line) for line in calibrated_lines()]
    assert sum(isinstance(v, Canary) for v in verdicts) == 4
    assert sum(isinstance(v, Accepted) for v in verdicts) == len(verdicts) - 4


def test_event_time_prefers_timestamp_then_meta_dt() -> None:
    assert event_time({"timestamp": 100, "meta": {"dt": "2023-01-01T00:00:00Z"}}) == 100
    assert event_time({"meta": {"dt": "2023-01-01T00:00:00Z"}}) == 1672531200
    assert event_time({"meta": {"dt": "2023-01-01T00:00:00"}}) == 1672531200
    assert event_time({"timestamp": True, "meta": {"dt": "nonsense"}}) is None


KEY_SHAPE = re.compile(r"wp:ts:\{[a-z0-9.-]+\}:(10s|1m|1h):\d+\Z")


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    validate(data)


@given(st.text(max_size=300))
def test_any_domain_accepted_yields_a_key_inside_the_schema(domain: str) -> None:
    verdict = validate(orjson.dumps({"meta": {"domain": domain}}))
    if isinstance(verdict, Accepted):
        assert KEY_SHAPE.match(keys.series_key(verdict.domain, model.RESOLUTIONS[0], 0))
    else:
        assert isinstance(verdict, (Rejected, Canary))
