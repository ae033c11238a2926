"""The shared background loop: a failing round is reported and the loop goes on; cancel ends it."""

from __future__ import annotations

import asyncio

import pytest

from telemetra.aio import every


async def test_a_failing_round_is_reported_and_the_next_one_runs() -> None:
    rounds: list[int] = []
    failures: list[Exception] = []
    third = asyncio.Event()

    async def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise RuntimeError("first round fails")
        if len(rounds) == 3:
            third.set()

    task = asyncio.create_task(every(0, step, failed=failures.append))
    await asyncio.wait_for(third.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [str(e) for e in failures] == ["first round fails"]
    assert rounds[:3] == [0, 1, 2]
