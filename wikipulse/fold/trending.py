"""Trending pages and new pages: folded with the counts, in the same atomic script, and read back.

A batch's page edits are summed per (domain, minute, page) in stream order, and sent as data: the t, g and n
sections of the apply script's payload (fold/apply.lua says what they hold, and applies them). The key layout and
the admission cap are in keys.py (TREND_*).
Reading: one ZUNION per domain (or per shard, over all domains) over the minutes asked for ranks the pages
(humans: everyone's keys at weight 1, bots' at -1); then the editors hashes of the top pages' wikis, for those
minutes only, give their distinct editors and bytes changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from wikipulse.core import model
from wikipulse.core.wiki_page import PageEdit
from wikipulse.store import keys


def member(namespace: int, title: str) -> str:
    return f"{namespace}\t{title}"


@dataclass
class _Page:
    number: int  # 1.. in the order of the minute's pages in this batch
    edits: int = 0
    bots: int = 0


@dataclass
class _Minute:
    """One domain-minute's pages and editors in a batch, each in the order of its first edit."""

    pages: dict[str, _Page] = field(default_factory=dict)  # member -> sums
    editors: dict[str, list[int]] = field(default_factory=dict)  # "<member>\t<b|h><user>" -> [page no., bytes, edits]


@dataclass
class TrendIncrements:
    """A batch's trending and new-pages work for one shard, in the order of the stream."""

    pages: dict[tuple[str, int], _Minute] = field(default_factory=dict)  # (domain, minute) -> its pages and editors
    shard_pages: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # minute -> "domain\tmember" -> [edits, bots]
    new_pages: list[int | str] = field(default_factory=list)  # event time, JSON item, ...

    def add(self, edit: PageEdit) -> None:
        minute = edit.time - edit.time % keys.RANK_STEP
        page = edit.page
        name = member(page.namespace, page.title)
        here = self.pages.get((edit.domain, minute))
        if here is None:
            here = self.pages[(edit.domain, minute)] = _Minute()
        sums = here.pages.get(name)
        if sums is None:
            sums = here.pages[name] = _Page(len(here.pages) + 1)
        sums.edits += 1
        sums.bots += edit.bot
        editor = f"{name}\t{'b' if edit.bot else 'h'}{page.user}"
        seen = here.editors.get(editor)
        if seen is None:
            seen = here.editors[editor] = [sums.number, 0, 0]
        seen[1] += page.bytes_changed or 0
        seen[2] += 1
        everywhere = self.shard_pages.setdefault(minute, {}).setdefault(f"{edit.domain}\t{name}", [0, 0])
        everywhere[0] += 1
        everywhere[1] += edit.bot
        if edit.kind == "new":
            self.new_pages += (edit.time, new_page_item(edit))

    def declared(self, shard: keys.Shard) -> list[str]:
        """Every key the section writes, in the order payload() numbers them."""
        out = [shard.trend_key(part, domain, minute) for domain, minute in self.pages for part in keys.TREND_PARTS]
        out += [shard.trend_key(part, keys.ALL_DOMAINS, minute) for minute in self.shard_pages for part in ("all", "bot")]
        if self.new_pages:
            out.append(shard.new_pages)
        return out

    def payload(self) -> dict[str, list[Any]]:
        """The t, g and n sections of the apply script's payload (their layout: fold/apply.lua), their keys numbered
        from 1 in declared() order."""
        number = 1
        t: list[Any] = []
        for (_domain, minute), here in self.pages.items():
            expire = minute + keys.TREND_RETENTION
            t += (number, number + 1, number + 2, expire, keys.TREND_CAP, keys.TREND_EDITOR_CAP, len(here.pages))
            number += 3
            for name, sums in here.pages.items():
                t += (name, sums.edits, sums.bots)
            t.append(len(here.editors))
            for editor, (page_number, changed, edits) in here.editors.items():
                t += (page_number, editor, changed, edits)
        g: list[Any] = []
        for minute, members in self.shard_pages.items():
            g += (number, number + 1, minute + keys.TREND_RETENTION, keys.TREND_GLOBAL_CAP, len(members))
            number += 2
            for name, (edits, bots) in members.items():
                g += (name, edits, bots)
        n: list[Any] = [number, keys.NEW_PAGES_KEEP, len(self.new_pages) // 2, *self.new_pages] if self.new_pages else []
        return {"t": t, "g": g, "n": n}


def new_page_item(edit: PageEdit) -> str:
    page = edit.page
    return orjson.dumps({
        "domain": edit.domain, "time": edit.time, "namespace": page.namespace, "title": page.title,
        "user": page.user, "bot": edit.bot, "bytes": page.bytes_changed, "revision": page.revision,
    }).decode()  # fmt: skip


def fold_pages(edits: Iterable[PageEdit], now: float, domains: Iterable[str]) -> TrendIncrements:
    """The trending work of a batch's page edits (pure): those of `domains` (the ones given series: others are
    counted under keys.OTHER_DOMAINS and have no lists) within the trending retention, in stream order."""
    admitted = set(domains)
    oldest, newest = now - keys.TREND_RETENTION, now + model.FUTURE_TOLERANCE
    out = TrendIncrements()
    for edit in edits:
        if edit.domain in admitted and oldest < edit.time <= newest:
            out.add(edit)
    return out


# ---- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trend:
    domain: str
    namespace: int
    title: str
    edits: int
    editors: int
    bytes_changed: int

    def as_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "namespace": self.namespace, "title": self.title, "edits": self.edits,
            "editors": self.editors, "bytes_changed": self.bytes_changed,
        }  # fmt: skip


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def rank(scored: Iterable[tuple[str, str, float]], limit: int, namespaces: Sequence[int] | None) -> list[tuple[str, str, int]]:
    """The top `limit` (domain, member, edits), most edits first, then by domain and member (pure). Members with no
    edits (humans read as all - bot: a page only bots edited) are left out."""
    kept = [
        (domain, name, int(score))
        for domain, name, score in scored
        if score > 0 and (namespaces is None or int(name.split("\t", 1)[0]) in namespaces)
    ]
    kept.sort(key=lambda row: (-row[2], row[0], row[1]))
    return kept[:limit]


