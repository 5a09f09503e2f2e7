"""The whole pipeline under faults, as separate processes (bench/scenarios.py, smaller than its full runs).

Each run compares everything Redis holds with an independent reference fold of the events sent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bench.scenarios import Scenario, cluster_scenarios, operator_mistakes, run

CASES = [
    Scenario("burst", 20_000),
    Scenario("drops", 5_000, drop_every=1000, overlap=100),
    Scenario("kills", 8_000, rate=1000, kill_publisher=3, kill_subscriber=5),
    Scenario("redis-restart", 6_000, rate=1000, restart_redis=True),
    Scenario("malformed", 5_000, malformed_every=100),
    *operator_mistakes(6_000),
    # The same guarantees on a real 3-master Redis Cluster: 3 shards, one subscriber process per shard.
    *cluster_scenarios(6_000),
]


@pytest.mark.parametrize("scenario", CASES, ids=[c.name for c in CASES])
def test_nothing_lost_nothing_doubled(scenario: Scenario, tmp_path: Path) -> None:
    result = run(dataclasses.replace(scenario), tmp_path)
    assert (result.lost, result.duplicated) == (0, 0), result
    assert result.in_stream == result.sent == result.counted + result.trimmed_unread
    assert result.exact, "some key differs from the reference fold"
    assert result.trending_exact, "some trending or new-pages key differs from its reference"
    if scenario.malformed_every:
        assert result.rejected == scenario.events // scenario.malformed_every
    if scenario.subscriber_late:
        assert result.trimmed_unread > 0, "nothing was trimmed: the scenario did not overflow the stream"
    faults = (
        scenario.kill_publisher + scenario.kill_subscriber + scenario.restart_redis + bool(scenario.full_seconds) + scenario.subscriber_late
    )
    assert result.faults == faults, "a fault was not injected"
