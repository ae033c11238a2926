"""OTA as one capability: built from plain values, entered with ``async with`` (the start-up sweep of the
firmware directory, then the scheduler's tasks), left to stop them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.ota import OtaChange
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent
from telemetra.metrics import Metrics
from telemetra.ota.engine import Notify, RolloutEngine
from telemetra.ota.firmware import FirmwareService
from telemetra.ota.jobs import JobService
from telemetra.ota.reports import OtaInbox
from telemetra.ota.scheduler import OtaScheduler, SchedulerMetrics
from telemetra.ota.signing import Signer
from telemetra.ota.store import FirmwareStore
from telemetra.ota.transitions import Transitions
from telemetra.storage.firmware import FirmwareRepository
from telemetra.storage.ota_jobs import JobRepository


class Ota:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        firmware_dir: Path,
        max_firmware_bytes: int,
        signer: Signer | None,
        notify: Notify,
        metrics: Metrics,
        hub: EventHub,
        announce: Callable[[Sequence[ChangeEvent]], None] | None = None,
        lease_s: int = 120,
        step_s: float = 1.0,
        require_key: bool = False,
        base_url: str | None = None,
    ) -> None:
        self._hub = hub
        self._announce = announce
        self._follower: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.require_key = require_key
        self.base_url = base_url.rstrip("/") if base_url else None
        self.signer = signer
        firmware_repo = FirmwareRepository(engine)
        self.jobs_repo = JobRepository(engine)
        self.transitions = Transitions(self.jobs_repo)
        self.firmware = FirmwareService(
            firmware_repo, FirmwareStore(firmware_dir, max_bytes=max_firmware_bytes), signer
        )
        self.jobs = JobService(self.jobs_repo, firmware_repo, self.transitions, lease_s=lease_s)
        self.inbox = OtaInbox()
        scheduler_metrics = SchedulerMetrics(metrics)
        self.engine = RolloutEngine(
            self.jobs_repo,
            firmware_repo,
            self.transitions,
            notify=notify,
            sign=self.firmware.signature_of_digest,
            step_s=step_s,
            on_notified=scheduler_metrics.notifications.inc,
        )
        self.scheduler = OtaScheduler(
            engine=self.engine,
            service=self.jobs,
            jobs=self.jobs_repo,
            inbox=self.inbox,
            step_s=step_s,
            metrics=scheduler_metrics,
        )

    async def __aenter__(self) -> Ota:
        await self.firmware.sweep()
        await self.scheduler.__aenter__()
        self._follower = asyncio.create_task(self.inbox.follow(self._hub), name="ota-reports")
        self._unsubscribe = self.transitions.subscribe(self._publish)
        return self

    def _publish(self, change: OtaChange) -> None:
        """Every committed OTA state change, as an ``ota`` event here and in the other processes."""
        data = {"update_id": change.job_id, "status": change.new, "old": change.old, **change.detail}
        event = ChangeEvent(model.OTA, change.device_id, change.ts, data)
        self._hub.publish([event])
        if self._announce is not None:
            self._announce([event])

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        await self.scheduler.__aexit__(exc_type, exc, tb)
        if self._unsubscribe is not None:
            self._unsubscribe()

    name = "ota"

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.alive else "down", "inbox": self.inbox.pending()}

    @property
    def alive(self) -> bool:
        return self.scheduler.alive and self._follower is not None and not self._follower.done()