_EDITOR_MARK = {"all": "", "humans": "h", "bots": "b"}  # the editor fields that count for each


@dataclass
class TrendingQuery:
    """The most-edited pages of the last `minutes` minutes (the current one included): over `domains`, or over
    every domain when None; by everyone, humans or bots (`who`, model.WHO); in `namespaces` only, unless None.

    Two pipelined round trips, on any client (the page's is synchronous, read_trending's asynchronous): queue_rank /
    take_rank, then queue_details / take_details for the top pages only."""

    layout: keys.Layout
    now: int
    minutes: int
    limit: int
    domains: Sequence[str] | None = None
    who: str = "all"
    namespaces: Sequence[int] | None = None
    top: list[tuple[str, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.who not in model.WHO:
            raise ValueError(f"who={self.who!r}: one of {', '.join(model.WHO)}")

    def _ranked(self, shard: keys.Shard, domain: str) -> list[str] | dict[str, int]:
        """The keys one ZUNION ranks over: everyone's, bots', or everyone's minus bots' (humans)."""
        if self.who == "bots":
            return shard.trend_keys("bot", domain, self.now, self.minutes)
        everyone = shard.trend_keys("all", domain, self.now, self.minutes)
        if self.who == "all":
            return everyone
        return {**dict.fromkeys(everyone, 1), **dict.fromkeys(shard.trend_keys("bot", domain, self.now, self.minutes), -1)}

    def queue_rank(self, pipe: Any) -> None:
        if self.domains is None:
            for shard in self.layout.all_shards:
                pipe.zunion(self._ranked(shard, keys.ALL_DOMAINS), withscores=True)
        else:
            for domain in self.domains:
                pipe.zunion(self._ranked(self.layout.shard_of(domain), domain), withscores=True)

    def take_rank(self, replies: Sequence[Any]) -> None:
        scored: list[tuple[str, str, float]] = []
        if self.domains is None:
            for reply in replies:
                for name, score in reply:
                    domain, _, rest = _text(name).partition("\t")
                    scored.append((domain, rest, score))
        else:
            for domain, reply in zip(self.domains, replies, strict=True):
                scored += [(domain, _text(name), score) for name, score in reply]
        self.top = rank(scored, self.limit, self.namespaces)

    def _by_domain(self) -> dict[str, list[str]]:
        by_domain: dict[str, list[str]] = {}
        for domain, name, _ in self.top:
            by_domain.setdefault(domain, []).append(name)
        return by_domain

    def queue_details(self, pipe: Any) -> None:
        """The editors hashes (editor -> bytes) of the top pages' wikis over the same minutes."""
        for domain in self._by_domain():
            for key in self.layout.shard_of(domain).trend_keys("byeditor", domain, self.now, self.minutes):
                pipe.hgetall(key)

    def take_details(self, replies: Sequence[Any]) -> list[Trend]:
        answers = iter(replies)
        mark = _EDITOR_MARK[self.who]
        changed: Counter[tuple[str, str]] = Counter()
        editors: dict[tuple[str, str], set[str]] = {}
        for domain, names in self._by_domain().items():
            wanted = set(names)
            for _ in range(self.minutes):
                for raw, value in next(answers).items():
                    name, _, who = _text(raw).rpartition("\t")
                    if name in wanted and who.startswith(mark):
                        changed[(domain, name)] += int(value)
                        editors.setdefault((domain, name), set()).add(who[1:])
        return [
            Trend(
                domain,
                int(name.partition("\t")[0]),
                name.partition("\t")[2],
                edits,
                len(editors.get((domain, name), ())),
                changed[(domain, name)],
            )
            for domain, name, edits in self.top
        ]


async def read_trending(
    client: Any,
    layout: keys.Layout,
    now: int,
    minutes: int,
    limit: int,
    domains: Sequence[str] | None = None,
    who: str = "all",
    namespaces: Sequence[int] | None = None,
) -> list[Trend]:
    """TrendingQuery on an asynchronous client."""
    query = TrendingQuery(layout, now, minutes, limit, domains, who, namespaces)
    pipe = client.pipeline(transaction=False)
    query.queue_rank(pipe)
    query.take_rank(await pipe.execute())
    if not query.top:
        return []
    pipe = client.pipeline(transaction=False)
    query.queue_details(pipe)
    return query.take_details(await pipe.execute())


def queue_new_pages(pipe: Any, layout: keys.Layout) -> None:
    for shard in layout.all_shards:
        pipe.zrevrange(shard.new_pages, 0, -1)


def take_new_pages(
    replies: Sequence[Any], limit: int, domains: Sequence[str] | None, namespaces: Sequence[int] | None, humans: bool, bots: bool = False
) -> list[dict[str, Any]]:
    """The newest page creations that pass the filters (by humans only, or by bots only), newest first, from every
    shard's list."""
    wanted = None if domains is None else set(domains)
    items = []
    for reply in replies:
        for raw in reply:
            item = orjson.loads(raw)
            if (
                (wanted is None or item["domain"] in wanted)
                and (namespaces is None or item["namespace"] in namespaces)
                and not (humans and item["bot"])
                and not (bots and not item["bot"])
            ):
                items.append(item)
    items.sort(key=lambda item: -item["time"])
    return items[:limit]


async def read_new_pages(
    client: Any,
    layout: keys.Layout,
    limit: int,
    domains: Sequence[str] | None = None,
    namespaces: Sequence[int] | None = (0,),
    humans: bool = False,
) -> list[dict[str, Any]]:
    """The newest page creations (namespace 0 by default), newest first."""
    pipe = client.pipeline(transaction=False)
    queue_new_pages(pipe, layout)
    return take_new_pages(await pipe.execute(), limit, domains, namespaces, humans)


def links(domain: str, title: str, revision: int | None = None) -> Mapping[str, str]:
    """The page's history and (with a revision) diff on its wiki; the title is URL-quoted, never pasted raw."""
    base = f"https://{domain}/w/index.php"
    out = {"history": f"{base}?title={quote(title.replace(' ', '_'), safe='')}&action=history"}
    if revision is not None:
        out["diff"] = f"{base}?diff={revision}"
    return out
