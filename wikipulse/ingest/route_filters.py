"""Routes' definitions and filters, pure (no I/O): names, `--where` clauses, the stored definition, and the test of an
entry against a filter, on its fold summary (no JSON parse), in Python (matcher) and as READ_SCRIPT's data (lua_filters).

Values in one --where are alternatives, several --where must all hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import orjson

from wikipulse.core import model
from wikipulse.core.errors import SettingsError
from wikipulse.core.events import CANARY_DOMAIN, Accepted, is_valid_domain, validate
from wikipulse.core.summary import MAX_NAMESPACE, observe, summarize
from wikipulse.store import keys
from wikipulse.store.streams import Entry

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
FIELDS = ("domain", "type", "bot", "namespace")  # what the fold summary tells
MAX_VALUES = 200  # alternatives in one --where
MAX_CLAUSES = 8
_DATA, _FOLD = keys.DATA_FIELD.encode(), keys.FOLD_FIELD.encode()
_INDEX = {"domain": 0, "type": 2, "bot": 3, "namespace": 4}  # in a Head
_KINDS, _WHO = frozenset(kind.encode() for kind in model.EVENT_TYPES), frozenset((b"bot", b"human"))

Clause = tuple[str, tuple[str, ...]]


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise SettingsError(f"bad route name {name!r}: use 1-40 of a-z, 0-9, '-' and '_', starting with a letter or digit")
    return name


def parse_where(text: str) -> Clause:
    """'FIELD=V1,V2' -> (field, values), normalised (bot: true/false; namespace: a number); a clear error else."""
    name, sep, raw = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in FIELDS:
        raise SettingsError(f"bad --where {text!r}: use FIELD=V1,V2 with FIELD one of {', '.join(FIELDS)}")
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not values:
        raise SettingsError(f"bad --where {text!r}: no value after '='")
    if len(values) > MAX_VALUES:
        raise SettingsError(f"bad --where {name}=...: {len(values)} values, at most {MAX_VALUES}")
    out = []
    for value in values:
        v = value.lower()
        if name == "domain" and not is_valid_domain(v):
            raise SettingsError(f"bad --where domain={value!r}: not a domain (e.g. en.wikipedia.org)")
        if name == "type" and v not in model.EVENT_TYPES:
            raise SettingsError(f"bad --where type={value!r}: one of {', '.join(model.EVENT_TYPES)}")
        if name == "bot" and v not in ("true", "false"):
            raise SettingsError(f"bad --where bot={value!r}: true or false")
        if name == "namespace":
            if not v.isdigit() or int(v) >= MAX_NAMESPACE:
                raise SettingsError(f"bad --where namespace={value!r}: a namespace number, 0 or more (0 = articles)")
            v = str(int(v))
        out.append(v)
    return name, tuple(dict.fromkeys(out))


def parse_filter(wheres: Sequence[str]) -> list[Clause]:
    if not wheres:
        raise SettingsError("a route needs at least one --where FIELD=V1,V2 (a route of everything is wiki:events itself)")
    if len(wheres) > MAX_CLAUSES:
        raise SettingsError(f"at most {MAX_CLAUSES} --where, not {len(wheres)}")
    return [parse_where(w) for w in wheres]


# A fold summary's head, split: [domain, time, type, bot|human, namespace] (summary.summarize), as bytes. The filters
# compare its parts with their values as the summary writes them: no parse, no conversion (this runs for every entry).
Head = list[bytes]
Matcher = Callable[[Head], bool]


def _as_written(name: str, value: str) -> bytes:
    if name == "bot":
        return b"bot" if value == "true" else b"human"
    return value.encode()


def matcher(clauses: Sequence[Clause]) -> Matcher:
    """The filter as a predicate on a Head: every clause holds, each by one of its values."""
    tests = [(_INDEX[name], frozenset(_as_written(name, v) for v in values)) for name, values in clauses]
    if len(tests) == 1:
        ((i, a),) = tests
        return lambda head: head[i] in a
    if len(tests) == 2:
        (i, a), (j, b) = tests
        return lambda head: head[i] in a and head[j] in b
    return lambda head: all(head[i] in allowed for i, allowed in tests)


def describe(clauses: Sequence[Clause]) -> str:
    return " ".join(f"--where {name}={','.join(values)}" for name, values in clauses)


@dataclass
class Definition:
    name: str
    where: list[Clause]
    start: str  # the ingest stream's last id when declared: the route holds what came after ("0-0": all it held)
    token: str  # tells a definition from a later one of the same name
    created: float = 0.0

    def dumps(self) -> bytes:
        return orjson.dumps({"where": self.where, "start": self.start, "token": self.token, "created": self.created})

    @classmethod
    def loads(cls, name: str, raw: bytes) -> Definition:
        d = orjson.loads(raw)
        return cls(name, [(str(f), tuple(str(v) for v in vs)) for f, vs in d["where"]], str(d["start"]), str(d["token"]),
                   float(d.get("created", 0)))  # fmt: skip


def id_key(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


@lru_cache(maxsize=65536)
def _domain_ok(raw: bytes) -> bool:
    text = raw.decode("ascii", "replace")
    return is_valid_domain(text) and text != CANARY_DOMAIN


def head_of(fields: list[bytes], max_bytes: int) -> Head | None:
    """What the entry's filter fields are: from its fold summary (the publisher's entries), else its JSON; None for an
    entry that is no event (the subscriber counts it as rejected). Checked as fold.parse_summary checks a summary."""
    fold = fields[3] if len(fields) == 4 and fields[2] == _FOLD else None
    named = None
    if fold is None:
        named = dict(zip(fields[::2], fields[1::2], strict=False))
        fold = named.get(_FOLD)
    if fold is not None:
        head = fold.partition(b"\t")[0].split(b" ")
        if len(head) == 4:
            head.append(b"-")  # written before the namespace was
        if len(head) == 5 and head[2] in _KINDS and head[3] in _WHO and _domain_ok(head[0]):
            return head
    named = named if named is not None else dict(zip(fields[::2], fields[1::2], strict=False))
    verdict = validate(named.get(_DATA, b""), max_bytes)
    return summarize(observe(verdict.event)).encode().split(b" ") if isinstance(verdict, Accepted) else None


def heads_of(entries: Sequence[Entry], max_bytes: int) -> tuple[list[Head | None], int]:
    """Each entry's Head (None for a trimmed one or no event), and how many entries held no event."""
    out = [head_of(fields, max_bytes) if fields is not None else None for _, fields in entries]
    return out, sum(1 for head, (_, fields) in zip(out, entries, strict=True) if head is None and fields is not None)


