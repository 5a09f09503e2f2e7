"""The SSE decoder against the WHATWG rules, with plain strings, and the real capture."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import CAPTURE
from wikipulse.ingest.sse import ServerSentEvent, SSEDecoder


def decode(*chunks: bytes, max_bytes: int = 1 << 20) -> list[ServerSentEvent]:
    decoder = SSEDecoder(max_bytes)
    return [e for c in chunks for e in decoder.feed(c)]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (b"data: a\n\n", [("message", b"a", None)]),
        (b"data: a\r\n\r\n", [("message", b"a", None)]),
        (b"data: a\r\rdata: b\r\r", [("message", b"a", None), ("message", b"b", None)]),
        (b"data: one\ndata: two\n\n", [("message", b"one\ntwo", None)]),
        (b"data:no-space\n\n", [("message", b"no-space", None)]),
        (b"data:  two spaces\n\n", [("message", b" two spaces", None)]),
        (b": comment\n:ok\n\ndata: x\n\n", [("message", b"x", None)]),
        (b"event: error\ndata: boom\n\n", [("error", b"boom", None)]),
        (b"id: 7\ndata: a\n\ndata: b\n\n", [("message", b"a", "7"), ("message", b"b", "7")]),
        (b"id: 7\ndata: a\n\nid\ndata: b\n\n", [("message", b"a", "7"), ("message", b"b", "")]),
        (b"id: 1\x002\ndata: a\n\n", [("message", b"a", None)]),
        (b"event: x\n\ndata: a\n\n", [("message", b"a", None)]),  # no data: not dispatched, type reset
        (b"data\n\n", [("message", b"", None)]),
        (b"data: a\n", []),  # not terminated by a blank line: not dispatched
        (b"unknown: field\ndata: a\n\n", [("message", b"a", None)]),
    ],
)
def test_wire_table(wire: bytes, expected: list[tuple[str, bytes, str | None]]) -> None:
    assert [(e.event, e.data, e.id) for e in decode(wire)] == expected


def test_retry_field() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\nretry: soon\n\n")
    assert decoder.retry == 1500


def test_crlf_split_across_chunks() -> None:
    assert [e.data for e in decode(b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n")] == [b"a", b"b"]


def test_oversize_event_is_flagged_and_dropped() -> None:
    big = b"data: " + b"x" * 2000 + b"\n\ndata: ok\n\n"
    events = decode(big[:700], big[700:], max_bytes=1000)
    assert [(e.oversize, e.data) for e in events] == [(True, b""), (False, b"ok")]


def test_oversize_by_many_data_lines() -> None:
    events = decode(b"data: 123456\n" * 200 + b"\n", max_bytes=1000)
    assert [(e.oversize, e.data) for e in events] == [(True, b"")]


def test_real_capture_parses_to_its_three_events() -> None:
    events = decode(CAPTURE.read_bytes() + b"\n\n")
    assert len(events) == 3
    parsed = [orjson.loads(e.data) for e in events]
    assert [p["meta"]["domain"] for p in parsed] == ["commons.wikimedia.org", "en.wiktionary.org", "www.wikidata.org"]
    assert all(e.event == "message" for e in events)
    assert events[0].id is not None and orjson.loads(events[0].id)[0]["topic"] == "eqiad.mediawiki.recentchange"


frames = st.lists(
    st.tuples(
        st.sampled_from(["message", "error"]),
        st.text(alphabet=st.characters(blacklist_characters="\r\n\x00", codec="utf-8"), max_size=30),
    ),
    max_size=8,
)


@given(frames, st.lists(st.integers(min_value=1, max_value=40), max_size=20), st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_chunking_and_line_ending_gives_the_same_events(events: list[tuple[str, str]], cuts: list[int], eol: bytes) -> None:
    wire = b"".join(b"event: " + t.encode() + eol + b"data: " + d.encode() + eol + eol for t, d in events)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(wire[pos : pos + cut])
        pos += cut
    chunks.append(wire[pos:])
    got = decode(*chunks)
    assert [(e.event, e.data.decode()) for e in got] == [(t, d) for t, d in events]


@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_never_raise_and_stay_bounded(chunks: list[bytes]) -> None:
    for event in decode(*chunks, max_bytes=256):
        assert len(event.data) <= 256
