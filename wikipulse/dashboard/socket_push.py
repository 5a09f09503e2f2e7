"""One push loop per websocket, serving the socket's pages (a browser's tabs share one socket: Dash's SharedWorker).

Dash restarts the persistent push callback whenever a socket (re)connects, once per page. The first page's run is the
socket's loop; a further page of the same socket joins it; a page already served, or past PAGES_PER_SOCKET, or past
the hub's caps (NoticeHub.admit), is refused (it polls). Whenever the counts moved, at most every
MIN_PUSH_GAP, the loop sends each page the update from what it shows (view_updates.py: computed once per view and
version, shared as text); the lists at most every LISTS_MS. What a page shows is asked once, then is what the last
push made of it, until the page says otherwise (`resync`: it is pushed to from there within MIN_PUSH_GAP): a message
per page and update, not a round trip. A page that does not answer within PAGE_TIMEOUT (a tab closed behind a shared
socket; asked at most every ALIVE_CHECK) is no longer pushed to and told to poll, and a socket none of whose pages
answers is dropped, as is one that leaves more than the guard's backlog unsent (guard.Guard.push).
"""

from __future__ import annotations

import asyncio
import functools
import math
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dash.exceptions import PreventUpdate, WebsocketDisconnected

from wikipulse.dashboard.guard import Connection, Guard
from wikipulse.dashboard.push import MIN_PUSH_GAP, NoticeHub
from wikipulse.dashboard.view_updates import UpdateCache, cache_key, message_head, set_props_message
from wikipulse.store.retry import REDIS_ERRORS

PAGES_PER_SOCKET = 8  # tabs of one browser; a socket claiming more pages is crafted
PAGE_TIMEOUT = 10.0  # seconds a page has to say what it shows
ALIVE_CHECK = 60.0  # seconds between two questions to a pushed page: one that does not answer is let go
LISTS_GAP = 5.0  # seconds between two pushes of the lists (layout.LISTS_MS): they cost more than the counts
POLLING = "polling every 2 s"


@dataclass(eq=False)
class PushedPage:
    """A page a socket's loop serves: Dash's handle to it (set_props, get_props) and its status line."""

    ws: Any
    head: str  # its set_props messages' start (view_updates.set_props_message)
    status: str = ""
    shown: dict[str, Any] | None = None  # what its graph shows, as far as the server knows (None: ask)
    lists: list[Any] | None = None  # what its lists show, likewise
    said: int = 0  # times the page said what it shows: an update made before that must not overwrite it
    asking: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # store -> the question in flight; "resync":
    # the push due from what it said (its tasks end with the page)
    asked_at: float = 0.0  # when it last answered a question (or was asked one)
    busy: set[bool] = field(default_factory=set)  # graph (True) or lists (False): a push to it in flight
    again: set[bool] = field(default_factory=set)  # ... and the data moved meanwhile: push once more after it
    due: set[bool] = field(default_factory=set)  # graph or lists: to push from what the page said (resync)
    due_at: float = -math.inf  # when the last push from what it said went


