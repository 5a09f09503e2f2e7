"""A seeded generator of recentchange events in the real schema, with the live feed's proportions.

Event `i` depends only on (seed, i, start, rate), so a server can re-deliver any
offset identically on resume. Proportions (DESIGN.md, measured on the live feed):
49% categorize / 41% edit / 8% log / 2% new; commons 47%, wikidata 13%, enwiki 12%,
the rest over a long tail of ~900 wikis; 32% bots; meta.dt lags timestamp ~1.6 s;
~2% out of order; a canary event about hourly at the live rate. Titles are drawn log-uniformly
(a few hot pages per wiki, a long tail of pages edited once), so trending lists have a head.

A SimulatedSpike adds a burst on one wiki (e.g. 20x its share of the rate for two minutes, on a few
titles): the events of the spike window come faster, and the added ones are that wiki's.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

LIVE_RATE = 35.0  # events/s of the live feed; spaces the simulated event times
FEED_LAG = 3.0  # seconds a live simulation's events are stamped behind the clock, like the live feed's ingest lag

_LANGS = [
    "en",
    "de",
    "fr",
    "es",
    "ja",
    "ru",
    "it",
    "zh",
    "pt",
    "pl",
    "nl",
    "sv",
    "ar",
    "fa",
    "uk",
    "he",
    "id",
    "vi",
    "ko",
    "cs",
    "fi",
    "hu",
    "no",
    "tr",
    "ro",
    "da",
    "ca",
    "bg",
    "el",
    "sr",
    "sk",
    "lt",
    "et",
    "sl",
    "hr",
    "ms",
    "eu",
    "gl",
    "hi",
    "bn",
    "th",
    "ur",
    "ta",
    "te",
    "ml",
    "mr",
    "kn",
    "gu",
    "pa",
    "si",
    "ne",
    "my",
    "km",
    "lo",
    "ka",
    "hy",
    "az",
    "kk",
    "uz",
    "ky",
    "tg",
    "tk",
    "mn",
    "bo",
    "dz",
    "am",
    "ti",
    "so",
    "sw",
    "yo",
    "ig",
    "ha",
    "zu",
    "xh",
    "af",
    "sq",
    "mk",
    "be",
    "lv",
    "ga",
    "cy",
    "gd",
    "br",
    "co",
    "oc",
    "ast",
    "an",
    "la",
    "eo",
    "io",
    "ia",
    "ie",
    "vo",
    "simple",
    "ceb",
    "war",
    "min",
    "jv",
    "su",
    "ban",
    "bug",
    "ace",
    "map-bms",
    "nds",
    "frr",
    "stq",
    "li",
    "fy",
    "lb",
    "rm",
    "wa",
    "pcd",
    "nrm",
]
_PROJECTS = ("wikipedia", "wiktionary", "wikisource", "wikiquote", "wikibooks", "wikinews", "wikivoyage", "wikiversity")
_TYPES = (("categorize", 0.49), ("edit", 0.41), ("log", 0.08), ("new", 0.02))
_HEAD = (("commons.wikimedia.org", 0.47), ("www.wikidata.org", 0.13), ("en.wikipedia.org", 0.12))
_LOG_TYPES = (("patrol", "patrol"), ("thanks", "thank"), ("newusers", "create"), ("upload", "upload"), ("delete", "delete"))
_TITLE_WORDS = [
    "Zürich",
    "Ελλάδα",
    "Москва",
    "東京",
    "Café",
    "Naïve",
    "Ærøskøbing",
    "Łódź",
    "São_Paulo",
    "ദില്ലി",
    "Kraków",
    "Ämter",
    "Straße",
]


HOT_TITLES = 100_000  # titles per (wiki, word), drawn log-uniformly: title 1 is the hottest
SPIKE_TITLES = 5  # a spike edits this many pages of its wiki


@dataclass(frozen=True)
class SimulatedSpike:
    """`domain` at `factor` times its usual rate from time `at` for `seconds`."""

    domain: str
    at: float
    seconds: float = 120.0
    factor: float = 20.0


def _tail_domains() -> list[str]:
    domains = [f"{lang}.{project}.org" for project, lang in itertools.product(_PROJECTS, _LANGS)]
    return [d for d in domains if d != "en.wikipedia.org"]


class Simulator:
    def __init__(
        self, seed: int = 0, start: float = 0.0, rate: float = LIVE_RATE, canary_every: int = 126_000, spike: SimulatedSpike | None = None
    ) -> None:
        self.seed, self.start, self.rate, self.canary_every, self.spike = seed, start, rate, canary_every, spike
        tail = _tail_domains()
        tail_share = 1.0 - sum(w for _, w in _HEAD)
        zipf = [1.0 / (rank + 1) for rank in range(len(tail))]
        total = sum(zipf)
        self._domains = [d for d, _ in _HEAD] + tail
        weights = [w for _, w in _HEAD] + [tail_share * z / total for z in zipf]
        self._cum = list(itertools.accumulate(weights))
        self._spike_window = (0, 0, 0.0)  # (first index, end index, events/s inside) of the spike's events
        if spike is not None:
            share = dict(zip(self._domains, weights, strict=True)).get(spike.domain)
            if share is None:
                raise ValueError(f"the simulator has no wiki {spike.domain!r}")
            first = max(0, math.ceil((spike.at - start) * rate))
            inside = rate * (1 + (spike.factor - 1) * share)
            self._spike_window = (first, first + round(spike.seconds * inside), inside)

    def _slot(self, i: int) -> tuple[float, bool]:
        """Event i's time, and whether it is one the spike added."""
        first, end, inside = self._spike_window
        if i < first or first == end:
            return self.start + i / self.rate, False
        if i >= end:
            return self.start + first / self.rate + (end - first) / inside + (i - end) / self.rate, False
        j = i - first  # the added events are spread evenly among the usual ones
        added = 1 - self.rate / inside
        return self.start + first / self.rate + j / inside, math.floor((j + 1) * added) > math.floor(j * added)

    def timestamp(self, i: int) -> float:
        return self._slot(i)[0]

    def keep_live(self, i: int, now: float) -> None:
        """Never serve event i stamped ahead of `now`: if it would be, move the clock back (never forward) so that it is
        stamped FEED_LAG behind. A feed resumed at offset i (the publisher's stored position) was stamped start + i/rate,
        so a second run was ahead of the clock by the first run's length (after an hour: every event `future`).
        Events keep their ids and contents (the dedup window works on meta.id); only their times move."""
        ahead = self.timestamp(i) - (now - FEED_LAG)
        if ahead > FEED_LAG:
            self.start -= ahead

    def index_at(self, t: float) -> int:
        """The first event stamped at or after t (nearly: out-of-order events aside)."""
        first, end, inside = self._spike_window
        i = max(0, int((t - self.start) * self.rate))
        if i <= first or first == end:
            return i
        spike_start = self.start + first / self.rate
        j = math.ceil((t - spike_start) * inside)
        return first + j if first + j < end else end + max(0, math.ceil((t - self.timestamp(end)) * self.rate))

    def event(self, i: int) -> dict[str, Any]:
        rng = random.Random(self.seed * 1_000_000_007 + i)
        t, spiking = self._slot(i)
        if rng.random() < 0.02:  # out of order: stamped a little earlier than its neighbours
            t -= rng.uniform(1, 20)
        ts = int(t)
        lag = min(rng.lognormvariate(0.3, 0.6), 30.0)
        is_canary = self.canary_every > 0 and i % self.canary_every == self.canary_every - 1
        domain = (
            "canary" if is_canary else self._domains[min(bisect.bisect(self._cum, rng.random() * self._cum[-1]), len(self._domains) - 1)]
        )
        kind = rng.choices([k for k, _ in _TYPES], [w for _, w in _TYPES])[0]
        bot = rng.random() < 0.32
        word, draw = rng.choice(_TITLE_WORDS), rng.randrange(10**6)
        title = f"{word} {int(HOT_TITLES ** (draw / 10**6))}"
        if spiking and self.spike is not None:  # an edit war or a bot run: a few pages, edited again and again
            domain, kind, title = self.spike.domain, "edit", f"{_TITLE_WORDS[0]} spike {draw % SPIKE_TITLES}"
        namespace = 14 if kind == "categorize" else rng.choice((0, 0, 0, 1, 2, 4, 6))
        parts = domain.split(".")  # "canary" has one part
        wiki = parts[0].replace("-", "_") + ("wiki" if "wikipedia" in domain else parts[min(1, len(parts) - 1)])
        server = f"https://{domain}"
        title_url = f"{server}/wiki/{title.replace(' ', '_')}"
        event: dict[str, Any] = {
            "$schema": "/mediawiki/recentchange/1.0.0",
            "meta": {
                "uri": title_url,
                "request_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "dt": _iso(t + lag),
                "domain": domain,
                "stream": "mediawiki.recentchange",
                "topic": "eqiad.mediawiki.recentchange",
                "partition": 0,
                "offset": 5_000_000_000 + i,
            },
            "id": 1_700_000_000 + i,
            "type": kind,
            "namespace": namespace,
            "title": title,
            "title_url": title_url,
            "comment": rng.choice(("", "typo", "/* Links */ cleanup", "[[Category:Example]] added to category")),
            "timestamp": ts,
            "user": f"{'Bot' if bot else 'User'}{rng.randrange(5000)}",
            "bot": bot,
            "notify_url": f"{server}/w/index.php?diff={900_000_000 + i}",
            "server_url": server,
            "server_name": domain,
            "server_script_path": "/w",
            "wiki": wiki,
            "parsedcomment": "",
        }
        if kind in ("edit", "new"):
            old = None if kind == "new" else rng.randrange(100, 200_000)
            event["minor"] = rng.random() < 0.3
            event["patrolled"] = rng.random() < 0.5
            event["length"] = {"old": old, "new": (old or 0) + rng.randrange(-500, 2000) if old else rng.randrange(10, 5000)}
            event["revision"] = {"old": None if kind == "new" else 900_000_000 + i - 1, "new": 900_000_000 + i}
        elif kind == "log":
            log_type, action = rng.choice(_LOG_TYPES)
            event.update(log_id=60_000_000 + i, log_type=log_type, log_action=action, log_params=[], log_action_comment="")
        return event


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
