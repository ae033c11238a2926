"""One step of every running rollout: time out devices that went quiet, pause on the failure criteria,
open the next wave when the current one is done (or finish the job), and notify the next devices at the
configured rate. Everything it decides is read from and written to the database, so any process can take
the next step — after a restart, the scheduler just carries on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from telemetra.domain.ota import (
    CANCELLED,
    COMPLETED,
    DEVICE_FINAL,
    DEVICE_IN_PROGRESS,
    DISTRIBUTING,
    FAILED,
    NOTIFIED,
    PAUSED,
    PENDING,
    TIMED_OUT,
    Criteria,
    OtaChange,
)
from telemetra.domain.timeutil import now_ms
from telemetra.ota.transitions import Transitions
from telemetra.storage.firmware import FirmwareRepository
from telemetra.storage.ota_jobs import JobRepository, NodeCounts
from telemetra.storage.schema import FirmwareRow, OtaJobRow, OtaNodeRow

log = logging.getLogger(__name__)

# (device id, command params, ttl seconds) → command id: the device's command channel.
Notify = Callable[[str, dict[str, Any], int], Awaitable[str]]
Sign = Callable[[str], str | None]  # sha256 hex → signature

MAX_NOTIFY_PER_STEP = 500  # bounds one step's work however high the rate is set
# Notifications in flight at once: each waits for the database and the broker's PUBACK, so a step that
# notifies one device after the other tops out near 15 a second; a few at a time keep up with the rate
# without taking the connection pool from ingest.
NOTIFY_CONCURRENCY = 8


def download_url(base_url: str | None, firmware_id: int) -> str:
    return f"{(base_url or '').rstrip('/')}/api/v1/firmware/{firmware_id}/download"


def notification(job: OtaJobRow, firmware: FirmwareRow, signature: str | None) -> dict[str, Any]:
    """The ``ota`` command's params: where to download, what to verify, and which update to report to."""
    return {
        "url": download_url(job.base_url, firmware.id),
        "sha256": firmware.sha256,
        "checksum": firmware.sha256,  # paku's edge firmware reads {url, version, checksum} (CLIENTS.md §4.4)
        "md5": firmware.md5,
        "size": firmware.size_bytes,
        "version": firmware.version,
        "signature": signature,
        "update_id": job.id,
    }


