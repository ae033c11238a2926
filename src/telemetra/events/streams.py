"""Who is connected to which realtime stream (``/health`` counts them per stream)."""

from __future__ import annotations

from collections import Counter
from typing import Any


class StreamConnections:
    name = "websocket"

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self.refused = 0
        self.gaps = 0

    def opened(self, stream: str) -> None:
        self._open[stream] += 1

    def closed(self, stream: str) -> None:
        self._open[stream] -= 1
        if self._open[stream] <= 0:
            del self._open[stream]

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "connections": self.total, "streams": dict(self._open), "refused": self.refused}
