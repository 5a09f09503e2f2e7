"""Send only what moved: a pushed refresh updates the page's figure with a Dash Patch, not the whole figure again.

A figure is a trace per picked domain (and dimension) over the window's buckets. Between two pushes the window
slides by a bucket or none, and a batch moves the buckets from its earliest event on (the notice's "from",
push.NoticeHub.moved_since). So a patch drops the buckets that left the window, re-sends the ones that moved and
appends the new ones; a trace where many moved (a backfill) gets its values whole, but never its timestamps again,
which are most of a figure's bytes. The shapes (the filling band, the spike marks) are small and are sent whole.

The page keeps what its figure shows in a store beside it (`shown`, from `shown_state`). A patch is made only when
that describes the same selection and zoom, so a page that missed anything gets the whole figure. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import orjson
from dash import Patch

from wikipulse.dashboard.view import Selection, ui_revision, zoomed_ranges

MAX_PATCHED_SHARE = 0.5  # when more of the window than this moved, the whole figure is as small and simpler
MAX_ELEMENT_OPS = 8  # past this many values to drop or re-send in a trace, its whole y is sent (x is the heavy part)


def shown_state(sel: Selection, zoom: Any, buckets: list[int], traces: int, mark: str) -> dict[str, Any]:
    """What a figure shows, for the page's `shown` store: the next pushed refresh patches from it."""
    ranges = zoomed_ranges(zoom, sel)
    view = ui_revision(sel) + "|" + orjson.dumps(ranges, option=orjson.OPT_SORT_KEYS).decode()
    first, last = (buckets[0], buckets[-1]) if buckets else (None, None)
    # The selection and zoom again, as values: the push (push_routes.py) computes the page's next update from them.
    args = [list(sel.domains), sel.resolution, sel.window, sel.breakdown, sel.who, sel.namespace]
    zoomed = {"rev": ui_revision(sel), **ranges} if ranges else None
    return {"view": view, "mark": mark, "first": first, "last": last, "traces": traces, "args": args, "zoom": zoomed}


@dataclass(frozen=True)
class PatchPlan:
    """How the page's figure becomes the new one: drop `dropped` buckets in front, re-send `resent` values from
    index `start` (the whole y when that takes more operations than values), append `added` buckets. Only the
    buckets from `read_from` on need reading."""

    dropped: int
    start: int
    resent: int
    added: int
    read_from: int

    @property
    def whole_y(self) -> bool:
        return self.dropped + self.resent > MAX_ELEMENT_OPS  # an operation per value costs more than the values


def plan_patch(shown: Any, now: dict[str, Any], step: int, since: float | None) -> PatchPlan | None:
    """How to patch the figure `shown` describes into the one `now` describes (both from shown_state), or None when
    the whole figure should be sent: another selection or zoom, an unknown `since` (None), or most of the window
    moved. `since` is the earliest bucket moved after `shown` was drawn (inf: none)."""
    if not isinstance(shown, dict) or since is None or now["first"] is None:
        return None
    old_first, old_last = shown.get("first"), shown.get("last")
    if (shown.get("view"), shown.get("traces")) != (now["view"], now["traces"]):
        return None
    if not (isinstance(old_first, int) and isinstance(old_last, int)):
        return None
    first, last = now["first"], now["last"]
    if not (old_first <= first <= old_last <= last) or (first - old_first) % step or (last - old_last) % step:
        return None
    dropped = (first - old_first) // step
    added = (last - old_last) // step
    moved_from = old_last + step if since == math.inf else max(first, int(since) - int(since) % step)
    resent = max(0, (old_last - moved_from) // step + 1)
    if dropped > MAX_ELEMENT_OPS or dropped + resent + added > MAX_PATCHED_SHARE * ((last - first) // step + 1):
        return None
    start = (moved_from - first) // step  # index of the first moved bucket once the dropped ones are gone
    plan = PatchPlan(dropped, start, resent, added, min(moved_from, old_last + step))
    return replace(plan, read_from=first) if plan.whole_y else plan


def figure_patch(plan: PatchPlan, figure: dict[str, Any]) -> Patch:
    """The Patch that `plan` makes of the new `figure` (whose values before plan.read_from are not used)."""
    patch = Patch()
    for i, trace in enumerate(figure["data"]):
        patch_trace(patch["data"][i], trace, plan)
    patch["layout"]["shapes"] = figure["layout"]["shapes"]
    patch["layout"]["annotations"] = figure["layout"]["annotations"]
    return patch


def patch_trace(target: Patch, trace: dict[str, Any], plan: PatchPlan) -> None:
    for _ in range(plan.dropped):
        del target["x"][0]
    if plan.added:
        target["x"].extend(trace["x"][-plan.added :])
    if plan.whole_y:
        target["y"] = trace["y"]
        return
    for _ in range(plan.dropped):
        del target["y"][0]
    for j in range(plan.start, plan.start + plan.resent):
        target["y"][j] = trace["y"][j]
    if plan.added:
        target["y"].extend(trace["y"][-plan.added :])