class RolloutEngine:
    def __init__(
        self,
        jobs: JobRepository,
        firmware: FirmwareRepository,
        transitions: Transitions,
        *,
        notify: Notify,
        sign: Sign,
        step_s: float,
        on_notified: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.jobs = jobs
        self.firmware = firmware
        self.transitions = transitions
        self._notify = notify
        self._sign = sign
        self._step_ms = step_s * 1000
        self._on_notified = on_notified

    async def step(self) -> None:
        """Advance every running rollout once; one job's failure is logged and does not stop the others."""
        for job in await self.jobs.running():
            try:
                await self.advance(job)
            except Exception:
                log.exception("OTA rollout %d: step failed; retrying next step", job.id)

    async def advance(self, job: OtaJobRow) -> None:
        now = now_ms()
        await self._time_out(job, now)
        if job.status == PAUSED:
            return
        counts = (await self.jobs.counts([job.id], since={job.id: job.criteria_since}))[job.id]
        if await self._check_criteria(job, counts, now):
            return
        wave = await self._open_waves(job, counts, now)
        if wave is None:
            return
        await self._notify_due(job, wave, now)

    async def _time_out(self, job: OtaJobRow, now: int) -> None:
        for node in await self.jobs.overdue(job.id, now_ms=now, in_progress=DEVICE_IN_PROGRESS):
            retry = node.attempts <= job.max_retries  # a paused job retries it once resumed
            to = PENDING if retry else TIMED_OUT
            detail = {"reason": f"no result within {job.device_timeout_s} s", "retry": retry}
            values: dict[str, Any] = {"deadline_at": None, "error_message": detail["reason"]}
            if not retry:
                values["completed_at"] = now
            change = OtaChange(job.id, node.node_id, node.status, to, now, detail)
            await self.transitions.apply(change, expect=(node.status,), values=values)

    async def _check_criteria(self, job: OtaJobRow, counts: NodeCounts, now: int) -> bool:
        criteria = Criteria(job.pause_failure_percent, job.pause_min_finished)
        wave = job.current_wave
        wave_finished, wave_failed = counts.finished_since.get(wave, 0), counts.failed_since.get(wave, 0)
        all_finished, all_failed = sum(counts.finished_since.values()), sum(counts.failed_since.values())
        reason = None
        if criteria.tripped(wave_finished, wave_failed):
            reason = f"wave {wave + 1}: {wave_failed} of {wave_finished} finished devices failed"
        elif criteria.tripped(all_finished, all_failed):
            reason = f"overall: {all_failed} of {all_finished} finished devices failed"
        if reason is None:
            return False
        reason += f" (pause at {job.pause_failure_percent:g} % after at least {job.pause_min_finished})"
        change = OtaChange(job.id, None, DISTRIBUTING, PAUSED, now, {"reason": reason, "wave": wave})
        await self.transitions.apply(change, expect=(DISTRIBUTING,), values={"paused_reason": reason})
        return True

    async def _open_waves(self, job: OtaJobRow, counts: NodeCounts, now: int) -> int | None:
        """The highest wave now open for notification; None when the job just finished (or moved on
        under us). A wave opens once every device of the waves before it has finished."""
        waves = list(job.waves or [100])
        wave = job.current_wave
        while True:
            open_devices = sum(n for status, n in counts.total(wave).items() if status not in DEVICE_FINAL)
            if open_devices:
                return wave
            if wave + 1 < len(waves):
                change = OtaChange(job.id, None, DISTRIBUTING, DISTRIBUTING, now, {"wave_started": wave + 2})
                opened = await self.transitions.apply(
                    change, expect=(DISTRIBUTING,), values={"current_wave": wave + 1}, guard={"current_wave": wave}
                )
                if not opened:
                    return None  # another process opened it, or the job was paused: next step sees it
                wave += 1
                continue
            await self._finish(job, counts, now)
            return None

    async def _finish(self, job: OtaJobRow, counts: NodeCounts, now: int) -> None:
        totals = counts.total()
        to = COMPLETED if totals.get(COMPLETED, 0) else FAILED
        detail = {k: totals.get(k, 0) for k in (COMPLETED, FAILED, TIMED_OUT)}
        change = OtaChange(job.id, None, DISTRIBUTING, to, now, detail)
        values: dict[str, Any] = {"completed_at": now}
        if to == FAILED:
            values["error_message"] = "no device completed the update"
        await self.transitions.apply(change, expect=(DISTRIBUTING,), values=values)

    async def _notify_due(self, job: OtaJobRow, wave: int, now: int) -> None:
        budget, start_at = self._budget(job, now)
        if budget == 0:
            return
        due = await self.jobs.due(job.id, up_to_wave=wave, limit=budget)
        if not due:
            return
        # Spend the rate's budget (compare-and-set on the clock): with several processes, one wins each slot.
        interval = 60_000 / max(1, job.rate_per_minute)
        next_at = round(start_at + len(due) * interval)
        if not await self.jobs.move(
            job.id,
            expect=(DISTRIBUTING,),
            values={"next_notify_at": next_at},
            guard={"next_notify_at": job.next_notify_at},
        ):
            return
        firmware = await self.firmware.get(job.firmware_id)
        params = notification(job, firmware, self._sign(firmware.sha256))
        slots = asyncio.Semaphore(NOTIFY_CONCURRENCY)

        async def one(node: OtaNodeRow) -> bool:
            async with slots:
                return await self._notify_one(job, node, params)

        sent = await asyncio.gather(*(one(node) for node in due))
        self._on_notified(sum(sent))

    async def _notify_one(self, job: OtaJobRow, node: OtaNodeRow, params: dict[str, Any]) -> bool:
        notified_at = now_ms()
        change = OtaChange(job.id, node.node_id, PENDING, NOTIFIED, notified_at, {"attempt": node.attempts + 1})
        values = {
            "notified_at": notified_at,
            "deadline_at": notified_at + job.device_timeout_s * 1000,
            "attempts": node.attempts + 1,
            "command_id": None,
        }
        if not await self.transitions.apply(change, expect=(PENDING,), values=values):
            return False  # reported or claimed meanwhile
        try:
            command_id = await self._notify(node.node_id, params, max(1, job.device_timeout_s))
        except Exception as exc:
            log.warning("OTA rollout %d: could not notify %s: %s", job.id, node.node_id, exc)
            back = OtaChange(job.id, node.node_id, NOTIFIED, PENDING, now_ms(), {"error": str(exc)[:200]})
            await self.transitions.apply(back, expect=(NOTIFIED,), values={"attempts": node.attempts})
            return False
        await self.jobs.move_node(job.id, node.node_id, expect=DEVICE_IN_PROGRESS, values={"command_id": command_id})
        if (await self.jobs.get(job.id)).status == CANCELLED:
            # Cancelled while this notification was being queued, after the cancel read the commands to
            # withdraw: this one is withdrawn here (each side writes, then reads what the other wrote).
            await self.jobs.expire_commands([command_id])
        return True

    def _budget(self, job: OtaJobRow, now: int) -> tuple[int, int]:
        """How many devices the rate allows now, and where the rate's clock starts counting them."""
        interval = 60_000 / max(1, job.rate_per_minute)
        next_at = job.next_notify_at
        # After a pause, a restart or a quiet spell (a wave that waited for its last device), allow one
        # step's worth at once rather than everything missed since: a token bucket one step deep.
        if next_at is None or next_at < now - self._step_ms:
            next_at = round(now - self._step_ms)
        if next_at > now:
            return 0, next_at
        return min(MAX_NOTIFY_PER_STEP, math.floor((now - next_at) / interval) + 1), next_at