class SocketPush:
    """`graph_update(shown, version)` and `lists_update(shown)` make a page's update from what it shows (in a worker
    thread: they read Redis): the `pushed` / `lists-pushed` store's JSON and what the page then shows, or None when
    it shows nothing usable."""

    def __init__(
        self,
        hub: NoticeHub,
        guard: Guard,
        graph_update: Callable[[dict[str, Any], int], tuple[str, Any] | None],
        lists_update: Callable[[list[Any]], tuple[str, Any] | None],
    ) -> None:
        self.hub, self.guard = hub, guard
        self.graph_update, self.lists_update = graph_update, lists_update
        self.cache = UpdateCache()
        self.serving: weakref.WeakValueDictionary[str, Connection] = weakref.WeakValueDictionary()  # page -> its socket

    async def serve(self, ws: Any, conn: Connection) -> None:
        """The persistent callback's run for one page of `conn`."""
        take_page(self.hub, self.guard, self.serving, ws, conn)
        if conn.pusher:
            raise PreventUpdate  # the socket's loop serves this page too
        conn.pusher = True
        try:
            await self._loop(ws, conn)
        finally:
            conn.pusher = False
            close_pages(self.hub, conn)

    async def _loop(self, ws: Any, conn: Connection) -> None:
        """Until the socket closes (Dash then cancels this task): woken by the hub (at most every MIN_PUSH_GAP)."""
        hub = self.hub
        seen: tuple[int, bool] | None = None
        # The lists of all sockets would fall due in the same wake (they opened together): each starts at its own moment.
        woken, lists_at, lists_seen = -1, time.monotonic() - random.uniform(0, LISTS_GAP), -1
        while not ws.is_shutdown and not conn.dropped.is_set():
            if hub.state != seen:
                seen = hub.state
                await self._push_all(conn, seen, graph=True)
            wait = None  # nothing to do until the next wake: no timer
            if seen[0] != lists_seen:  # the lists follow at most every LISTS_GAP
                wait = lists_at + LISTS_GAP - time.monotonic()
                if wait <= 0:
                    lists_at, lists_seen, wait = time.monotonic(), seen[0], None
                    await self._push_all(conn, seen, graph=False)
            woken = await hub.wait(woken, wait)

    async def _push_all(self, conn: Connection, state: tuple[int, bool], graph: bool) -> None:
        pages = list(conn.pages.items())
        if len(pages) == 1:  # most sockets: no task to gather
            await self._push_page(conn, *pages[0], state, graph)
        else:
            await asyncio.gather(*(self._push_page(conn, renderer, page, state, graph) for renderer, page in pages))

    async def _push_page(self, conn: Connection, renderer: str, page: PushedPage, state: tuple[int, bool], graph: bool) -> None:
        """One push to the page at a time (what it shows next is what the last one made of it), the latest after it."""
        if graph in page.busy:
            page.again.add(graph)
            return
        page.busy.add(graph)
        try:
            await self._push_one(conn, renderer, page, state, graph)
            while graph in page.again and renderer in conn.pages:
                page.again.discard(graph)
                await self._push_one(conn, renderer, page, self.hub.state, graph)
        finally:
            page.busy.discard(graph)

    async def _push_one(self, conn: Connection, renderer: str, page: PushedPage, state: tuple[int, bool], graph: bool) -> None:
        status = "live" if state[1] else "Redis unavailable: reconnecting…"
        if status != page.status:
            page.status = status
            page.ws.set_prop_sync("push-status", "children", status)
        store = "shown" if graph else "lists-shown"
        shown: Any = page.shown if graph else page.lists
        if shown is None:  # ask, without holding up the socket's other pages; it is pushed to once it answers
            if store not in page.asking:
                page.asking[store] = asyncio.create_task(self._ask(conn, renderer, page, graph))
            return
        if graph and time.monotonic() - page.asked_at > ALIVE_CHECK and "alive" not in page.asking:
            page.asking["alive"] = asyncio.create_task(check_alive(self.hub, conn, renderer, page))
        if isinstance(shown, dict) and graph:
            make = functools.partial(self.graph_update, shown, state[0])
        elif isinstance(shown, list) and not graph:
            make = functools.partial(self.lists_update, shown)
        else:
            return  # nothing a push can start from
        said = page.said
        try:
            update = await self.cache.get(cache_key(store, shown), state[0], make)
        except REDIS_ERRORS:
            return  # the status line says so, and the version after recovery catches every page up
        if update is None:
            return
        payload, then = update
        if page.said == said:  # else the page said what it shows meanwhile: that is where the next push starts
            if graph:
                page.shown = then
            else:
                page.lists = then
        await self.guard.push(conn, set_props_message(page.head, "pushed" if graph else "lists-pushed", payload))

    async def _ask(self, conn: Connection, renderer: str, page: PushedPage, graph: bool) -> None:
        store = "shown" if graph else "lists-shown"
        page.asked_at = time.monotonic()
        try:
            said = page.said
            shown = await page.ws.get_prop(store, "data", timeout=PAGE_TIMEOUT)
        except TimeoutError:  # gone (a closed tab), or too slow to be pushed to: it polls again, if it is there
            stop_pushing(self.hub, conn, renderer, page)
            return
        except WebsocketDisconnected:
            return
        finally:
            page.asking.pop(store, None)
        if page.said != said or renderer not in conn.pages:
            return
        if graph and isinstance(shown, dict):
            page.shown = shown
        elif not graph and isinstance(shown, list):
            page.lists = shown
        else:
            return  # not drawn yet: asked again at the next push
        await self._push_page(conn, renderer, page, self.hub.state, graph)

    def resync(self, ws: Any, conn: Connection, shown: Any, lists: Any) -> None:
        """The page says what it shows (it was redrawn over HTTP, zoomed, or could not apply an update): it is pushed
        to from there within MIN_PUSH_GAP (a redraw computed before a notice may have landed after that notice's push)."""
        renderer = page_id(ws)
        if (page := conn.pages.get(renderer)) is None:
            return
        if isinstance(shown, dict) and shown != page.shown:  # only what moved: a push that sets what it already said
            page.due.add(True)  # would make it say so again, and again
        if isinstance(lists, list) and lists != page.lists:
            page.due.add(False)
        page.said += 1
        page.shown = shown if isinstance(shown, dict) else None
        page.lists = lists if isinstance(lists, list) else None
        if page.due and "resync" not in page.asking:
            page.asking["resync"] = asyncio.create_task(self._push_due(conn, renderer, page))

    async def _push_due(self, conn: Connection, renderer: str, page: PushedPage) -> None:
        """At most every MIN_PUSH_GAP, as the hub's wakes: a page says what it shows at its own pace (a crafted one
        with another view each message), and each push of a new view is computed."""
        await asyncio.sleep(page.due_at + MIN_PUSH_GAP - time.monotonic())
        page.asking.pop("resync", None)
        if renderer not in conn.pages:
            return
        page.due_at, due, page.due = time.monotonic(), page.due, set()
        await asyncio.gather(*(self._push_page(conn, renderer, page, self.hub.state, graph) for graph in due))


