"""The dashboard's pure parts with plain values: selection checks, figure, header, ticker, CSV."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from wikipulse.core import model
from wikipulse.dashboard.layout import render
from wikipulse.dashboard.lists_view import ListFilter, alert_marks, clean_filter, trending_rows
from wikipulse.dashboard.view import (
    Selection,
    SelectionError,
    Snapshot,
    clean_selection,
    default_domains,
    events_per_second,
    fill_gaps,
    filling_from,
    header,
    make_figure,
    query_from_selection,
    selection_from_query,
    stale_seconds,
    ticker_rows,
    to_frame,
    ui_revision,
    utc_iso,
    zoomed_ranges,
)
from wikipulse.fold.trending import Trend, links
from wikipulse.store import keys

NOW = 1_700_000_005.0
BUCKETS = [1_699_999_970, 1_699_999_980, 1_699_999_990, 1_700_000_000]


def snapshot(**kw: object) -> Snapshot:
    base = dict(
        now=NOW,
        buckets=BUCKETS,
        series={
            keys.ALL_DOMAINS: {"": [None, 10, 12, 3]},
            "a.org": {"": [None, 4, None, 1], "edit": [None, 4, None, 1]},
        },
        publisher={"updated_at": NOW - 1, "last_publish_at": NOW - 1, "lag_seconds": 1.5},
        recent_10s=[10, 12, 3],
        last_hour_1m=[100, None, 50],
        ranked_hour=[("b.org", 5.0), ("a.org", 9.0)],
        ranked_5min=[("a.org", 2.0)],
    )
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "domains", [["a.org}"], ["{a.org}"], ["a org"], ["A.org"], [5], "x" * 300, ["a.org"] * 13, {"a": 1}, ["*"], ["a.org\r\nFLUSHALL"]]
)
def test_hostile_domains_are_refused(domains: object) -> None:
    with pytest.raises(SelectionError):
        clean_selection(domains, "10s", "30m", "total")


@pytest.mark.parametrize(("res", "by"), [("2s", "total"), ("10s", "evil"), (None, "total")])
def test_unknown_resolution_or_breakdown_refused(res: object, by: object) -> None:
    with pytest.raises(SelectionError):
        clean_selection(["a.org"], res, "30m", by)


def test_window_falls_back_to_the_resolution_default() -> None:
    assert clean_selection(["a.org"], "1h", "30m", "bot").window == "7d"


def test_url_round_trip() -> None:
    sel = Selection(("a.org", "b.org"), "1m", "6h", "type")
    raw = selection_from_query(query_from_selection(sel))
    assert clean_selection(raw["domains"], raw["resolution"], raw["window"], raw["breakdown"]) == sel


def test_default_domains_include_enwiki_when_active() -> None:
    ranked = [("commons.wikimedia.org", 50.0), ("www.wikidata.org", 20.0), ("de.wikipedia.org", 9.0), ("en.wikipedia.org", 8.0)]
    assert default_domains(ranked) == ["commons.wikimedia.org", "www.wikidata.org", "en.wikipedia.org"]
    assert default_domains(ranked[:3]) == ["commons.wikimedia.org", "www.wikidata.org", "de.wikipedia.org"]


def test_gaps_only_where_the_pipeline_recorded_nothing() -> None:
    assert fill_gaps([None, 4, None, 1], [False, True, True, True]) == [None, 4, 0, 1]


def test_figure_has_one_trace_per_domain_and_dimension_and_marks_the_filling_bucket() -> None:
    sel = Selection(("a.org",), "10s", "30m", "type")
    fig = go.Figure(make_figure(snapshot(), sel))  # Plotly's own validators: a typo in the dict fails here
    names = [t.name for t in fig.data]
    assert names == [f"a.org · {t}" for t in model.EVENT_TYPES]
    edit = fig.data[0]
    assert list(edit.y) == [None, 4, 0, 1]
    assert edit.x[0] == "2023-11-14T22:12:50"  # BUCKETS[0] as a naive UTC timestamp
    assert fig.layout.shapes[0].x0 == edit.x[-2] and fig.layout.annotations[0].text == "filling"
    assert fig.layout.uirevision == "a.org|10s|30m|type|all|all"


def test_buckets_within_the_ingest_lag_are_marked_filling() -> None:
    assert filling_from(snapshot(), 10) == BUCKETS[-2]  # lag 1.5 s + the emit delay: events of 11.5 s ago still arrive
    assert filling_from(snapshot(publisher={"lag_seconds": 12}), 10) == BUCKETS[-3]
    assert filling_from(snapshot(publisher={"lag_seconds": 9999}), 10) == BUCKETS[0]  # capped at the shown range
    assert filling_from(snapshot(publisher={"lag_seconds": "x"}), 10) == BUCKETS[-2]


def test_header_and_stale() -> None:
    head = header(snapshot())
    assert head == {"eps": "1.0", "hour": "150", "active": "1", "lag": "1.5 s", "publisher": "running"}
    assert stale_seconds(snapshot()) is None
    assert stale_seconds(snapshot(publisher={"last_publish_at": NOW - 61})) == pytest.approx(61)
    assert stale_seconds(snapshot(publisher={})) == float("inf")
    assert events_per_second([5, 6]) is None


def test_ticker_links_only_http() -> None:
    rows = ticker_rows([
        {"meta": {"domain": "a.org"}, "type": "edit", "title": "T", "title_url": "javascript:alert(1)", "user": "u", "bot": True},
        {"meta": {"domain": "a.org"}, "type": "new", "title": "U", "title_url": "https://a.org/wiki/U", "user": "v"},
    ])  # fmt: skip
    assert [r["url"] for r in rows] == [None, "https://a.org/wiki/U"]
    assert [r["bot"] for r in rows] == [True, False]


def test_csv_frame() -> None:
    frame = to_frame(snapshot(), Selection(("a.org",), "10s", "30m", "total"))
    assert list(frame.columns) == ["bucket_start", "a.org"]
    assert frame["a.org"].tolist()[1:] == [4, 0, 1]


def test_render_ranks_options_and_top_lists() -> None:
    out = render(snapshot(), Selection(("c.org",), "10s", "30m", "total"))
    options = out[1]
    assert [o["value"] for o in options] == ["a.org", "b.org", "c.org"]  # ranked, and the picked one kept
    assert out[8] == {"display": "none"}  # no stale banner


def test_the_users_zoom_applies_only_to_the_selection_it_was_made_on() -> None:
    sel = Selection(("a.org",), "10s", "30m", "total")
    zoom = {"rev": ui_revision(sel), "xaxis": ["2023-11-14 22:12:55", "2023-11-14 22:13:10"], "yaxis": [0, "x" * 100]}
    layout = make_figure(snapshot(), sel, zoom)["layout"]
    assert layout["xaxis"]["range"] == zoom["xaxis"] and layout["xaxis"]["autorange"] is False
    assert layout["yaxis"]["range"] == [0, "x" * 40]  # strings from the browser are cut short
    other = Selection(("a.org", "b.org"), "10s", "30m", "total")
    assert "range" not in make_figure(snapshot(), other, zoom)["layout"]["xaxis"]  # a new selection starts unzoomed
    assert zoomed_ranges({"rev": ui_revision(sel), "xaxis": [True, {"a": 1}]}, sel) == {}
    assert zoomed_ranges("garbage", sel) == {}


def test_entries_trimmed_unread_are_said_on_the_page() -> None:
    now = 1_000_000.0
    snap = Snapshot(now=now, buckets=[], series={}, publisher={"last_publish_at": now, "trimmed_unread:wikipulse": 8996})
    sel = Selection(("en.wikipedia.org",))
    rendered = render(snap, sel)
    assert "8,996 events were trimmed from the stream before consumer group 'wikipulse' read them" in rendered[7]
    assert rendered[8] == {"display": "block"}
    assert render(Snapshot(now=now, buckets=[], series={}, publisher={"last_publish_at": now}), sel)[8] == {"display": "none"}


def test_who_shows_the_total_of_humans_or_bots_only() -> None:
    assert clean_selection(["a.org"], "10s", None, "total", "humans").dims == ("human",)
    assert clean_selection(["a.org"], "10s", None, "total", "bots").dims == ("bot",)
    assert clean_selection(["a.org"], "10s", None, "type", "humans").dims == model.EVENT_TYPES  # no type x bot split stored
    assert clean_selection(["a.org"], "10s", None, "total", "<script>").who == "all"


def test_the_namespace_narrows_the_total_and_the_bot_breakdown() -> None:
    assert clean_selection(["a.org"], "10s", None, "total", "all", "0").dims == ("ns0",)
    assert clean_selection(["a.org"], "10s", None, "total", "humans", "0").dims == ("ns0human",)
    assert clean_selection(["a.org"], "10s", None, "total", "bots", "0").dims == ("ns0bot",)
    assert clean_selection(["a.org"], "10s", None, "total", "bots", "14").dims == ("bot",)  # the lists' filter only
    assert clean_selection(["a.org"], "10s", None, "bot", "all", "0").dims == ("ns0bot", "ns0human")
    assert clean_selection(["a.org"], "10s", None, "type", "all", "0").dims == model.EVENT_TYPES  # no type x namespace
    for crafted in ("3", "ns0", "0 ", 0, None, ["0"]):
        assert clean_selection(["a.org"], "10s", None, "total", "all", crafted).namespace == "all"
    sel = clean_selection(["a.org"], "10s", "30m", "bot", "all", "0")
    snap = snapshot()
    snap.series["a.org"].update({"ns0bot": [None, 1, 0, 0], "ns0human": [None, 2, 0, 1]})
    figure = go.Figure(make_figure(snap, sel))
    assert [t.name for t in figure.data] == ["a.org · articles · bot", "a.org · articles · human"]
    assert figure.layout.yaxis.title.text == "events per 10s · articles"
    by_type = make_figure(snap, clean_selection(["a.org"], "10s", "30m", "type", "all", "0"))
    assert by_type["layout"]["yaxis"]["title"]["text"] == "events per 10s · all namespaces (by type)"
    category = make_figure(snap, clean_selection(["a.org"], "10s", "30m", "total", "all", "14"))
    assert category["layout"]["yaxis"]["title"]["text"] == "events per 10s · all namespaces (only articles are split out)"
    assert selection_from_query(query_from_selection(sel))["ns"] == "0"


def test_the_url_keeps_the_filters() -> None:
    sel = clean_selection(["a.org"], "1m", "6h", "total", "humans", "0")
    query = query_from_selection(sel, 60)
    wanted = selection_from_query(query)
    assert (wanted["who"], wanted["ns"], wanted["trend"]) == ("humans", "0", 60)
    lists = clean_filter(wanted["who"], wanted["ns"], wanted["trend"])
    assert (lists.humans, lists.namespaces, lists.minutes) == (True, [0], 60)
    assert clean_filter("x", "javascript:", 7) == ListFilter()  # anything else: the defaults


def test_alerts_are_marked_for_the_picked_wikis_within_the_range() -> None:
    sel = clean_selection(["a.org"], "1m", "6h", "total")
    alerts = [{"domain": "a.org", "minute": 600}, {"domain": "b.org", "minute": 600}, {"domain": "a.org", "minute": 6000}]
    shapes, notes = alert_marks(alerts, sel, 0, 3600)
    assert [s["x0"] for s in shapes] == [utc_iso(600)] and notes[0]["text"] == "spike · a.org"


def test_list_links_quote_what_the_feed_sends() -> None:
    hostile = 'x" onmouseover="alert(1)&a=<b>'
    url = links("en.wikipedia.org", hostile, 5)
    assert url["history"].startswith("https://en.wikipedia.org/w/index.php?title=x%22_onmouseover%3D%22alert%281%29%26a%3D%3Cb%3E&")
    assert url["diff"] == "https://en.wikipedia.org/w/index.php?diff=5"
    row = trending_rows([Trend("en.wikipedia.org", 0, hostile, 3, 2, -5)])[1]
    assert row.children[0].children.children == hostile  # a text child: React escapes it


def test_events_stamped_ahead_of_the_clock_are_said_on_the_page() -> None:
    """A resumed simulation, or a feed whose clock is off: its events land in buckets the page does not show yet,
    and the page used to show an empty graph and a negative lag only."""
    now = 1_000_000.0
    sel = Selection(("en.wikipedia.org",))

    def banner(lag: float) -> tuple[str, dict[str, str]]:
        rendered = render(Snapshot(now=now, buckets=[], series={}, publisher={"last_publish_at": now, "lag_seconds": lag}), sel)
        return rendered[7], rendered[8]

    assert banner(-87.7) == ("Events arrive stamped 88 s ahead of this clock: the graph shows them only once their time comes.",
                             {"display": "block"})  # fmt: skip
    assert "3,600 s ahead" in banner(-3600)[0] and "counted as `future` and not shown" in banner(-3600)[0]
    assert banner(-20.0) == ("", {"display": "none"})  # the simulator's meta.dt, up to 27 s ahead of a live simulation
    assert banner(4.0) == ("", {"display": "none"})
