"""What raw events contribute to the fold (pure): stream entries read by their fold summary where the publisher wrote
one, else by their JSON; pub/sub payloads by their JSON. Everything not counted is tallied in `counters`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from wikipulse.core.events import Accepted, Canary, validate
from wikipulse.core.summary import Observation, observe, parse_summary
from wikipulse.core.wiki_page import PageEdit, page_of, parse_page
from wikipulse.store import keys
from wikipulse.store.streams import Entry

_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()


def observe_payloads(
    payloads: Iterable[bytes | None], max_bytes: int, counters: Counter[str], pages: list[PageEdit] | None = None
) -> Counter[Observation]:
    """Validate raw JSON events: what the accepted ones contribute (their page edits appended to `pages`, in
    order); everything else is counted."""
    observations: Counter[Observation] = Counter()
    for data in payloads:
        if data is None:
            counters["trimmed"] += 1  # the entry was trimmed from the stream before we read it
            continue
        verdict = validate(data, max_bytes)
        if isinstance(verdict, Accepted):
            obs = observe(verdict.event)
            observations[obs] += 1
            page = page_of(verdict.event)
            if page is not None and pages is not None and obs[1] is not None:
                pages.append(PageEdit(obs[0], obs[1], obs[2], obs[3], page))
        elif isinstance(verdict, Canary):
            counters["canaries"] += 1
        else:
            counters[f"rejected:{verdict.reason.value}"] += 1
    return observations


def observe_entries(entries: Sequence[Entry], max_bytes: int, counters: Counter[str], pages: list[PageEdit]) -> Counter[Observation]:
    """What stream entries contribute: from their fold summary where the publisher wrote one (equal
    summaries are counted first and parsed once), else from their JSON. Page edits are appended to `pages`
    in stream order."""
    heads: Counter[bytes] = Counter()
    parsed: dict[bytes, Observation | None] = {}  # each distinct head parsed once, for the counts and the pages
    payloads: list[bytes | None] = []
    for _, fields in entries:
        if fields is not None and len(fields) == 4 and fields[2] == _FOLD:  # the publisher's layout: most entries
            summary = fields[3]
        elif fields is None:
            payloads.append(None)
            continue
        else:
            named = dict(zip(fields[::2], fields[1::2], strict=False))
            if _FOLD not in named:
                payloads.append(named.get(_DATA, b""))  # no `data` field: b"", rejected as not JSON
                continue
            summary = named[_FOLD]
        head, tab, described = summary.partition(b"\t")
        heads[head] += 1
        if tab:
            obs = parsed[head] if head in parsed else parsed.setdefault(head, parse_summary(head))
            page = parse_page(described)
            if obs is not None and page is not None and obs[1] is not None:
                pages.append(PageEdit(obs[0], obs[1], obs[2], obs[3], page))
    observations: Counter[Observation] = Counter()
    unreadable: set[bytes] = set()
    for head, n in heads.items():
        obs = parsed[head] if head in parsed else parse_summary(head)
        if obs is None:
            unreadable.add(head)
        else:
            observations[obs] += n
    if unreadable:  # not written by our publisher: fall back to the JSON of those entries
        for _, fields in entries:
            named = dict(zip(fields[::2], fields[1::2], strict=False)) if fields is not None else {}
            if named.get(_FOLD, b"").partition(b"\t")[0] in unreadable:
                payloads.append(named.get(_DATA, b""))
    observations.update(observe_payloads(payloads, max_bytes, counters, pages))
    return observations
