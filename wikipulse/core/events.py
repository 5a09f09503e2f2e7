"""Validation of recentchange events: pure functions from frame bytes to a verdict.

A frame is accepted, dropped as a canary, or rejected with a reason; nothing here
raises on bad input. Both the publisher (on the wire) and the subscriber (on the
stream, which other writers could also reach) use it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson

# A lowercase hostname: labels of letters, digits and inner hyphens, dot separated.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\Z")

CANARY_DOMAIN = "canary"


class Reject(enum.Enum):
    INVALID_UTF8 = "invalid_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_META = "missing_meta"
    BAD_DOMAIN = "bad_domain"
    TOO_LARGE = "too_large"


@dataclass(frozen=True, slots=True)
class Accepted:
    event: dict[str, Any]
    domain: str
    meta_id: str | None


@dataclass(frozen=True, slots=True)
class Canary:
    meta_id: str | None


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reject
    detail: str


Verdict = Accepted | Canary | Rejected


def is_valid_domain(domain: object) -> TypeGuard[str]:
    return isinstance(domain, str) and _HOSTNAME.match(domain) is not None


def validate(data: bytes, max_bytes: int = 1 << 20) -> Verdict:
    if len(data) > max_bytes:
        return Rejected(Reject.TOO_LARGE, f"{len(data)} bytes > {max_bytes}")
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as utf8_exc:
            return Rejected(Reject.INVALID_UTF8, str(utf8_exc))
        return Rejected(Reject.NOT_JSON, str(exc))
    if not isinstance(event, dict):
        return Rejected(Reject.NOT_OBJECT, type(event).__name__)
    meta = event.get("meta")
    if not isinstance(meta, dict):
        return Rejected(Reject.MISSING_META, "no meta object")
    domain = meta.get("domain")
    meta_id = meta.get("id")
    meta_id = meta_id if isinstance(meta_id, str) else None
    if domain == CANARY_DOMAIN:
        return Canary(meta_id)
    if not is_valid_domain(domain):
        return Rejected(Reject.BAD_DOMAIN, repr(domain)[:300])
    return Accepted(event, domain, meta_id)


def event_time(event: dict[str, Any]) -> int | None:
    """When the change happened (unix seconds): `timestamp`, else `meta.dt`."""
    ts = event.get("timestamp")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return int(ts)
    meta = event.get("meta")
    dt = parse_dt(meta.get("dt")) if isinstance(meta, dict) else None
    return None if dt is None else int(dt)


def parse_dt(dt: object) -> float | None:
    """ISO `meta.dt` (UTC when it names no zone) -> unix seconds, or None."""
    if not isinstance(dt, str):
        return None
    try:
        parsed = datetime.fromisoformat(dt.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