def take_page(hub: NoticeHub, guard: Guard, serving: weakref.WeakValueDictionary[str, Connection], ws: Any, conn: Connection) -> None:
    """Serve the page of `ws` on `conn` from now on, or refuse it (PreventUpdate). A page back on a new socket is let go
    from its old one first (its place there is its own), and one refused that was pushed to before polls again."""
    renderer = page_id(ws)
    if renderer in conn.pages:
        guard.refuse("the push started again on one socket")
        raise PreventUpdate  # it is served already
    if (before := serving.get(renderer)) is not None and before is not conn:
        let_go(hub, before, renderer)  # its old socket, if still open, is not its any more
    if len(conn.pages) >= PAGES_PER_SOCKET:  # more tabs than a browser's: crafted, or tabs closed without a word
        guard.refuse("more pages on one socket than a browser's tabs")
        if before is not None:  # its polling was turned off: on again (a page never pushed to polls already)
            set_polling(ws, f"busy: {POLLING}")
        raise PreventUpdate
    if not hub.admit(conn.address):
        set_polling(ws, f"busy: {POLLING}")
        raise PreventUpdate
    conn.pages[renderer] = PushedPage(ws, message_head(renderer))
    hub.page_opened(conn.address)
    serving[renderer] = conn
    ws.set_prop_sync("tick", "disabled", True)
    ws.set_prop_sync("lists-tick", "disabled", True)


def page_id(ws: Any) -> str:
    """The page a websocket callback runs for (Dash 4.4's handle keeps it private)."""
    return str(ws._renderer_id)


async def check_alive(hub: NoticeHub, conn: Connection, renderer: str, page: PushedPage) -> None:
    """A tab closed behind a socket its other tabs keep open says nothing: one that does not answer is let go."""
    page.asked_at = time.monotonic()
    try:
        await page.ws.get_prop("shown", "data", timeout=PAGE_TIMEOUT)
    except TimeoutError:
        stop_pushing(hub, conn, renderer, page)
    except WebsocketDisconnected:
        pass
    finally:
        page.asking.pop("alive", None)


def close_pages(hub: NoticeHub, conn: Connection) -> None:
    """The socket's loop ended (it closed): none of its pages is served any more."""
    for page in conn.pages.values():
        hub.page_closed(conn.address)
        for task in page.asking.values():
            task.cancel()
    conn.pages.clear()


def let_go(hub: NoticeHub, conn: Connection, renderer: str) -> None:
    """Stop serving a page on `conn`, without a word to it: it is pushed to over another socket now. A page whose
    socket was replaced (Dash reconnects a socket it thinks dead) would else count twice while the old one is open."""
    page = conn.pages.pop(renderer, None)
    if page is not None:
        hub.page_closed(conn.address)
        for task in page.asking.values():
            task.cancel()
        if not conn.pages:
            conn.drop()


def stop_pushing(hub: NoticeHub, conn: Connection, renderer: str, page: PushedPage) -> None:
    if conn.pages.pop(renderer, None) is not None:
        hub.page_closed(conn.address)
        set_polling(page.ws, POLLING)
        if not conn.pages:
            conn.drop()  # none of its pages answers: a socket nobody reads, holding what was queued on it


def set_polling(ws: Any, status: str) -> None:
    """The page refreshes itself over HTTP again (layout's tick and lists-tick), and says so."""
    ws.set_prop_sync("tick", "disabled", False)
    ws.set_prop_sync("lists-tick", "disabled", False)
    ws.set_prop_sync("push-status", "children", status)
