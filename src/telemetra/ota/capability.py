"""OTA as one capability: built from plain values, entered with ``async with`` (the start-up sweep of the
firmware directory, then the scheduler's tasks), left to stop them."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.records import Batch
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
        lease_s: int = 120,
        step_s: float = 1.0,
        require_key: bool = False,
        base_url: str | None = None,
    ) -> None:
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

    def on_commit(self, batch: Batch) -> None:
        """The ingest queue's commit listener (``IngestQueue.add_listener``)."""
        self.inbox.on_commit(batch)

    async def __aenter__(self) -> Ota:
        await self.firmware.sweep()
        await self.scheduler.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.scheduler.__aexit__(exc_type, exc, tb)
