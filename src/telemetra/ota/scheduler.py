"""The rollout scheduler: a background capability with an ``async with`` lifecycle.

Two named tasks: ``ota-steps`` advances every running rollout every ``step_s`` (``RolloutEngine``) and
refreshes the target versions the inbox watches; ``ota-reports`` applies device reports from the inbox
as they arrive. State lives in the database, so stopping and starting (a restart) loses nothing. A task
that dies is logged with its traceback; a failing step is logged and retried at the next one.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType

import orjson

from telemetra.aio import wait_set
from telemetra.domain.errors import TelemetraError
from telemetra.domain.ota import DEVICE_FINAL
from telemetra.domain.timeutil import now_ms
from telemetra.metrics import Metrics
from telemetra.ota.engine import RolloutEngine
from telemetra.ota.jobs import JobService
from telemetra.ota.reports import EventReport, OtaInbox, VersionReport, parse_event
from telemetra.storage.faults import DatabaseState, is_transient
from telemetra.storage.ota_jobs import JobRepository

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 15.0  # how often stored fwVersions are compared with running rollouts' targets
# A woken scheduler still leaves this much between steps: finished devices arrive in bursts, and one
# step per burst opens the next wave as soon as one step per device would.
MIN_STEP_GAP_S = 0.05


class SchedulerMetrics:
    """The OTA counters of the app's ``Metrics``."""

    def __init__(self, metrics: Metrics) -> None:
        self.steps = metrics.ota_steps
        self.notifications = metrics.ota_notifications
        self.reports = metrics.ota_reports


class OtaScheduler:
    def __init__(
        self,
        *,
        engine: RolloutEngine,
        service: JobService,
        jobs: JobRepository,
        inbox: OtaInbox,
        step_s: float,
        metrics: SchedulerMetrics,
        database: DatabaseState | None = None,
    ) -> None:
        """``database``: where an outage is noted (logged once, by it) instead of a traceback per step."""
        if step_s <= 0:
            raise ValueError("step_s must be positive")
        self._engine = engine
        self._service = service
        self._jobs = jobs
        self._inbox = inbox
        self._step_s = step_s
        self.metrics = metrics
        self._database = database
        self._wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_reconcile = 0.0

    async def __aenter__(self) -> OtaScheduler:
        for name, body in (("ota-steps", self._run_steps), ("ota-reports", self._run_reports)):
            task = asyncio.create_task(body(), name=name)
            task.add_done_callback(_log_death)
            self._tasks.append(task)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    @property
    def alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def wake(self) -> None:
        """Step now (a rollout was created or resumed) instead of at the next interval."""
        self._wakeup.set()

    async def step(self) -> None:
        self._inbox.watch(dict(await self._jobs.running_versions()))
        await self._engine.step()
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_reconcile >= RECONCILE_EVERY_S:
            self._last_reconcile = loop.time()
            completed = await self._service.reconcile_versions()
            if completed:
                log.info("OTA: %d device(s) completed by their stored fwVersion", completed)
        self.metrics.steps.inc()

    async def _run_steps(self) -> None:
        gap = min(MIN_STEP_GAP_S, self._step_s)
        while True:
            self._wakeup.clear()  # a wake that comes during the step brings the next one forward
            began = DatabaseState.attempt()
            try:
                await self.step()
            except Exception as exc:
                if not self._outage(exc):
                    log.exception("OTA scheduler step failed; retrying in %.1f s", self._step_s)
            else:
                if self._database is not None:
                    self._database.succeeded(began)
            await asyncio.sleep(gap)
            await wait_set(self._wakeup, self._step_s - gap)

    async def _run_reports(self) -> None:
        while True:
            item = await self._inbox.get()
            try:
                await self._apply(item)
            except Exception as exc:
                if not self._outage(exc):
                    log.exception("OTA report from %s could not be applied", item.device_id)
                self.metrics.reports.labels("error").inc()

    def _outage(self, exc: Exception) -> bool:
        """The database is down: noted once per outage by ``DatabaseState`` (a step a second used to log a
        traceback each for as long as it lasted)."""
        if self._database is None or not is_transient(exc):
            return False
        self._database.failed(exc)
        return True

    async def _apply(self, item: EventReport | VersionReport) -> None:
        if isinstance(item, VersionReport):
            await self._service.version_seen(item.device_id, item.version, item.job_ids)
            self.metrics.reports.labels("version").inc()
            self.wake()
            return
        try:
            update_id, report = parse_event(item.payload, item.name)
            outcome = await self._service.report_for_device(item.device_id, update_id, report)
        except TelemetraError as exc:
            # Nothing refused is silent: the device cannot be answered over MQTT, so the refusal is kept.
            where = f" ({exc.field})" if exc.field else ""
            payload = _payload_bytes(item.payload)
            await self._jobs.reject(
                device_id=item.device_id,
                reason=f"ota report refused: {exc.reason}{where}",
                payload=payload,
                now_ms=now_ms(),
                topic=None,
            )
            self.metrics.reports.labels("refused").inc()
            return
        self.metrics.reports.labels("applied").inc()
        if outcome.retry or outcome.node.status in DEVICE_FINAL:
            self.wake()  # a device finished: the next wave (or the pause) need not wait for the interval


def _payload_bytes(payload: object) -> bytes:
    try:
        return orjson.dumps(payload)
    except TypeError:
        return repr(payload).encode()


def _log_death(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("OTA task %s died", task.get_name(), exc_info=(type(exc), exc, exc.__traceback__))
