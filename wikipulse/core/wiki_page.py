"""What one edit or page creation says about its page: pure, for the trending lists and the new-articles list.

The publisher writes it after the event's fold summary (summary.summarize), tab-separated:
  "<domain> <time> <type> <bot|human>\t<namespace> <bytes changed or -> <revision or ->\t<user>\t<title>"
so the subscriber reads it without parsing the event's JSON. Tabs, newlines and other control characters
cannot occur in a MediaWiki title or user name; an event that has them anyway gets U+FFFD in their place,
so the separators stay unambiguous, and the sorted-set members built from them (trending.py) stay
parseable. Titles are cut at MAX_TITLE characters so that a hostile feed cannot grow the members.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

MAX_TITLE = 300  # characters; MediaWiki's own limit is 255 bytes
MAX_USER = 100
PAGE_TYPES = frozenset({"edit", "new"})  # what counts as editing a page
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Page(NamedTuple):
    """A page touched by one event (its domain, time, type and bot flag are the fold summary's)."""

    namespace: int
    bytes_changed: int | None
    revision: int | None
    user: str
    title: str


class PageEdit(NamedTuple):
    domain: str
    time: int
    kind: str  # "edit" or "new"
    bot: bool
    page: Page


def clean(text: object, limit: int) -> str:
    return _CONTROL.sub("\ufffd", text if isinstance(text, str) else "")[:limit]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def page_of(event: Mapping[str, Any]) -> Page | None:
    """The page of a validated edit or creation; None for the other types, and for an event with no title."""
    if event.get("type") not in PAGE_TYPES or not isinstance(event.get("title"), str) or not event["title"]:
        return None
    length, revision = _dict(event.get("length")), _dict(event.get("revision"))
    new, old = _int(length.get("new")), _int(length.get("old"))
    return Page(
        _int(event.get("namespace")) or 0,
        None if new is None else new - (old or 0),
        _int(revision.get("new")),
        clean(event.get("user"), MAX_USER),
        clean(event.get("title"), MAX_TITLE),
    )


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def describe(page: Page) -> str:
    """The part of the fold summary after its first tab."""
    return f"{page.namespace} {_opt(page.bytes_changed)} {_opt(page.revision)}\t{page.user}\t{page.title}"


def _parse_opt(raw: bytes) -> int | None:
    return None if raw == b"-" else int(raw)


def parse_page(raw: bytes) -> Page | None:
    """The inverse of describe; None for anything it did not write."""
    parts = raw.split(b"\t")
    if len(parts) != 3:
        return None
    numbers = parts[0].split(b" ")
    try:
        namespace, changed, revision = int(numbers[0]), _parse_opt(numbers[1]), _parse_opt(numbers[2])
        user, title = parts[1].decode(), parts[2].decode()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    if len(numbers) != 3 or len(title) > MAX_TITLE or len(user) > MAX_USER:
        return None
    return Page(namespace, changed, revision, user, title)