def load_definitions(raw: Mapping[bytes, bytes]) -> tuple[dict[str, Definition], dict[bytes, Exception]]:
    """The definitions stored in keys.ROUTES, checked as `route add` checks them: ({name: definition}, {name: why} for
    those that cannot be read)."""
    wanted: dict[str, Definition] = {}
    refused: dict[bytes, Exception] = {}
    for name, value in raw.items():
        try:
            d = Definition.loads(name.decode(), value)
            check_name(d.name)
            parse_filter([f"{f}={','.join(vs)}" for f, vs in d.where])
        except (ValueError, KeyError, TypeError) as exc:
            refused[name] = exc
            continue
        wanted[d.name] = d
    return wanted, refused


def lua_filters(routes: Sequence[tuple[Sequence[Clause], tuple[int, int]]]) -> str:
    """The routes' filters for READ_SCRIPT: per route, [its clauses as [part of the head (1-based), {value: 1, ...}], the
    id it holds what came after (its start, or where its catch-up ended)]."""
    return orjson.dumps([
        [[[_INDEX[name] + 1, {_as_written(name, v).decode(): 1 for v in values}] for name, values in where], f"{after[0]}-{after[1]}"]
        for where, after in routes
    ]).decode()  # fmt: skip


# What the scripts that judge entries in Redis (route_judge.lua) are told before their text: the event types, a set.
LUA_KINDS = "local kinds = {" + ", ".join(f"['{kind}'] = true" for kind in model.EVENT_TYPES) + "}\n"
