"""Background tasks that cannot die unnoticed.

A ``Supervisor`` is an async context manager around a ``TaskGroup``: ``spawn`` starts a named task in it;
leaving the context cancels them all and waits for them. A task that raises is logged once, with its
traceback, and recorded in ``Failures`` — which ``/health`` reports (503) — instead of tearing down its
siblings (as a bare TaskGroup would) or vanishing (as a bare ``create_task`` would). A task that returns
while the supervisor still runs is a failure too: every supervised task is meant to run until stopped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from telemetra.domain.timeutil import ms_to_iso, now_ms

log = logging.getLogger(__name__)


class Failures:
    """What died, shared by every supervisor of an app: task name → reason and when."""

    def __init__(self) -> None:
        self._failed: dict[str, dict[str, str]] = {}

    def record(self, name: str, reason: str) -> None:
        self._failed[name] = {"error": reason, "at": ms_to_iso(now_ms())}

    def clear(self, name: str) -> None:
        self._failed.pop(name, None)

    def snapshot(self) -> dict[str, dict[str, str]]:
        return dict(self._failed)

    def __bool__(self) -> bool:
        return bool(self._failed)


class Supervisor:
    def __init__(self, name: str, failures: Failures) -> None:
        self.name = name
        self._failures = failures
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    async def __aenter__(self) -> Supervisor:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping = True
        for task in self._tasks.values():
            task.cancel()
        assert self._group is not None
        # Not the caller's exception: a TaskGroup would wrap it in an ExceptionGroup. The guarded tasks
        # themselves never raise, so this only waits for them; the caller's exception goes on as it was.
        await self._group.__aexit__(None, None, None)

    def spawn(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        assert self._group is not None, "spawn inside `async with supervisor`"
        full = f"{self.name}.{name}"
        task = self._group.create_task(self._guard(full, run), name=full)
        self._tasks[full] = task
        return task

    def alive(self, name: str) -> bool:
        task = self._tasks.get(f"{self.name}.{name}")
        return task is not None and not task.done()

    async def _guard(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("background task %s died: %s", name, exc, exc_info=True)
            self._failures.record(name, f"{type(exc).__name__}: {exc}"[:300])
            return
        if not self._stopping:
            log.error("background task %s ended on its own", name)
            self._failures.record(name, "ended unexpectedly")
