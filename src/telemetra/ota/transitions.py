"""The one function every OTA state change goes through.

``Transitions.apply`` writes a change with a guarded UPDATE and, when it won, hands the ``OtaChange`` to
the sinks. Today the sinks log (and tests listen); when the event source lands (ARCHITECTURE.md:
"every committed change becomes a typed event"), publishing it there is a change in this file only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from telemetra.domain.ota import OtaChange
from telemetra.storage.ota_jobs import JobRepository

log = logging.getLogger(__name__)

ChangeSink = Callable[[OtaChange], None]


class Transitions:
    def __init__(self, jobs: JobRepository) -> None:
        self._jobs = jobs
        self._sinks: list[ChangeSink] = []

    def subscribe(self, sink: ChangeSink) -> Callable[[], None]:
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    async def apply(
        self,
        change: OtaChange,
        *,
        expect: Sequence[str] | None,
        values: dict[str, Any] | None = None,
        guard: dict[str, Any] | None = None,
    ) -> bool:
        """Move a job (``change.device_id`` None) or one of its devices to ``change.new`` if it is in one
        of ``expect`` (and, for a job, its ``guard`` fields still hold); for a device, ``expect=None``
        creates or overwrites its row (a gateway job's node, known only from its reports). True if it
        moved; False when someone else changed it first."""
        fields = {"status": change.new, "updated_at": change.ts, **(values or {})}
        if change.device_id is None:
            moved = await self._jobs.move(change.job_id, expect=expect, values=fields, guard=guard)
        elif expect is None:
            await self._jobs.upsert_node(change.job_id, change.device_id, fields, now_ms=change.ts)
            moved = True
        else:
            moved = await self._jobs.move_node(change.job_id, change.device_id, expect=expect, values=fields)
        if moved:
            self.publish(change)
        return moved

    def publish(self, change: OtaChange) -> None:
        """Hand a change to the sinks. ``apply`` calls it; so do the writes that are not moves of an
        existing row (a job created, a job deleted)."""
        if change.old != change.new:
            who = f"device {change.device_id}" if change.device_id else "update"
            log.info("ota %d: %s %s → %s %s", change.job_id, who, change.old, change.new, change.detail or "")
        for sink in list(self._sinks):
            try:
                sink(change)
            except Exception:  # one bad listener never stops a state change
                log.exception("OTA change listener failed")
