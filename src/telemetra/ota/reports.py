"""What OTA learns from ingest: device ``event/ota`` reports and reported firmware versions.

This is the one adapter between the event hub and OTA. It reads committed changes (so what it acts on is
stored, whichever process ingested it): ``event`` events named ``ota`` and ``state`` events carrying a
firmware version, keeps only what concerns OTA, and queues it for the scheduler's consumer task.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from telemetra.domain.errors import InvalidInput
from telemetra.domain.versions import same_version
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent, Gap
from telemetra.ota.jobs import NodeReport

log = logging.getLogger(__name__)

OTA_EVENT = "ota"  # {prefix}/{device}/event/ota
# paku-iot's edge devices (CLIENTS.md §4.4, preset ``paku-iot``): paku/edge/{id}/ota/status|progress|result.
PAKU_STATUS, PAKU_PROGRESS, PAKU_RESULT = "ota/status", "ota/progress", "ota/result"
OTA_EVENTS = frozenset((OTA_EVENT, PAKU_STATUS, PAKU_PROGRESS, PAKU_RESULT))
MAX_QUEUED = 10_000


@dataclass(frozen=True, slots=True)
class EventReport:
    device_id: str
    ts: int
    payload: Any
    name: str = OTA_EVENT


@dataclass(frozen=True, slots=True)
class VersionReport:
    device_id: str
    version: str
    job_ids: tuple[int, ...]


Item = EventReport | VersionReport


class OtaInbox:
    def __init__(self, *, max_queued: int = MAX_QUEUED) -> None:
        self._queue: asyncio.Queue[Item] = asyncio.Queue(max_queued)
        # Running rollouts' target versions (job id → version), refreshed by the scheduler: a reported
        # fwVersion is queued only when it is one of them, so ordinary state reports cost a set lookup.
        self._targets: dict[int, str] = {}
        self.dropped = 0

    def watch(self, targets: dict[int, str]) -> None:
        self._targets = dict(targets)

    async def follow(self, hub: EventHub) -> None:
        """Runs until cancelled: what devices report, into the inbox."""
        async with hub.subscribe(types=(model.EVENT, model.STATE), maxsize=MAX_QUEUED) as events:
            async for event in events:
                if isinstance(event, Gap):
                    # The periodic reconcile still completes devices by their stored fwVersion.
                    log.warning("OTA missed %s device events", event.missed)
                    continue
                self.on_event(event)

    def on_event(self, event: ChangeEvent) -> None:
        if event.device_id is None:
            return
        if event.type == model.EVENT:
            name = event.data.get("name")
            if name in OTA_EVENTS:
                self._put(EventReport(event.device_id, event.ts, event.data.get("payload"), name))
            return
        version = event.data.get("fw_version")
        if not self._targets or not isinstance(version, str):
            return
        jobs = tuple(j for j, target in self._targets.items() if same_version(version, target))
        if jobs:
            self._put(VersionReport(event.device_id, version, jobs))

    def _put(self, item: Item) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # The periodic reconcile still completes devices by their stored fwVersion.
            self.dropped += 1
            log.warning("OTA inbox full: dropped a report from %s", item.device_id)

    async def get(self) -> Item:
        return await self._queue.get()

    def pending(self) -> int:
        return self._queue.qsize()


def paku_payload(name: str, payload: Any) -> Any:
    """paku's three reports in the words of ``event/ota``, as paku's collector read them: ``ota/status``
    (``target_version`` or ``version``) starts the update; ``ota/progress`` ``state`` ``installing`` is
    installing, ``verifying`` downloaded (installing here), anything else downloading, with ``percent``;
    ``ota/result`` ``success`` true completes it, false fails it with ``message``."""
    if not isinstance(payload, dict) or name == OTA_EVENT:
        return payload
    if name == PAKU_STATUS:
        return {"status": "downloading"}
    if name == PAKU_PROGRESS:
        state = payload.get("state")
        status = "installing" if state in ("installing", "verifying") else "downloading"
        return {"status": status, "progress": payload.get("percent")}
    success = payload.get("success")
    if not isinstance(success, bool):
        raise InvalidInput("ota/result needs 'success' true or false", field="success")
    if success:
        return {"status": "completed"}
    return {"status": "failed", "error": payload.get("message")}


def parse_event(payload: Any, name: str = OTA_EVENT) -> tuple[int | None, NodeReport]:
    """``{"update_id","status","progress","error"}`` (iotmesh's ``current_part``/``total_parts``/
    ``error_message`` too; paku's ``ota/…`` reports through ``paku_payload``) → (update id, report);
    ``InvalidInput`` naming the field otherwise."""
    payload = paku_payload(name, payload)
    if not isinstance(payload, dict):
        raise InvalidInput("an OTA report is a JSON object with at least 'status'", field="status")
    update_id = payload.get("update_id", payload.get("job_id"))
    if update_id is not None:
        update_id = _int(update_id, "update_id", 0, 2**31 - 1)
    status = payload.get("status", payload.get("state"))
    if not isinstance(status, str) or not status.strip():
        raise InvalidInput("'status' is required (downloading, installing, completed, failed, …)", field="status")
    progress = payload.get("progress", payload.get("percent"))
    error = payload.get("error", payload.get("error_message"))
    return update_id, NodeReport(
        status=status,
        progress=None if progress is None else _int(progress, "progress", 0, 100),
        current_part=_optional_int(payload.get("current_part"), "current_part"),
        total_parts=_optional_int(payload.get("total_parts"), "total_parts"),
        error_message=None if error is None else str(error)[:1000],
    )


def _optional_int(value: Any, field: str) -> int | None:
    return None if value is None else _int(value, field, 0, 2**31 - 1)


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"{field} must be a number", field=field)
    try:
        number = int(float(value)) if isinstance(value, str | float) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"{field} must be a number", field=field) from None
    if not low <= number <= high:
        raise InvalidInput(f"{field} must be between {low} and {high}", field=field)
    return number
