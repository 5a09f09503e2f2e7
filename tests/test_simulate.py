"""The simulated feed: deterministic, and its canaries (one per canary_every) do not break it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import orjson
import pytest

from wikipulse.cli import build_parser, make_simulator
from wikipulse.core.errors import SettingsError
from wikipulse.core.events import Accepted, Canary, validate
from wikipulse.devtools.eventstreams import PATH, SimulatedSource, event_id
from wikipulse.devtools.redis_server import free_port
from wikipulse.devtools.simulate import SimulatedSpike, Simulator


def test_same_seed_same_events() -> None:
    assert Simulator(seed=3, start=1e9).event(42) == Simulator(seed=3, start=1e9).event(42)


def test_canaries_come_at_their_interval_and_validate_as_canaries() -> None:
    sim = Simulator(seed=1, start=1e9, canary_every=50)
    verdicts = [validate(orjson.dumps(sim.event(i))) for i in range(200)]
    assert [i for i, v in enumerate(verdicts) if isinstance(v, Canary)] == [49, 99, 149, 199]
    assert all(isinstance(v, Accepted) for v in verdicts if not isinstance(v, Canary))


def test_served_events_are_stamped_at_the_serving_rate() -> None:
    """`simulate --rate 60` (and `up --simulate --rate 60`): event time keeps pace with the clock."""
    args = build_parser().parse_args(["simulate", "--rate", "60", "--seed", "1"])
    sim = make_simulator(args)
    assert sim.rate == 60
    assert abs(sim.timestamp(0) - (time.time() - 3)) < 1  # an endless feed starts a few seconds back
    assert sim.timestamp(600) - sim.timestamp(0) == 10  # 600 events at 60/s: 10 s of event time
    counted = make_simulator(build_parser().parse_args(["simulate", "--rate", "100", "--count", "1000"]))
    assert abs(counted.timestamp(1000) - time.time()) < 1  # a counted feed ends now


def test_an_injected_spike_is_its_wiki_at_twenty_times_its_rate_for_two_minutes() -> None:
    sim = Simulator(seed=1, start=0, spike=SimulatedSpike("en.wikipedia.org", at=600))
    per_minute: Counter[int] = Counter()
    titles: Counter[str] = Counter()
    end = sim.index_at(900)
    for i in range(end):
        event = sim.event(i)
        if event["meta"]["domain"] == "en.wikipedia.org":
            minute = int(sim.timestamp(i) // 60)
            per_minute[minute] += 1
            if minute in (10, 11):
                titles[event["title"]] += 1
    usual = [per_minute[m] for m in (5, 6, 7, 8, 9, 12, 13, 14)]
    spiking = [per_minute[10], per_minute[11]]
    assert all(180 < n < 320 for n in usual)  # 12% of 35 events/s: about 250 a minute
    assert all(18 * 250 < n < 22 * 250 for n in spiking)
    assert sum(n for _, n in titles.most_common(5)) > 0.9 * sum(spiking)  # on a few pages
    assert sim.timestamp(sim.index_at(600)) == 600 and sim.timestamp(sim.index_at(900)) >= 900


def test_spike_option_refuses_an_unknown_wiki() -> None:
    with pytest.raises(SettingsError, match="no wiki"):
        make_simulator(build_parser().parse_args(["simulate", "--spike", "nowhere.example.org@30"]))


def _first_events(port: int, last_event_id: bytes, n: int) -> list[dict[str, object]]:
    """The first n events a real client gets from a local feed, resuming after `last_event_id`."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{PATH}", headers={"Last-Event-ID": last_event_id.decode()})
    events: list[dict[str, object]] = []
    with urllib.request.urlopen(request, timeout=10) as stream:
        while len(events) < n:
            line = stream.readline()
            if line.startswith(b"data: "):
                events.append(orjson.loads(line[6:]))
    return events


def test_a_resumed_simulation_stays_live() -> None:
    """`up --simulate` a second time: the publisher resumes the feed at its stored position. Event N used to be stamped
    at the new feed's start + N / rate: after a first run of 20,000 events at 100/s, 200 s ahead of the clock (after
    an hour's run, every event `future`, never shown). Now a resumed feed is stamped behind the clock, at its rate."""
    port = free_port()
    feed = subprocess.Popen(
        [sys.executable, "-m", "wikipulse", "simulate", "--rate", "100", "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the feed did not start"
                time.sleep(0.1)
        resumed = _first_events(port, event_id(19_999), 200)
        now = time.time()
        assert [e["meta"]["offset"] for e in resumed] == list(range(5_000_020_000, 5_000_020_200))  # type: ignore[index]
        stamps = [float(e["timestamp"]) for e in resumed]  # type: ignore[arg-type]
        assert max(stamps) <= now, f"stamped {max(stamps) - now:.0f} s ahead of the clock"
        assert min(stamps) > now - 30  # and live, not an hour back
        again = _first_events(port, event_id(20_199), 1)[0]  # a reconnect goes on from there, never ahead
        assert now - 30 < float(again["timestamp"]) <= time.time()  # type: ignore[arg-type]
    finally:
        feed.terminate()
        feed.wait(10)


def test_a_simulation_with_a_start_keeps_its_clock() -> None:
    """With --start (the scenarios' reference folds) event i is stamped start + i / rate, resumed or not."""
    args = build_parser().parse_args(["simulate", "--rate", "100", "--start", str(time.time() + 3600)])
    sim = make_simulator(args)
    source = SimulatedSource(sim, None, live=args.start is None)
    assert orjson.loads(source.data(100))["timestamp"] == int(sim.start + 1)
