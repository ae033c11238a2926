"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_set(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; True when it is set.

    Not ``asyncio.wait_for(event.wait(), …)``: on Python 3.11 that can swallow a cancellation which
    arrives as the event is set, and a loop around it then outlives its cancel — a shutdown that waits
    for it hangs for good. ``asyncio.timeout`` does not lose the cancellation."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, seconds)):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def every(seconds: float, step: Callable[[], Awaitable[object]], *, failed: Callable[[Exception], None]) -> None:
    """Run ``step`` now and then every ``seconds`` (counted from the end of each run), until cancelled.

    A run that raises is handed to ``failed`` (which logs it, or notes a database outage) and the loop
    goes on: one bad round must not end a background task that is meant to run for as long as the app."""
    while True:
        try:
            await step()
        except Exception as exc:
            failed(exc)
        await asyncio.sleep(seconds)
