"""Update jobs: creation (targets resolved to devices and cut into waves), the transitions an operator or
a gateway asks for, and device reports (HTTP, MQTT ``event/ota``, a gateway's node progress, and a
reported ``fwVersion`` equal to the target).

Two deliveries share one job table and iotmesh's answer shapes:

- ``gateway`` (iotmesh): the job waits ``pending`` until a gateway polls for it (and gets a lease on
  it), starts it, serves the parts to its mesh and reports; its nodes are known only from reports;
- ``devices`` (a rollout): the job targets registered devices, starts ``distributing`` at once, and the
  scheduler (``ota.engine``) notifies the devices wave by wave over their command channel.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from telemetra.domain.errors import Conflict, Forbidden, InvalidInput, NotFound
from telemetra.domain.ota import (
    CANCELLED,
    COMPLETED,
    DEVICE_FINAL,
    DEVICE_IN_PROGRESS,
    DEVICE_STATUSES,
    DEVICES,
    DISTRIBUTING,
    FAILED,
    GATEWAY,
    JOB_FINAL,
    PAUSED,
    PENDING,
    TIMED_OUT,
    OtaChange,
    assign_waves,
    can_move,
    device_bucket,
    reported_status,
)
from telemetra.domain.timeutil import now_ms
from telemetra.domain.versions import same_version
from telemetra.ota.transitions import Transitions
from telemetra.storage.firmware import FirmwareRepository
from telemetra.storage.ota_jobs import JobRepository
from telemetra.storage.schema import FirmwareRow, OtaJobRow, OtaNodeRow

log = logging.getLogger(__name__)

DEFAULT_RATE_PER_MINUTE = 600
DEFAULT_DEVICE_TIMEOUT_S = 3600
DEFAULT_PAUSE_FAILURE_PERCENT = 20.0
DEFAULT_PAUSE_MIN_FINISHED = 10
MAX_TARGET_DEVICES = 100_000
REPORT_RETRIES = 3  # a report that loses a race with the scheduler re-reads the device and tries again
JOB_CACHE_S = 1.0


class NoTargets(InvalidInput):
    """A rollout's target matches no enabled device (paku's rollouts may be created before any device of
    the model registered: its compat layer answers that there is nothing to roll out)."""


@dataclass(frozen=True)
class TargetFilter:
    model: str | None = None
    search: str | None = None
    kind: str | None = None
    parent_id: str | None = None
    fw_version: str | None = None


@dataclass(frozen=True)
class JobRequest:
    firmware_id: int
    target_node_id: str | None = None
    target_node_type: str | None = None
    force_update: bool = False
    name: str | None = None
    target_model: str | None = None
    # Device models that also take this firmware (paku's heater builds run on devices that report the
    # board's model: ``lilygo-t-display-s3-heater`` on a ``lilygo-t-display-s3``).
    also_models: tuple[str, ...] = ()
    target_device_ids: list[str] | None = None
    target_filter: TargetFilter | None = None
    target_percentage: int | None = None
    waves: list[int] | None = None
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE
    device_timeout_s: int = DEFAULT_DEVICE_TIMEOUT_S
    max_retries: int = 0
    pause_failure_percent: float | None = DEFAULT_PAUSE_FAILURE_PERCENT
    pause_min_finished: int = DEFAULT_PAUSE_MIN_FINISHED

    @property
    def is_rollout(self) -> bool:
        """Any of Telemetra's targeting fields makes the server deliver; without them it is iotmesh's job."""
        return (
            self.target_model is not None
            or self.target_device_ids is not None
            or self.target_filter is not None
            or self.target_percentage is not None
            or self.waves is not None
        )


@dataclass(frozen=True)
class NodeReport:
    status: str | None = None
    current_part: int | None = None
    total_parts: int | None = None
    progress: int | None = None
    error_message: str | None = None


@dataclass
class ReportOutcome:
    node: OtaNodeRow
    retry: bool = False
    detail: dict[str, Any] = field(default_factory=dict)


class JobService:
    def __init__(
        self,
        jobs: JobRepository,
        firmware: FirmwareRepository,
        transitions: Transitions,
        *,
        lease_s: int,
    ) -> None:
        self.jobs = jobs
        self.firmware = firmware
        self.transitions = transitions
        self._lease_ms = lease_s * 1000
        # Device reports read their job for every report; a second-old copy is good enough for that
        # (its delivery, retries and whether it is over) and saves a query per report. Changes made
        # here drop the copy at once; another process's are seen within JOB_CACHE_S.
        self._jobs_seen: dict[int, tuple[float, OtaJobRow]] = {}
        transitions.subscribe(self._forget_job)

    def _forget_job(self, change: OtaChange) -> None:
        if change.device_id is None:
            self._jobs_seen.pop(change.job_id, None)

    async def _job_for_report(self, job_id: int) -> OtaJobRow:
        now = time.monotonic()
        cached = self._jobs_seen.get(job_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        job = await self.jobs.get(job_id)
        if len(self._jobs_seen) > 1000:
            self._jobs_seen.clear()
        self._jobs_seen[job_id] = (now + JOB_CACHE_S, job)
        return job

    # -- create --------------------------------------------------------------------------------------

    async def create(self, request: JobRequest, *, base_url: str) -> OtaJobRow:
        firmware = await self.firmware.get(request.firmware_id)
        now = now_ms()
        values: dict[str, Any] = {
            "firmware_id": firmware.id,
            "name": request.name,
            "target_node_id": request.target_node_id,
            "target_node_type": request.target_node_type or firmware.model,
            "force_update": request.force_update,
            "current_wave": 0,
            "rate_per_minute": request.rate_per_minute,
            "device_timeout_s": request.device_timeout_s,
            "max_retries": request.max_retries,
            "pause_failure_percent": request.pause_failure_percent,
            "pause_min_finished": request.pause_min_finished,
            "criteria_since": now,
            "base_url": base_url.rstrip("/"),
            "created_at": now,
            "updated_at": now,
        }
        if not request.is_rollout:
            values.update(delivery=GATEWAY, status=PENDING, waves=[])
            job_id = await self.jobs.create(values, [], now_ms=now)
            job = await self.jobs.get(job_id)
            self.transitions.publish(OtaChange(job_id, None, None, PENDING, now, {"delivery": GATEWAY}))
            return job
        device_ids, already = await self._targets(request, firmware)
        waves = request.waves or [100]
        nodes = assign_waves(device_ids, waves)
        values.update(
            delivery=DEVICES,
            status=DISTRIBUTING,
            started_at=now,
            target_model=request.target_model or firmware.model,
            target_device_ids=request.target_device_ids,
            target_filter=_filter_doc(request.target_filter),
            target_percentage=request.target_percentage,
            waves=waves,
        )
        job_id = await self.jobs.create(values, nodes, now_ms=now)
        self.transitions.publish(
            OtaChange(job_id, None, None, DISTRIBUTING, now, {"delivery": DEVICES, "devices": len(nodes)})
        )
        # Devices that already run the target have nothing to do (unless forced).
        for device_id in already:
            await self._device_done(job_id, device_id, firmware.version, now, reason="already on the target")
        return await self.jobs.get(job_id)

    async def _targets(self, request: JobRequest, firmware: FirmwareRow) -> tuple[list[str], list[str]]:
        """The devices a rollout targets, and those of them that already run the target version."""
        if request.target_model is not None and request.target_model != firmware.model:
            raise InvalidInput(
                f"firmware {firmware.id} is for model {firmware.model!r}, not {request.target_model!r}",
                field="target_model",
            )
        flt = request.target_filter or TargetFilter()
        if flt.model is not None and flt.model != firmware.model:
            raise InvalidInput(
                f"firmware {firmware.id} is for model {firmware.model!r}, not {flt.model!r}",
                field="target_filter.model",
            )
        ids = request.target_device_ids
        if ids is not None:
            known = await self.jobs.known_devices(ids)
            missing = [d for d in ids if d not in known]
            if missing:
                raise NotFound(f"unknown device(s): {', '.join(missing[:10])}", field="target_device_ids")
            allowed = (None, firmware.model, *request.also_models)
            wrong = [f"{d} ({known[d][0]})" for d in ids if known[d][0] not in allowed]
            if wrong:
                raise InvalidInput(
                    f"firmware {firmware.id} is for model {firmware.model!r}; these devices are another model: "
                    f"{', '.join(wrong[:10])}",
                    field="target_device_ids",
                )
            disabled = [d for d in ids if known[d][1]]
            if disabled:
                raise InvalidInput(f"disabled device(s): {', '.join(disabled[:10])}", field="target_device_ids")
        # A device list is taken as given (a device without a model may be targeted by name);
        # otherwise the rollout is for the firmware's model.
        models = None if ids is not None else (firmware.model, *request.also_models)
        rows = await self.jobs.devices_matching(
            model=models,
            ids=ids,
            search=flt.search,
            kind=flt.kind,
            parent_id=flt.parent_id,
            fw_version=flt.fw_version,
        )
        if request.target_percentage is not None:
            rows = [r for r in rows if device_bucket(r[0]) < request.target_percentage]
        if not rows:
            raise NoTargets(
                f"no enabled device of model {firmware.model!r} matches the target", field="target_device_ids"
            )
        if len(rows) > MAX_TARGET_DEVICES:
            raise InvalidInput(f"at most {MAX_TARGET_DEVICES} devices per rollout", field="target_device_ids")
        already = [] if request.force_update else [r[0] for r in rows if same_version(r[2], firmware.version)]
        return [r[0] for r in rows], already

    # -- transitions ---------------------------------------------------------------------------------

    async def _move(self, job: OtaJobRow, to: str, *, values: dict[str, Any] | None = None, **detail: Any) -> bool:
        if job.status == to:
            return False  # asked again: nothing to do, not an error
        if not can_move(job.status, to):
            raise Conflict(f"update {job.id} is {job.status}; it cannot become {to}", field="status")
        change = OtaChange(job.id, None, job.status, to, now_ms(), detail)
        moved = await self.transitions.apply(change, expect=(job.status,), values=values)
        if not moved:
            current = await self.jobs.get(job.id)
            if current.status == to:
                return False
            raise Conflict(f"update {job.id} changed to {current.status} meanwhile; try again", field="status")
        return True

    async def start(self, job_id: int, *, holder: str, privileged: bool) -> OtaJobRow:
        job = await self.jobs.get(job_id)
        if job.status != PENDING:
            raise Conflict(f"Update is not pending (status: {job.status})", field="status")
        now = now_ms()
        leased_elsewhere = job.lease_holder not in (None, holder) and (job.lease_until or 0) >= now
        if leased_elsewhere and not privileged:
            raise Conflict(f"update {job_id} was taken by another gateway", field="update_id")
        await self._move(job, DISTRIBUTING, values={"started_at": now, "lease_holder": holder}, by=holder)
        return await self.jobs.get(job_id)

    async def complete(self, job_id: int) -> OtaJobRow:
        job = await self.jobs.get(job_id)
        await self._move(job, COMPLETED, values={"completed_at": now_ms()})
        return await self.jobs.get(job_id)

    async def fail(self, job_id: int, error_message: str | None) -> OtaJobRow:
        job = await self.jobs.get(job_id)
        await self._move(
            job, FAILED, values={"completed_at": now_ms(), "error_message": error_message}, error=error_message
        )
        return await self.jobs.get(job_id)

    async def pause(self, job_id: int, *, reason: str = "paused by an operator") -> OtaJobRow:
        job = await self.jobs.get(job_id)
        if job.delivery != DEVICES:
            raise Conflict("only rollouts (device delivery) can be paused; a gateway drives this job", field="status")
        await self._move(job, PAUSED, values={"paused_reason": reason}, reason=reason)
        return await self.jobs.get(job_id)

    async def resume(self, job_id: int) -> OtaJobRow:
        job = await self.jobs.get(job_id)
        if job.delivery != DEVICES:
            raise Conflict("only rollouts (device delivery) can be resumed", field="status")
        now = now_ms()
        # The failures so far were looked at: the pause criteria count what finishes from now on.
        values = {"paused_reason": None, "criteria_since": now, "next_notify_at": None}
        await self._move(job, DISTRIBUTING, values=values)
        return await self.jobs.get(job_id)

    async def cancel(self, job_id: int) -> OtaJobRow:
        job = await self.jobs.get(job_id)
        if await self._move(job, CANCELLED, values={"completed_at": now_ms(), "lease_holder": None}):
            # Notifications still waiting in the command queue (an offline device) are withdrawn.
            notified = [
                n.command_id for n in await self.jobs.nodes(job_id) if n.command_id and n.status in DEVICE_IN_PROGRESS
            ]
            if notified:
                await self.jobs.expire_commands(notified)
        return await self.jobs.get(job_id)

    async def delete(self, job_id: int) -> OtaJobRow:
        job = await self.jobs.delete(job_id, allowed=(PENDING, *JOB_FINAL))
        self.transitions.publish(OtaChange(job_id, None, job.status, "deleted", now_ms()))
        return job

    # -- the gateway's poll --------------------------------------------------------------------------

    async def pending(self, holder: str) -> list[tuple[OtaJobRow, FirmwareRow]]:
        leased = await self.jobs.lease_pending(holder, now_ms=now_ms(), lease_ms=self._lease_ms)
        out = []
        for job in leased:
            try:
                out.append((job, await self.firmware.get(job.firmware_id)))
            except NotFound:  # deleted between the lease and now
                continue
        return out

    # -- reports -------------------------------------------------------------------------------------

    async def report(self, job_id: int, node_id: str, report: NodeReport, *, device_only: str | None) -> ReportOutcome:
        """A progress report for one device (``device_only``: the caller is that device)."""
        if device_only is not None and device_only != node_id:
            raise Forbidden(f"a device reports only for itself, not for {node_id!r}", field="node_id")
        job = await self._job_for_report(job_id)
        status = reported_status(report.status or "downloading")
        now = now_ms()
        values: dict[str, Any] = {}
        if report.current_part is not None:
            values["current_part"] = report.current_part
        if report.total_parts is not None:
            values["total_parts"] = report.total_parts
        if report.progress is not None:
            values["progress"] = report.progress
        if report.error_message is not None:
            values["error_message"] = report.error_message
        if job.delivery == GATEWAY:
            # iotmesh: a node's row appears with its first report and holds what was reported last.
            if status in DEVICE_FINAL:
                values["completed_at"] = now
            previous = await self.jobs.node(job_id, node_id)
            change = OtaChange(job_id, node_id, previous.status if previous else None, status, now, {})
            await self.transitions.apply(change, expect=None, values=values)
            node = await self.jobs.node(job_id, node_id)
            assert node is not None
            return ReportOutcome(node)
        for _ in range(REPORT_RETRIES):
            node = await self.jobs.node(job_id, node_id)
            if node is None:
                raise NotFound(f"device {node_id!r} is not in update {job_id}", field="node_id")
            outcome = await self._device_report(job, node, status, values, now)
            if outcome is not None:
                return outcome
        raise Conflict(f"device {node_id!r} changed while reporting; report again", field="status")

    async def _device_report(
        self, job: OtaJobRow, node: OtaNodeRow, status: str, values: dict[str, Any], now: int
    ) -> ReportOutcome | None:
        if node.status == COMPLETED:
            if status == COMPLETED:
                return ReportOutcome(node)  # a redelivered report
            raise Conflict(f"device {node.node_id!r} already completed update {job.id}", field="status")
        retry = False
        target = status
        if status in (FAILED, TIMED_OUT):
            if node.attempts <= job.max_retries and job.status not in JOB_FINAL:
                target, retry = PENDING, True  # notified again, within the rate, by the scheduler
            values = {**values, "completed_at": None if retry else now}
        elif status == COMPLETED:
            values = {**values, "completed_at": now, "progress": 100}
        change = OtaChange(job.id, node.node_id, node.status, target, now, {"reported": status, "retry": retry})
        if not await self.transitions.apply(change, expect=(node.status,), values=values):
            return None
        # The row as written (a re-read would cost a query per report; the guarded update held it).
        moved = OtaNodeRow(**{c.key: getattr(node, c.key) for c in OtaNodeRow.__mapper__.column_attrs})
        for name, value in {**values, "status": target, "updated_at": now}.items():
            setattr(moved, name, value)
        return ReportOutcome(moved, retry=retry)

    async def report_for_device(self, device_id: str, update_id: int | None, report: NodeReport) -> ReportOutcome:
        """A device's own report (MQTT ``event/ota``) — for ``update_id``, or its newest running job."""
        if update_id is None:
            jobs = await self.jobs.jobs_of_device(device_id, statuses=(DISTRIBUTING, PAUSED))
            if not jobs:
                raise NotFound(f"device {device_id!r} is in no running update", field="update_id")
            update_id = jobs[0].id
        return await self.report(update_id, device_id, report, device_only=device_id)

    async def version_seen(self, device_id: str, version: str, job_ids: list[int] | tuple[int, ...]) -> None:
        """The device reported ``version`` (its state's ``fwVersion``) and it is the target of these jobs.
        For a forced update the device ran the target before, so only a report after the notification
        counts."""
        now = now_ms()
        for job_id in job_ids:
            try:
                job = await self._job_for_report(job_id)
            except NotFound:
                continue
            if job.status in (DISTRIBUTING, PAUSED):
                await self._device_done(
                    job_id,
                    device_id,
                    version,
                    now,
                    reason="reported the target fwVersion",
                    after_notify=job.force_update,
                )

    async def _device_done(
        self, job_id: int, device_id: str, version: str, now: int, *, reason: str, after_notify: bool = False
    ) -> bool:
        node = await self.jobs.node(job_id, device_id)
        if node is None or node.status == COMPLETED:
            return False
        if after_notify and node.status not in DEVICE_IN_PROGRESS:
            return False
        change = OtaChange(job_id, device_id, node.status, COMPLETED, now, {"reason": reason, "version": version})
        expect = DEVICE_IN_PROGRESS if after_notify else tuple(s for s in DEVICE_STATUSES if s != COMPLETED)
        return await self.transitions.apply(change, expect=expect, values={"completed_at": now, "progress": 100})

    async def reconcile_versions(self) -> int:
        """Complete devices whose stored fwVersion already is their rollout's target (a report this
        process did not see, or one it had to drop). Returns how many it completed."""
        done = 0
        for job_id, device_id, version in await self.jobs.on_target_version():
            done += await self._device_done(
                job_id, device_id, version, now_ms(), reason="stored fwVersion is the target"
            )
        return done


def _filter_doc(flt: TargetFilter | None) -> dict[str, Any] | None:
    if flt is None:
        return None
    return {k: v for k, v in flt.__dict__.items() if v is not None}
