"""Spikes: a wiki whose last minute is far above its own recent level raises one alert.

The rule (pure, `is_spike`): a closed minute with `count` events on a domain is a spike when
  count >= MIN_VOLUME                                   quiet wikis do not alert on noise
  count >= FACTOR * baseline                            a jump, not a wobble
  count >= baseline + SIGMAS * max(deviation, sqrt(baseline))
where baseline is the median of the domain's previous hour of minutes and deviation their median absolute
deviation (scaled to a standard deviation). Median and MAD rather than an EWMA: the spike's own minutes, and a
bot's short bursts, barely move a median, so the second minute of a spike is still measured against the wiki's
usual level, and a spike ends as soon as the rate is back to normal. sqrt(baseline) is the Poisson noise floor
of a steady wiki. An alert is raised on the first spike minute of an episode (the minute before was not one),
so a two-minute burst gives one alert.

The counts come from the rank keys the subscriber already folds (keys.Shard.rank_key: domain -> events per
minute), so the watch keeps no state of its own: a restarted subscriber re-reads the same minutes and reaches
the same verdicts, and the (domain, minute) marker written with the alert keeps it from being raised twice.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.scripts import lua

logger = logging.getLogger(__name__)

MIN_VOLUME = 60  # events in the minute: a wiki at under one a second never alerts
FACTOR = 4.0
SIGMAS = 6.0
HISTORY = 60  # minutes of baseline
MIN_HISTORY = 10  # minutes a domain must have been seen before it can alert
LAG = 10  # seconds after a minute ends before it is judged: the feed's stragglers arrive
CHECK_EVERY = 5.0  # seconds between checks
LOOKBACK = 10  # minutes judged again when a watch starts (a restart misses no spike; markers stop repeats)
TOP_TITLES = 5
MARKER_TTL = 7200

Counts = Mapping[int, Mapping[str, int]]  # minute -> domain -> events


@dataclass(frozen=True)
class Spike:
    domain: str
    minute: int
    rate: int  # events in that minute
    baseline: float  # median events a minute over the hour before
    deviation: float


def baseline(history: Sequence[int]) -> tuple[float, float]:
    """(median, MAD scaled to a standard deviation) of a domain's earlier minutes."""
    median = statistics.median(history)
    return median, 1.4826 * statistics.median(abs(n - median) for n in history)


def is_spike(count: int, history: Sequence[int]) -> bool:
    if count < MIN_VOLUME or len(history) < MIN_HISTORY:
        return False
    level, deviation = baseline(history)
    return count >= FACTOR * level and count >= level + SIGMAS * max(deviation, math.sqrt(level), 1.0)


def _history(counts: Counts, domain: str, minute: int) -> list[int]:
    """The domain's counts in the HISTORY minutes before `minute` that were read (a minute with no key at all,
    the pipeline down, is left out rather than taken as zero)."""
    step = keys.RANK_STEP
    return [counts[m].get(domain, 0) for m in range(minute - HISTORY * step, minute, step) if m in counts]


def judge(counts: Counts, minute: int) -> list[Spike]:
    """The domains whose spike starts at `minute` (pure)."""
    out = []
    for domain, count in counts.get(minute, {}).items():
        history = _history(counts, domain, minute)
        if not is_spike(count, history):
            continue
        before = minute - keys.RANK_STEP
        if before in counts and is_spike(counts[before].get(domain, 0), _history(counts, domain, before)):
            continue  # the same episode, alerted already
        level, deviation = baseline(history)
        out.append(Spike(domain, minute, count, level, deviation))
    return out


ALERT_SCRIPT = lua(__package__, "alert")  # raises an alert once: alert.lua


class SpikeWatch:
    """Judges one shard's closed minutes, as they close, and raises their alerts."""

    def __init__(self, client: Client, shard: keys.Shard) -> None:
        self.client, self.shard = client, shard
        self.counts: dict[int, dict[str, int]] = {}  # closed minutes read so far
        self.judged: int | None = None  # the last minute judged

    async def read(self, minutes: Sequence[int]) -> None:
        missing = [m for m in minutes if m not in self.counts]
        if not missing:
            return
        pipe = self.client.pipeline(transaction=False)
        for m in missing:
            pipe.zrange(self.shard.rank_key(m), 0, -1, withscores=True)
        for m, reply in zip(missing, await pipe.execute(), strict=True):
            if reply:
                self.counts[m] = {(d.decode() if isinstance(d, bytes) else d): int(n) for d, n in reply}

    async def check(self, now: float) -> list[Spike]:
        """Judge every minute closed since the last check; the alerts raised."""
        step = keys.RANK_STEP
        last = int(now - LAG) // step * step - step  # the newest minute that has ended LAG seconds ago
        first = last - (LOOKBACK - 1) * step if self.judged is None else self.judged + step
        if first > last:
            return []
        await self.read(range(first - (HISTORY + 1) * step, last + step, step))
        raised = []
        for minute in range(first, last + step, step):
            for spike in judge(self.counts, minute):
                if await self.raise_alert(spike):
                    raised.append(spike)
        self.judged = last
        for m in [m for m in self.counts if m < last - (HISTORY + 2) * step]:
            del self.counts[m]
        return raised

    async def raise_alert(self, spike: Spike) -> bool:
        top = await self.client.zrevrange(self.shard.trend_key("all", spike.domain, spike.minute), 0, TOP_TITLES - 1, withscores=True)
        alert = orjson.dumps({
            "domain": spike.domain, "minute": spike.minute, "rate": spike.rate, "baseline": spike.baseline,
            "deviation": round(spike.deviation, 2),
            "top": [[(m.decode() if isinstance(m, bytes) else m).partition("\t")[2], int(n)] for m, n in top],
        })  # fmt: skip
        marker = keys.alert_marker(spike.domain, spike.minute)
        fresh = await self.client.eval(ALERT_SCRIPT, 2, keys.ALERTS, marker, alert, keys.ALERTS_CHANNEL, keys.ALERTS_KEEP, MARKER_TTL)
        if fresh:
            logger.warning("spike on %s at %s: %d events/min, usually %.0f", spike.domain, spike.minute, spike.rate, spike.baseline)
        return bool(fresh)


async def read_alerts(client: Client, limit: int) -> list[dict[str, object]]:
    """The newest alerts, newest first."""
    entries = await client.xrevrange(keys.ALERTS, count=limit)
    return [orjson.loads(fields[b"alert"] if b"alert" in fields else fields["alert"]) for _, fields in entries]
