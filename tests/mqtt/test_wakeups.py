"""Waiters for a command's answer or a device's next command share one event per key while they wait,
and nothing is kept for a key once its last waiter is gone (a device polled once is not held forever)."""

from __future__ import annotations

import asyncio

from telemetra.mqtt.downlink import _Wakeups


async def test_waiters_of_one_key_share_a_wakeup_and_the_key_is_forgotten_after_the_last() -> None:
    wakeups = _Wakeups()
    wakeups.wake("nobody-waits")  # no waiter: nothing to wake, nothing kept
    assert not wakeups._events

    with wakeups.waiting("dev-1") as first, wakeups.waiting("dev-1") as second:
        assert first is second
        with wakeups.waiting("dev-2") as other:
            wakeups.wake("dev-1")
            await asyncio.wait_for(first.wait(), 1)
            assert not other.is_set()
            wakeups.wake_all()
            assert other.is_set()
        assert set(wakeups._events) == {"dev-1"}
    assert not wakeups._events
