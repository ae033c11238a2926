"""Waiting for something to become true, with the last value in the failure (never a fixed sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], *, within: float = 15.0, what: str = "") -> T:
    """Poll ``check`` until it returns a truthy value; fail with the last value after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last: T = await check()
    while not last:
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}: last {last!r}")
        await asyncio.sleep(0.05)
        last = await check()
    return last
