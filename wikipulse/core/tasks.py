"""Tasks run side by side: sibling roles that stop together, background tasks that cannot die unseen.

`asyncio.gather` of sibling loops leaves the others running when one fails, and a task started with `create_task`
and never awaited dies silently. Both are built here on `asyncio.TaskGroup` (one failure cancels the rest and is
raised once everything stopped); its error is raised itself, not wrapped in an ExceptionGroup, so that callers'
`except` clauses and the entry point's one-line error messages work as for a plain `await`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def together() -> AsyncIterator[asyncio.TaskGroup]:
    """An asyncio.TaskGroup whose first error (a task's or the body's) is raised as itself. Errors raised alongside
    it (often the same cause seen by several tasks) are logged at debug level: the cause is said once."""
    error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as errors:
        first, *others = _leaves(errors)
        for other in others:
            logger.debug("also failed: %s: %s", type(other).__name__, other)
        error = first
    if error is not None:
        raise error  # outside the `except`: its own cause and traceback, not the group as its context


def _leaves(errors: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in errors.exceptions:
        found += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return found


async def run_together(roles: Mapping[str, Coroutine[Any, Any, None]]) -> None:
    """Run sibling roles ({task name: coroutine}) until all end. The first to fail cancels the others; once they
    stopped, its error is raised here."""
    async with together() as group:
        for name, role in roles.items():
            group.create_task(role, name=name)


@contextlib.asynccontextmanager
async def background(job: Coroutine[Any, Any, None], name: str) -> AsyncIterator[asyncio.Task[None]]:
    """Run `job` beside the body of the `async with`; it is cancelled and awaited when the body ends. If it fails
    first, that is logged (naming it), the body is cancelled, and the job's error is raised in the body's place.
    E.g. `async with background(lease.keep(), "the lease renewal"): ...work that needs the lease...`"""
    async with together() as group:
        task = group.create_task(_logged(job, name), name=name)
        try:
            yield task
        finally:
            task.cancel()


async def _logged(job: Coroutine[Any, Any, None], name: str) -> None:
    try:
        await job
    except Exception as exc:
        logger.error("%s failed (%s: %s): stopping what depends on it", name, type(exc).__name__, exc)
        raise
