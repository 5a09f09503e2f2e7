"""A pushed update, computed once per view and version, and shared by every page that shows that view.

A public page has many viewers of few views (most see the default one). The push (socket_push.py) knows what each
page shows (its `shown` store: the selection, the zoom, the version its figure was drawn at), and the update from
there to the current version is computed once, in a worker thread (it reads Redis), and serialised once; each further
page showing the same is sent that same text. Work per update grows with the distinct views, not pages.

The update goes to the page's `pushed` store with what it applies to (`for`) and what the page then shows (`then`);
the page applies it only when its graph still shows `for` (APPLY_TO_GRAPH), so an update crossing a redraw of the page
(a new selection, drawn over HTTP) is dropped, not applied to the wrong figure. The server takes `then` as what the
page shows next; whenever that is not so (the page was redrawn over HTTP, zoomed, or dropped an update), the page says
what it shows over its socket (WATCH_SHOWN, then dashboard's resync callback), and is pushed to from there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import orjson
from dash._utils import to_json

T = TypeVar("T")
SAME_MOMENT = 5.0  # seconds the updates of one version are drawn at its first one's time
MAX_VIEWS = 512  # distinct updates kept per version; past it (crafted states) each is computed for its page alone


class UpdateCache:
    """Updates by (key, version): each computed once, by the first page that needs it; the others wait for it."""

    def __init__(self) -> None:
        self.version = -1
        self.started = 0.0  # when the current version was first asked for
        self._entries: dict[bytes, asyncio.Future[Any]] = {}
        self.computed = 0  # updates computed (not shared): a test and the bench read it

    async def get(self, key: bytes, version: int, make: Callable[[], T]) -> T:
        if version > self.version:  # an older version's updates are not asked for again, but by a page behind
            self.version, self._entries, self.started = version, {}, time.time()
        elif version < self.version:
            self.computed += 1
            return await asyncio.to_thread(make)
        entry = self._entries.get(key)
        if entry is not None and entry.done():  # most pages: the update is made already
            return cast(T, entry.result())
        if entry is None:
            self.computed += 1
            entry = asyncio.ensure_future(asyncio.to_thread(make))
            if len(self._entries) < MAX_VIEWS:
                self._entries[key] = entry
        return cast(T, await asyncio.shield(entry))


    def now(self, version: int) -> float:
        """The time the updates of `version` are drawn at: the same for all of them while it is recent, so pages that
        showed different moments before it show the same one after it (and share every update from then on)."""
        now = time.time()
        return self.started if version == self.version and now - self.started < SAME_MOMENT else now


def cache_key(kind: str, value: Any) -> bytes:
    return kind.encode() + orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def pushed_payload(applies_to: Any, then: Any, props: list[tuple[str, str, Any]]) -> str:
    """The `pushed` store's value, as JSON text: set these props when the page still shows `applies_to`, then set
    the store that describes it to `then`."""
    return str(to_json({"for": applies_to, "then": then, "props": [list(p) for p in props]}))  # type: ignore[no-untyped-call]


def message_head(renderer: str) -> str:
    """The start of Dash's set_props messages to one page (made once per page)."""
    return orjson.dumps({"type": "set_props", "rendererId": renderer}).decode()[:-1]


def set_props_message(head: str, component: str, data_json: str) -> str:
    """Dash's set_props message for the page of `head`, around an already serialised value (shared by many pages)."""
    return f'{head},"payload":{{"componentId":"{component}","props":{{"data":{data_json}}}}}}}'


# Applies a pushed update in the page (see the module docstring): `current` is the store describing what it shows.
# One it cannot apply means the server is wrong about what the page shows: the page says so (`resync`).
APPLY_PUSHED = """function (pushed, current, resync) {
    const nothing = dash_clientside.no_update;
    if (!pushed) { return [nothing, nothing]; }
    if (!current || JSON.stringify(pushed.for) !== JSON.stringify(%s)) { return [nothing, (resync || 0) + 1]; }
    for (const [id, prop, value] of pushed.props) { dash_clientside.set_props(id, {[prop]: value}); }
    return [pushed.then, nothing];
}"""
APPLY_TO_GRAPH = APPLY_PUSHED % "[current.view, current.mark, current.first, current.last, current.traces]"
APPLY_TO_LISTS = APPLY_PUSHED % "current"


# What the page shows changed, and not by a push (a redraw over HTTP, a zoom): it says so over its socket (`resync`),
# once it is pushed to at all (a page without a socket never is, and never calls the socket for it).
WATCH_SHOWN = """function (shown, lists, pushed, listsPushed, resync) {
    const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);
    if (!pushed && !listsPushed) { return dash_clientside.no_update; }
    if ((!pushed || same(shown, pushed.then)) && (!listsPushed || same(lists, listsPushed.then))) {
        return dash_clientside.no_update;
    }
    return (resync || 0) + 1;
}"""


def drawn(shown: dict[str, Any]) -> list[Any]:
    """What identifies the figure a `shown` state describes (the page compares it, as APPLY_TO_GRAPH does)."""
    return [shown.get("view"), shown.get("mark"), shown.get("first"), shown.get("last"), shown.get("traces")]
