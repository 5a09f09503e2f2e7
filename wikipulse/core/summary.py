"""The fold summary: what one event contributes, as the publisher stores it beside each stream entry.

  Observation      (domain, event time or None, type, is_bot, namespace or None)
  fold summary     b"<domain> <time or -> <type> <bot|human> <namespace or ->"   an Observation as the publisher
                   stores it beside each stream entry (keys.FOLD_FIELD), so no consumer need parse the event's JSON
                   again (about 10 µs an event here); edits and creations add "\t" and their page (wiki_page.describe)

Written by the publisher (summary_of), read by the subscriber, the router and the routes copier (parse_summary). Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from wikipulse.core import model
from wikipulse.core.events import CANARY_DOMAIN, event_time, is_valid_domain
from wikipulse.core.wiki_page import Page, describe, page_of

Observation = tuple[str, int | None, str, bool, int | None]
MAX_NAMESPACE = 10**7
_KNOWN_TYPES = frozenset(model.EVENT_TYPES) - {"other"}
_TYPES = {kind.encode(): kind for kind in model.EVENT_TYPES}
_BOT = {b"bot": True, b"human": False}


def classify(event: Mapping[str, Any]) -> tuple[str, bool]:
    """(type dimension, is_bot) of a validated event."""
    kind = event.get("type")
    return (kind if kind in _KNOWN_TYPES else "other"), event.get("bot") is True


def observe(event: dict[str, Any]) -> Observation:
    """What a validated event contributes to the fold."""
    kind, bot = classify(event)
    namespace = event.get("namespace")
    if not (isinstance(namespace, int) and not isinstance(namespace, bool) and 0 <= namespace < MAX_NAMESPACE):
        namespace = None
    return event["meta"]["domain"], event_time(event), kind, bot, namespace


def summarize(obs: Observation, page: Page | None = None) -> str:
    domain, t, kind, bot, namespace = obs
    head = f"{domain} {'-' if t is None else t} {kind} {'bot' if bot else 'human'} {'-' if namespace is None else namespace}"
    return head if page is None else f"{head}\t{describe(page)}"


def summary_of(event: dict[str, Any]) -> str:
    """What the publisher stores beside a validated event (keys.FOLD_FIELD)."""
    return summarize(observe(event), page_of(event))


@lru_cache(maxsize=65536)
def _domain(raw: bytes) -> str | None:
    text = raw.decode("ascii", "replace")
    return text if is_valid_domain(text) and text != CANARY_DOMAIN else None


def parse_summary(raw: bytes) -> Observation | None:
    """The inverse of summarize, its page aside; None for anything it did not write (the caller then reads the JSON)."""
    parts = raw.split(b"\t", 1)[0].split(b" ")
    if len(parts) == 4:
        parts.append(b"-")  # written before the namespace was
    elif len(parts) != 5:
        return None
    domain, kind, bot = _domain(parts[0]), _TYPES.get(parts[2]), _BOT.get(parts[3])
    if domain is None or kind is None or bot is None:
        return None
    namespace = None
    if parts[4] != b"-":
        if not parts[4].isdigit() or len(parts[4]) > 7:
            return None
        namespace = int(parts[4])
    if parts[1] == b"-":
        return domain, None, kind, bot, namespace
    if not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    return domain, int(parts[1]), kind, bot, namespace
