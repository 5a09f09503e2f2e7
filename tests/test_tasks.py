"""core/tasks.py: sibling roles stop together, a background task cannot die unseen, errors come out as themselves."""

from __future__ import annotations

import asyncio
import logging

import pytest

from wikipulse.core.tasks import background, run_together, together


class Boom(Exception):
    pass


async def forever(stopped: list[str], name: str, started: asyncio.Event | None = None) -> None:
    try:
        if started is not None:
            started.set()
        await asyncio.Event().wait()
    finally:
        stopped.append(name)


async def fails_when(event: asyncio.Event, error: Exception) -> None:
    await event.wait()
    raise error


async def test_one_role_failing_stops_the_others_and_its_own_error_is_raised() -> None:
    stopped: list[str] = []
    up = asyncio.Event()
    with pytest.raises(Boom, match="the router broke"):  # itself, not an ExceptionGroup: `except Boom` works
        await run_together({"publisher": forever(stopped, "publisher", up), "router": fails_when(up, Boom("the router broke"))})
    assert stopped == ["publisher"]


async def test_the_cause_is_raised_once_when_several_fail_together(caplog: pytest.LogCaptureFixture) -> None:
    go = asyncio.Event()
    go.set()
    with pytest.raises(Boom, match="first"):
        await run_together({"a": fails_when(go, Boom("first")), "b": fails_when(go, Boom("second"))})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # the second: at debug level only


async def test_a_background_task_that_dies_stops_the_body_and_is_said(caplog: pytest.LogCaptureFixture) -> None:
    body_stopped = asyncio.Event()
    go = asyncio.Event()

    async def body() -> None:
        async with background(fails_when(go, Boom("renewal broke")), "the lease renewal"):
            try:
                go.set()
                await asyncio.Event().wait()
            finally:
                body_stopped.set()

    with pytest.raises(Boom, match="renewal broke"):
        await body()
    assert body_stopped.is_set()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and "the lease renewal failed" in said[0], said


async def test_a_background_task_is_stopped_when_the_body_ends_and_the_body_error_passes_as_itself() -> None:
    stopped: list[str] = []
    started = asyncio.Event()
    async with background(forever(stopped, "stats", started), "stats"):
        await started.wait()
    assert stopped == ["stats"]
    started.clear()

    async def body() -> None:
        async with background(forever(stopped, "again", started), "stats"):
            await started.wait()
            raise KeyError("the body's")

    with pytest.raises(KeyError):
        await body()
    assert stopped == ["stats", "again"]


async def test_a_cancellation_from_outside_stops_everything_and_stays_a_cancellation() -> None:
    stopped: list[str] = []
    started = asyncio.Event()

    async def main() -> None:
        async with background(forever(stopped, "background", started), "background"):
            await run_together({"role": forever(stopped, "role")})

    task = asyncio.create_task(main())
    await started.wait()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(stopped) == ["background", "role"]


async def test_an_error_keeps_its_own_cause() -> None:
    async def role() -> None:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise Boom("outer") from exc

    with pytest.raises(Boom) as caught:
        async with together() as group:
            group.create_task(role())
    assert isinstance(caught.value.__cause__, KeyError)
