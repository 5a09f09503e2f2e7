"""The simulated feed: deterministic, and its canaries (one per canary_every) do not break it."""

from __future__ import annotations

import time

import orjson

from wikipulse.cli import build_parser, make_simulator
from wikipulse.events import Accepted, Canary, validate
from wikipulse.simulate import Simulator


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
