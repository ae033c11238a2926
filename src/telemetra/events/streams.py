"""Who is connected to which realtime stream (``/health`` counts them per stream), and the realtime
capability's lifetime: leaving it ends every open stream, so a stopping server closes its sockets
(1001) instead of waiting on them."""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any

from telemetra.events.hub import Subscription


class StreamConnections:
    name = "websocket"

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self.running = False
        self.refused = 0
        self.gaps = 0

    def opened(self, stream: str) -> None:
        self._open[stream] += 1

    def closed(self, stream: str) -> None:
        self._open[stream] -= 1
        if self._open[stream] <= 0:
            del self._open[stream]

    def track(self, subscription: Subscription) -> None:
        self._subscriptions.add(subscription)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.running else "off",
            "connections": self.total,
            "streams": dict(self._open),
            "refused": self.refused,
            "gaps": self.gaps,
        }

    async def __aenter__(self) -> StreamConnections:
        self.running = True
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.running = False
        for subscription in list(self._subscriptions):
            subscription.close()
