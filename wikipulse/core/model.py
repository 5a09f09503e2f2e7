"""What the feed's events are made of and how time is cut: the vocabulary every stage shares (pure).

Redis's names for them (keys, fields) are in store/keys.py; the page's words for them in dashboard/view.py.
"""

from __future__ import annotations

from dataclasses import dataclass

FUTURE_TOLERANCE = 300  # seconds ahead of the clock an event may be stamped and still be folded

# Event-type and bot dimensions stored beside each bucket's total.
EVENT_TYPES = ("edit", "new", "log", "categorize", "other")
BOT_DIMENSIONS = ("bot", "human")
WHO = ("all", "humans", "bots")  # whose events the graph's total and the lists count: everyone, humans or bots

# Namespaces the graph can be narrowed to: articles. An event in one also counts in the dimension "ns<k>" and, a
# bot's, "ns<k>bot"; humans are again read as the difference. Each costs up to two fields a bucket, and a window
# must stay within hash-max-listpack-entries (Resolution): all six of the page's namespaces took a window to 285
# fields and the 3-million-event day from 52 to 76 MB (hash tables), so the others filter the lists only. The
# all-domain totals have no namespace dimensions (nothing shows them by namespace).
GRAPH_NAMESPACES = (0,)


@dataclass(frozen=True)
class Resolution:
    """One time-series resolution: buckets of `step` seconds, grouped into
    hashes that each cover `window` seconds, so a hash stops growing once its
    window is over and can expire as a whole.

    A window holds at most 15 buckets of 7 fields (total, 5 types, bot) and, for articles, 2 more (GRAPH_NAMESPACES):
    in practice under Redis's `hash-max-listpack-entries` (128; 135 only where every bucket of a 1 m window has every
    type, bots and articles), so hashes keep the compact listpack encoding (~20 bytes a field instead of ~90 in a
    hash table; BENCHMARKS.md, memory)."""

    name: str
    step: int
    window: int
    default_retention: int  # seconds a bucket stays readable, at least


RESOLUTIONS: tuple[Resolution, ...] = (
    Resolution("10s", 10, 120, 6 * 3600),
    Resolution("1m", 60, 900, 7 * 86400),
    Resolution("1h", 3600, 12 * 3600, 400 * 86400),
)
RESOLUTION_BY_NAME = {r.name: r for r in RESOLUTIONS}
