"""Trending pages and new pages: folded with the counts, in the same atomic script, and read back.

A batch's page edits are summed per (domain, minute, page) in stream order, and sent as one section of
series.APPLY_SCRIPT's payload (TREND_LUA). The key layout and the admission cap are in keys.py (TREND_*).
Reading: one ZUNION per domain (or per shard, over all domains) over the minutes asked for ranks the pages;
then the top pages' bytes (HMGET) and editors (ZRANGEBYLEX by prefix) are read for those minutes only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from wikipulse import keys
from wikipulse.pages import PageEdit

# The trending and new-pages sections of series.APPLY_SCRIPT's payload `p` (key numbers index KEYS):
#   p.t: per domain-minute: all, human, bytes, editors key no., expire_at, cap, n, then n pages:
#        member, edits, human edits, bytes, human bytes, k, k editor members
#   p.g: per shard-minute: all, human key no., expire_at, cap, n, then n members: member, edits, human edits
#   p.n: new-pages key no., how many to keep, k, then k pairs: event time, JSON item. A sorted set by event time
#        keeps the newest `keep` whatever order batches are applied in (two consumers of one stream interleave).
# A page past its minute's cap (keys.TREND_CAP) is counted in the `bytes` hash's "\trest" field only.
TREND_LUA = """
local t = p['t']
i = 1
while i <= #t do
  local kall, khum, kbytes, keds = KEYS[t[i]], KEYS[t[i + 1]], KEYS[t[i + 2]], KEYS[t[i + 3]]
  local expire, cap, n = t[i + 4], t[i + 5], t[i + 6]
  local card, rest, eds = redis.call('ZCARD', kall), 0, {}
  i = i + 7
  for _ = 1, n do
    local m, edits, human, bytes, hbytes, k = t[i], t[i + 1], t[i + 2], t[i + 3], t[i + 4], t[i + 5]
    if card < cap or redis.call('ZSCORE', kall, m) then
      if tonumber(redis.call('ZINCRBY', kall, edits, m)) == edits then card = card + 1 end
      if human > 0 then redis.call('ZINCRBY', khum, human, m) end
      if bytes ~= 0 then redis.call('HINCRBY', kbytes, m, bytes) end
      if hbytes ~= 0 then redis.call('HINCRBY', kbytes, m .. '\\th', hbytes) end
      for j = i + 6, i + 5 + k do eds[#eds + 1] = 0; eds[#eds + 1] = t[j] end
    else
      rest = rest + edits
    end
    i = i + 6 + k
  end
  if rest > 0 then redis.call('HINCRBY', kbytes, '\\trest', rest) end
  for j = 1, #eds, 1000 do redis.call('ZADD', keds, unpack(eds, j, math.min(j + 999, #eds))) end
  for _, key in ipairs({kall, khum, kbytes, keds}) do redis.call('EXPIREAT', key, expire) end
end
local g = p['g']
i = 1
while i <= #g do
  local kall, khum, expire, cap, n = KEYS[g[i]], KEYS[g[i + 1]], g[i + 2], g[i + 3], g[i + 4]
  local card = redis.call('ZCARD', kall)
  i = i + 5
  for _ = 1, n do
    local m, edits, human = g[i], g[i + 1], g[i + 2]
    if card < cap or redis.call('ZSCORE', kall, m) then
      if tonumber(redis.call('ZINCRBY', kall, edits, m)) == edits then card = card + 1 end
      if human > 0 then redis.call('ZINCRBY', khum, human, m) end
    end
    i = i + 3
  end
  redis.call('EXPIREAT', kall, expire)
  redis.call('EXPIREAT', khum, expire)
end
local new = p['n']
if #new > 0 then
  local key, keep, k = KEYS[new[1]], new[2], new[3]
  for j = 4, 3 + 2 * k, 1000 do redis.call('ZADD', key, unpack(new, j, math.min(j + 999, 3 + 2 * k))) end
  redis.call('ZREMRANGEBYRANK', key, 0, -keep - 1)
end
"""


def member(namespace: int, title: str) -> str:
    return f"{namespace}\t{title}"


@dataclass
class _Page:
    edits: int = 0
    human: int = 0
    bytes: int = 0
    human_bytes: int = 0
    editors: dict[str, None] = field(default_factory=dict)  # ordered, distinct


@dataclass
class TrendIncrements:
    """A batch's trending and new-pages work for one shard, in the order of the stream."""

    pages: dict[tuple[str, int], dict[str, _Page]] = field(default_factory=dict)  # (domain, minute) -> member -> sums
    shard_pages: dict[int, dict[str, list[int]]] = field(default_factory=dict)  # minute -> "domain\tmember" -> [edits, human]
    new_pages: list[int | str] = field(default_factory=list)  # event time, JSON item, ...

    def add(self, edit: PageEdit) -> None:
        minute = edit.time - edit.time % keys.RANK_STEP
        page = edit.page
        name = member(page.namespace, page.title)
        sums = self.pages.setdefault((edit.domain, minute), {}).get(name)
        if sums is None:
            sums = self.pages[(edit.domain, minute)][name] = _Page()
        human = not edit.bot
        changed = page.bytes_changed or 0
        sums.edits += 1
        sums.bytes += changed
        sums.editors[f"{name}\t{'h' if human else 'b'}{page.user}"] = None
        if human:
            sums.human += 1
            sums.human_bytes += changed
        everywhere = self.shard_pages.setdefault(minute, {}).setdefault(f"{edit.domain}\t{name}", [0, 0])
        everywhere[0] += 1
        everywhere[1] += human
        if edit.kind == "new":
            self.new_pages += (edit.time, new_page_item(edit))

    def declared(self, shard: keys.Shard) -> list[str]:
        """Every key the section writes, in the order payload() numbers them."""
        out = [shard.trend_key(part, domain, minute) for domain, minute in self.pages for part in keys.TREND_PARTS]
        out += [shard.trend_key(part, keys.ALL_DOMAINS, minute) for minute in self.shard_pages for part in ("all", "human")]
        if self.new_pages:
            out.append(shard.new_pages)
        return out

    def payload(self, first_key: int) -> dict[str, list[Any]]:
        """The t, g and n sections, their keys numbered from first_key on in declared() order."""
        number = first_key
        t: list[Any] = []
        for (_domain, minute), pages in self.pages.items():
            t += (number, number + 1, number + 2, number + 3, minute + keys.TREND_RETENTION, keys.TREND_CAP, len(pages))
            number += 4
            for name, sums in pages.items():
                t += (name, sums.edits, sums.human, sums.bytes, sums.human_bytes, len(sums.editors), *sums.editors)
        g: list[Any] = []
        for minute, members in self.shard_pages.items():
            g += (number, number + 1, minute + keys.TREND_RETENTION, keys.TREND_GLOBAL_CAP, len(members))
            number += 2
            for name, (edits, human) in members.items():
                g += (name, edits, human)
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
    oldest, newest = now - keys.TREND_RETENTION, now + keys.FUTURE_TOLERANCE
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
    """The top `limit` (domain, member, edits), most edits first, then by domain and member (pure)."""
    kept = [(domain, name, int(score)) for domain, name, score in scored if namespaces is None or int(name.split("\t", 1)[0]) in namespaces]
    kept.sort(key=lambda row: (-row[2], row[0], row[1]))
    return kept[:limit]


@dataclass
class TrendingQuery:
    """The most-edited pages of the last `minutes` minutes (the current one included): over `domains`, or over
    every domain when None; by humans only if `humans`; in `namespaces` only, unless None.

    Two pipelined round trips, on any client (the page's is synchronous, read_trending's asynchronous): queue_rank /
    take_rank, then queue_details / take_details for the top pages only."""

    layout: keys.Layout
    now: int
    minutes: int
    limit: int
    domains: Sequence[str] | None = None
    humans: bool = False
    namespaces: Sequence[int] | None = None
    top: list[tuple[str, str, int]] = field(default_factory=list)

    def queue_rank(self, pipe: Any) -> None:
        part = "human" if self.humans else "all"
        if self.domains is None:
            for shard in self.layout.all_shards:
                pipe.zunion(shard.trend_keys(part, keys.ALL_DOMAINS, self.now, self.minutes), withscores=True)
        else:
            for domain in self.domains:
                pipe.zunion(self.layout.shard_of(domain).trend_keys(part, domain, self.now, self.minutes), withscores=True)

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
        """Bytes changed (HMGET) and editors (ZRANGEBYLEX by prefix) of the top pages over the same minutes."""
        suffix = "\th" if self.humans else ""
        for domain, names in self._by_domain().items():
            shard = self.layout.shard_of(domain)
            for key in shard.trend_keys("bytes", domain, self.now, self.minutes):
                pipe.hmget(key, [n + suffix for n in names])
            for key in shard.trend_keys("editors", domain, self.now, self.minutes):
                for name in names:
                    pipe.zrangebylex(key, f"[{name}\t", f"({name}\n")  # the members that start with name + tab

    def take_details(self, replies: Sequence[Any]) -> list[Trend]:
        answers = iter(replies)
        changed: Counter[tuple[str, str]] = Counter()
        editors: dict[tuple[str, str], set[str]] = {}
        for domain, names in self._by_domain().items():
            for _ in range(self.minutes):
                for name, value in zip(names, next(answers), strict=True):
                    changed[(domain, name)] += int(value or 0)
            for _ in range(self.minutes):
                for name in names:
                    editors.setdefault((domain, name), set()).update(_editors(next(answers), self.humans))
        return [
            Trend(
                domain, int(name.partition("\t")[0]), name.partition("\t")[2], edits, len(editors[(domain, name)]), changed[(domain, name)]
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
    humans: bool = False,
    namespaces: Sequence[int] | None = None,
) -> list[Trend]:
    """TrendingQuery on an asynchronous client."""
    query = TrendingQuery(layout, now, minutes, limit, domains, humans, namespaces)
    pipe = client.pipeline(transaction=False)
    query.queue_rank(pipe)
    query.take_rank(await pipe.execute())
    if not query.top:
        return []
    pipe = client.pipeline(transaction=False)
    query.queue_details(pipe)
    return query.take_details(await pipe.execute())


def _editors(members: Iterable[bytes | str], humans: bool) -> Iterator[str]:
    """User names from editor members "<ns>\t<title>\t<b|h><user>" (humans only if `humans`)."""
    for raw in members:
        who = _text(raw).rsplit("\t", 1)[1]
        if not humans or who.startswith("h"):
            yield who[1:]


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
