"""The simulated feed: deterministic, and its canaries (one per canary_every) do not break it."""

from __future__ import annotations

import orjson

from wikipulse.events import Accepted, Canary, validate
from wikipulse.simulate import Simulator


def test_same_seed_same_events() -> None:
    assert Simulator(seed=3, start=1e9).event(42) == Simulator(seed=3, start=1e9).event(42)


def test_canaries_come_at_their_interval_and_validate_as_canaries() -> None:
    sim = Simulator(seed=1, start=1e9, canary_every=50)
    verdicts = [validate(orjson.dumps(sim.event(i))) for i in range(200)]
    assert [i for i, v in enumerate(verdicts) if isinstance(v, Canary)] == [49, 99, 149, 199]
    assert all(isinstance(v, Accepted) for v in verdicts if not isinstance(v, Canary))
