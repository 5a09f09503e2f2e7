"""Folding what one read returned (stream entries or pub/sub payloads) into one write, a FoldedBatch.

Pure but for one step: which domains get series of their own (domains.DomainGate, kept in Redis). The steps around
it (observe.py, fold.tally, fold.expand, trending.fold_pages, series.notice) take plain values.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wikipulse.core.settings import SubscriberSettings
from wikipulse.core.summary import Observation
from wikipulse.core.wiki_page import PageEdit
from wikipulse.fold.domains import DomainGate
from wikipulse.fold.fold import FoldKey, Increments, expand, tally
from wikipulse.fold.observe import observe_entries, observe_payloads
from wikipulse.fold.series import notice
from wikipulse.fold.trending import fold_pages
from wikipulse.store import keys
from wikipulse.store.connect import Client
from wikipulse.store.streams import Entry


@dataclass
class FoldedBatch:
    """What one read folded into: the write (increments, counters, notice) and the stream entries it came from."""

    ids: list[bytes]  # the entries' ids, acknowledged with the write (none for pub/sub payloads)
    increments: Increments
    counters: Counter[str]
    entries: Sequence[Entry]  # kept to re-fold a part of them (series.SeriesWriter.receive)
    claims: bytes | None = None  # keys.CLAIMS before the entries were read; None: unknown
    notice: bytes = b""  # announced on keys.NOTICES once applied (series.notice)


def complete(classes: Counter[FoldKey], edits: list[PageEdit], now: float, retention: Mapping[str, int], shard: keys.Shard,
             inc: Increments, counters: Counter[str]) -> bytes:  # fmt: skip
    """The routed classes expanded at every resolution on `shard`'s keys, the page edits folded, the counters added
    (pure); the batch's notice (b"" when it folded nothing)."""
    expand(classes, now, retention, inc, shard)
    inc.pages = fold_pages(edits, now, {key[0] for key in classes})
    counters.update(folded=inc.folded, late=inc.late, future=inc.future, untimed=inc.untimed)
    if inc.folded and classes:
        return notice(inc.folded, (key[0] for key in classes), shard.index, min(key[1] for key in classes))
    return b""


class Folder:
    """Folds the reads of one shard's subscriber."""

    def __init__(self, settings: SubscriberSettings, client: Client, shard: keys.Shard) -> None:
        self.shard = shard
        self.max_bytes = settings.max_event_bytes
        self.retention = settings.retention_seconds()
        self.gate = DomainGate(client, settings.max_domains)

    async def entries(self, entries: Sequence[Entry], claims: bytes | None = None) -> FoldedBatch:
        """Stream entries, acknowledged by the write."""
        counters: Counter[str] = Counter()
        edits: list[PageEdit] = []
        observations = observe_entries(entries, self.max_bytes, counters, edits)
        return await self._fold(observations, edits, counters, [e[0] for e in entries], entries, claims)

    async def payloads(self, payloads: Sequence[bytes | None]) -> FoldedBatch:
        """Pub/sub messages: nothing to acknowledge."""
        counters: Counter[str] = Counter()
        edits: list[PageEdit] = []
        observations = observe_payloads(payloads, self.max_bytes, counters, edits)
        return await self._fold(observations, edits, counters, [], (), None)

    async def _fold(self, observations: Counter[Observation], edits: list[PageEdit], counters: Counter[str], ids: list[bytes],
                    entries: Sequence[Entry], claims: bytes | None) -> FoldedBatch:  # fmt: skip
        now = time.time()
        inc = Increments()
        classes = tally(observations.items(), now, self.retention, inc)
        classes, counters["overflow"] = await self.gate.route(classes)
        moved = complete(classes, edits, now, self.retention, self.shard, inc, counters)
        return FoldedBatch(ids, inc, counters, entries, claims, moved)
