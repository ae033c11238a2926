"""Update jobs and their devices: the rows behind iotmesh's gateway jobs and Telemetra's rollouts.

Every status change is a guarded UPDATE (``WHERE status IN expected``), so two processes — or two
gateways, or a scheduler and a device report — that race for the same row never both win, on SQLite and
PostgreSQL alike; the loser sees rowcount 0 and re-reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.errors import Conflict, NotFound
from telemetra.domain.ota import COMPLETED, DEVICE_FINAL, DEVICES, FAILED, GATEWAY, JOB_ACTIVE, PENDING, TIMED_OUT
from telemetra.storage.schema import CommandRow, Device, FirmwareRow, OtaJobRow, OtaNodeRow, RejectedMessage

IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and asyncpg's parameter limits


@dataclass(frozen=True, slots=True)
class NodeCounts:
    """Per wave: devices by status, and finished/failed since ``criteria_since`` (for pause criteria)."""

    by_wave: dict[int, dict[str, int]]
    finished_since: dict[int, int]
    failed_since: dict[int, int]

    def total(self, wave: int | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for w, statuses in self.by_wave.items():
            if wave is None or w == wave:
                for status, n in statuses.items():
                    out[status] = out.get(status, 0) + n
        return out


def _job(row: Any) -> OtaJobRow:
    return OtaJobRow(**row._mapping)


def _node(row: Any) -> OtaNodeRow:
    return OtaNodeRow(**row._mapping)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), IN_CHUNK):
        yield items[i : i + IN_CHUNK]


class JobRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- jobs ---------------------------------------------------------------------------------------

    async def create(self, values: dict[str, Any], nodes: Sequence[tuple[str, int, int]], *, now_ms: int) -> int:
        """Insert a job and its devices (``(device_id, wave, position)``) in one transaction. A device
        already in a running rollout is refused: it would be told to flash two images."""
        async with self._engine.begin() as conn:
            # FOR UPDATE (PostgreSQL) keeps the firmware from being deleted under the new job.
            fw = select(FirmwareRow.id).where(FirmwareRow.id == values["firmware_id"]).with_for_update()
            if (await conn.execute(fw)).first() is None:
                raise NotFound("Firmware not found", field="firmware_id")
            if nodes:
                busy = await self._busy(conn, [n[0] for n in nodes])
                if busy:
                    shown = ", ".join(f"{d} (update {j})" for d, j in busy[:10])
                    raise Conflict(
                        f"{len(busy)} device(s) are already in a running rollout: {shown}", field="target_device_ids"
                    )
            result = await conn.execute(insert(OtaJobRow).values(**values))
            job_id = int(result.inserted_primary_key[0])  # type: ignore[index]
            rows = [
                {
                    "job_id": job_id,
                    "node_id": device_id,
                    "wave": wave,
                    "position": position,
                    "status": PENDING,
                    "current_part": 0,
                    "attempts": 0,
                    "started_at": now_ms,
                    "updated_at": now_ms,
                }
                for device_id, wave, position in nodes
            ]
            for i in range(0, len(rows), 1000):
                await conn.execute(insert(OtaNodeRow), rows[i : i + 1000])
        return job_id

    async def _busy(self, conn: AsyncConnection, device_ids: list[str]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for chunk in _chunks(device_ids):
            stmt = (
                select(OtaNodeRow.node_id, OtaNodeRow.job_id)
                .join(OtaJobRow, OtaJobRow.id == OtaNodeRow.job_id)
                .where(
                    OtaJobRow.delivery == DEVICES,
                    OtaJobRow.status.in_(JOB_ACTIVE),
                    OtaNodeRow.node_id.in_(chunk),
                    OtaNodeRow.status.not_in(DEVICE_FINAL),
                )
            )
            out.extend((r[0], int(r[1])) for r in (await conn.execute(stmt)).all())
        return out

    async def get(self, job_id: int) -> OtaJobRow:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(OtaJobRow.__table__).where(OtaJobRow.id == job_id))).first()
        if row is None:
            raise NotFound("Update not found", field="update_id")
        return _job(row)

    async def recent(
        self, *, status: str | None = None, firmware_id: int | None = None, limit: int = 100, offset: int = 0
    ) -> list[OtaJobRow]:
        stmt = select(OtaJobRow.__table__)
        if status is not None:
            stmt = stmt.where(OtaJobRow.status == status)
        if firmware_id is not None:
            stmt = stmt.where(OtaJobRow.firmware_id == firmware_id)
        stmt = stmt.order_by(OtaJobRow.id.desc()).limit(limit).offset(offset)
        async with self._engine.connect() as conn:
            return [_job(r) for r in (await conn.execute(stmt)).all()]

    async def named(self, name: str) -> int | None:
        """The id of a job called ``name`` (paku's rollouts are known by a unique name)."""
        stmt = select(OtaJobRow.id).where(OtaJobRow.name == name).limit(1)
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return int(row[0]) if row else None

    async def device_updates(
        self, *, device_id: str | None, version: str | None, limit: int
    ) -> list[tuple[OtaNodeRow, str]]:
        """(device row of a job, the job's firmware version), most recently changed first: paku's
        update-status list, read from the rollouts' per-device states."""
        stmt = (
            select(OtaNodeRow.__table__, FirmwareRow.version.label("firmware_version"))
            .join(OtaJobRow, OtaJobRow.id == OtaNodeRow.job_id)
            .join(FirmwareRow, FirmwareRow.id == OtaJobRow.firmware_id)
        )
        if device_id is not None:
            stmt = stmt.where(OtaNodeRow.node_id == device_id)
        if version is not None:
            stmt = stmt.where(FirmwareRow.version == version)
        stmt = stmt.order_by(OtaNodeRow.updated_at.desc(), OtaNodeRow.job_id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        out = []
        for r in rows:
            values = dict(r._mapping)
            version_of = str(values.pop("firmware_version"))
            out.append((OtaNodeRow(**values), version_of))
        return out

    async def running(self) -> list[OtaJobRow]:
        """Rollouts the scheduler works on: distributing ones advance, paused ones still time out."""
        stmt = select(OtaJobRow.__table__).where(OtaJobRow.delivery == DEVICES, OtaJobRow.status.in_(JOB_ACTIVE))
        async with self._engine.connect() as conn:
            return [_job(r) for r in (await conn.execute(stmt.order_by(OtaJobRow.id))).all()]

    async def move(
        self,
        job_id: int,
        *,
        expect: Sequence[str] | None,
        values: dict[str, Any],
        guard: dict[str, Any] | None = None,
    ) -> bool:
        """Guarded update of a job: only while its status is one of ``expect`` (any, if None) and each
        ``guard`` field still has the value the caller read (compare-and-set: the rate clock, the wave)."""
        conditions = [OtaJobRow.id == job_id]
        if expect is not None:
            conditions.append(OtaJobRow.status.in_(expect))
        for name, expected in (guard or {}).items():
            column = getattr(OtaJobRow, name)
            conditions.append(column.is_(None) if expected is None else column == expected)
        async with self._engine.begin() as conn:
            result = await conn.execute(update(OtaJobRow).where(*conditions).values(**values))
        return bool(result.rowcount)

    async def delete(self, job_id: int, *, allowed: Sequence[str]) -> OtaJobRow:
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(OtaJobRow.__table__).where(OtaJobRow.id == job_id))).first()
            if row is None:
                raise NotFound("Update not found", field="update_id")
            result = await conn.execute(delete(OtaJobRow).where(OtaJobRow.id == job_id, OtaJobRow.status.in_(allowed)))
            if not result.rowcount:
                raise Conflict(
                    f"Cannot delete update {job_id} while it is {row.status}: cancel it first", field="status"
                )
            await conn.execute(delete(OtaNodeRow).where(OtaNodeRow.job_id == job_id))
        return _job(row)

    # -- the gateway lease --------------------------------------------------------------------------

    async def lease_pending(self, holder: str, *, now_ms: int, lease_ms: int) -> list[OtaJobRow]:
        """The oldest pending gateway job this ``holder`` may take, leased to it for ``lease_ms``.

        A job leased to another holder is skipped until its lease runs out; the guarded UPDATE is the
        atomic step, so two gateways polling at once never both get the same job."""
        free = or_(OtaJobRow.lease_holder.is_(None), OtaJobRow.lease_until < now_ms, OtaJobRow.lease_holder == holder)
        stmt = (
            select(OtaJobRow.id)
            .where(OtaJobRow.status == PENDING, OtaJobRow.delivery == GATEWAY, free)
            .order_by(OtaJobRow.created_at, OtaJobRow.id)
            .limit(20)
        )
        async with self._engine.connect() as conn:
            candidates = [int(r[0]) for r in (await conn.execute(stmt)).all()]
        for job_id in candidates:
            async with self._engine.begin() as conn:
                taken = await conn.execute(
                    update(OtaJobRow)
                    .where(OtaJobRow.id == job_id, OtaJobRow.status == PENDING, free)
                    .values(lease_holder=holder, lease_until=now_ms + lease_ms)
                )
            if taken.rowcount:
                return [await self.get(job_id)]
        return []

    # -- devices (nodes) ----------------------------------------------------------------------------

    async def node(self, job_id: int, node_id: str) -> OtaNodeRow | None:
        stmt = select(OtaNodeRow.__table__).where(OtaNodeRow.job_id == job_id, OtaNodeRow.node_id == node_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        return _node(row) if row else None

    async def nodes(self, job_id: int, *, status: str | None = None, limit: int = 10_000) -> list[OtaNodeRow]:
        stmt = select(OtaNodeRow.__table__).where(OtaNodeRow.job_id == job_id)
        if status is not None:
            stmt = stmt.where(OtaNodeRow.status == status)
        stmt = stmt.order_by(OtaNodeRow.wave, OtaNodeRow.position, OtaNodeRow.node_id).limit(limit)
        async with self._engine.connect() as conn:
            return [_node(r) for r in (await conn.execute(stmt)).all()]

    async def move_node(self, job_id: int, node_id: str, *, expect: Sequence[str], values: dict[str, Any]) -> bool:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(OtaNodeRow)
                .where(OtaNodeRow.job_id == job_id, OtaNodeRow.node_id == node_id, OtaNodeRow.status.in_(expect))
                .values(**values)
            )
        return bool(result.rowcount)

    async def upsert_node(self, job_id: int, node_id: str, values: dict[str, Any], *, now_ms: int) -> None:
        """Gateway jobs: a node's row is created by its first report and overwritten by the next."""
        row = {"job_id": job_id, "node_id": node_id, "wave": 0, "position": 0, "attempts": 0, "started_at": now_ms}
        row.update(values)
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(OtaNodeRow).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=["job_id", "node_id"], set_=values)
        async with self._engine.begin() as conn:
            await conn.execute(stmt)

    async def counts(self, job_ids: Sequence[int], *, since: dict[int, int] | None = None) -> dict[int, NodeCounts]:
        """Per job and wave: devices by status; with ``since`` (job → ms), also those that finished
        (and failed) at or after that time."""
        if not job_ids:
            return {}
        by_wave: dict[int, dict[int, dict[str, int]]] = {j: {} for j in job_ids}
        finished: dict[int, dict[int, int]] = {j: {} for j in job_ids}
        failed: dict[int, dict[int, int]] = {j: {} for j in job_ids}
        stmt = (
            select(OtaNodeRow.job_id, OtaNodeRow.wave, OtaNodeRow.status, func.count())
            .where(OtaNodeRow.job_id.in_(job_ids))
            .group_by(OtaNodeRow.job_id, OtaNodeRow.wave, OtaNodeRow.status)
        )
        async with self._engine.connect() as conn:
            for job_id, wave, status, n in (await conn.execute(stmt)).all():
                by_wave[job_id].setdefault(int(wave), {})[status] = int(n)
            for job_id, cutoff in (since or {}).items():
                recent = (
                    select(OtaNodeRow.wave, OtaNodeRow.status, func.count())
                    .where(
                        OtaNodeRow.job_id == job_id,
                        OtaNodeRow.status.in_(DEVICE_FINAL),
                        OtaNodeRow.completed_at >= cutoff,
                    )
                    .group_by(OtaNodeRow.wave, OtaNodeRow.status)
                )
                for wave, status, n in (await conn.execute(recent)).all():
                    finished[job_id][int(wave)] = finished[job_id].get(int(wave), 0) + int(n)
                    if status in (FAILED, TIMED_OUT):
                        failed[job_id][int(wave)] = failed[job_id].get(int(wave), 0) + int(n)
        return {j: NodeCounts(by_wave[j], finished[j], failed[j]) for j in job_ids}

    async def due(self, job_id: int, *, up_to_wave: int, limit: int) -> list[OtaNodeRow]:
        """Pending devices of the open waves, in wave and rank order: the next to notify."""
        stmt = (
            select(OtaNodeRow.__table__)
            .where(OtaNodeRow.job_id == job_id, OtaNodeRow.status == PENDING, OtaNodeRow.wave <= up_to_wave)
            .order_by(OtaNodeRow.wave, OtaNodeRow.position)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [_node(r) for r in (await conn.execute(stmt)).all()]

    async def overdue(self, job_id: int, *, now_ms: int, in_progress: Sequence[str]) -> list[OtaNodeRow]:
        stmt = select(OtaNodeRow.__table__).where(
            OtaNodeRow.job_id == job_id, OtaNodeRow.status.in_(in_progress), OtaNodeRow.deadline_at < now_ms
        )
        async with self._engine.connect() as conn:
            return [_node(r) for r in (await conn.execute(stmt)).all()]

    async def jobs_of_device(self, device_id: str, *, statuses: Sequence[str]) -> list[OtaJobRow]:
        """Jobs in ``statuses`` that list ``device_id``, newest first."""
        stmt = (
            select(OtaJobRow.__table__)
            .join(OtaNodeRow, and_(OtaNodeRow.job_id == OtaJobRow.id, OtaNodeRow.node_id == device_id))
            .where(OtaJobRow.status.in_(statuses))
            .order_by(OtaJobRow.id.desc())
        )
        async with self._engine.connect() as conn:
            return [_job(r) for r in (await conn.execute(stmt)).all()]

    async def running_versions(self) -> list[tuple[int, str]]:
        """(job id, target version) of running rollouts: a device reporting that version is done."""
        stmt = (
            select(OtaJobRow.id, FirmwareRow.version)
            .join(FirmwareRow, FirmwareRow.id == OtaJobRow.firmware_id)
            .where(OtaJobRow.delivery == DEVICES, OtaJobRow.status.in_(JOB_ACTIVE))
        )
        async with self._engine.connect() as conn:
            return [(int(r[0]), str(r[1])) for r in (await conn.execute(stmt)).all()]

    async def on_target_version(self) -> list[tuple[int, str, str]]:
        """(job, device, version) for unfinished devices of running, unforced rollouts whose registry
        ``fw_version`` is already the target (exact string; the listener handles ``v1.2``-style variants)."""
        stmt = (
            select(OtaNodeRow.job_id, OtaNodeRow.node_id, Device.fw_version)
            .join(OtaJobRow, OtaJobRow.id == OtaNodeRow.job_id)
            .join(FirmwareRow, FirmwareRow.id == OtaJobRow.firmware_id)
            .join(Device, Device.id == OtaNodeRow.node_id)
            .where(
                OtaJobRow.delivery == DEVICES,
                OtaJobRow.status.in_(JOB_ACTIVE),
                OtaJobRow.force_update.is_(False),
                OtaNodeRow.status != COMPLETED,
                Device.fw_version == FirmwareRow.version,
            )
            .limit(10_000)
        )
        async with self._engine.connect() as conn:
            return [(int(r[0]), str(r[1]), str(r[2])) for r in (await conn.execute(stmt)).all()]

    # -- what the devices' side needs ---------------------------------------------------------------

    async def devices_matching(
        self,
        *,
        model: str | Sequence[str] | None,
        ids: Sequence[str] | None,
        search: str | None,
        kind: str | None,
        parent_id: str | None,
        fw_version: str | None,
    ) -> list[tuple[str, str | None, str | None]]:
        """(id, model, fw_version) of enabled devices matching every given condition (``model``: one, or
        any of several)."""
        conditions: list[Any] = [Device.disabled.is_(False)]
        if isinstance(model, str):
            conditions.append(Device.model == model)
        elif model is not None:
            conditions.append(Device.model.in_(list(model)))
        if search:
            like = f"%{search.lower()}%"
            conditions.append(or_(func.lower(Device.id).like(like), func.lower(Device.name).like(like)))
        if kind is not None:
            conditions.append(Device.kind == kind)
        if parent_id is not None:
            conditions.append(Device.parent_id == parent_id)
        if fw_version is not None:
            conditions.append(Device.fw_version == fw_version)
        columns = select(Device.id, Device.model, Device.fw_version)
        out: list[tuple[str, str | None, str | None]] = []
        async with self._engine.connect() as conn:
            if ids is None:
                out = [(r[0], r[1], r[2]) for r in (await conn.execute(columns.where(*conditions))).all()]
            else:
                for chunk in _chunks(list(ids)):
                    stmt = columns.where(*conditions, Device.id.in_(chunk))
                    out.extend((r[0], r[1], r[2]) for r in (await conn.execute(stmt)).all())
        return out

    async def known_devices(self, ids: Sequence[str]) -> dict[str, tuple[str | None, bool]]:
        """id → (model, disabled) for the ids that exist."""
        out: dict[str, tuple[str | None, bool]] = {}
        async with self._engine.connect() as conn:
            for chunk in _chunks(list(ids)):
                stmt = select(Device.id, Device.model, Device.disabled).where(Device.id.in_(chunk))
                out.update({r[0]: (r[1], bool(r[2])) for r in (await conn.execute(stmt)).all()})
        return out

    async def expire_commands(self, command_ids: Sequence[str]) -> int:
        """Queued ``ota`` commands of a cancelled rollout will not go out after all."""
        total = 0
        async with self._engine.begin() as conn:
            for chunk in _chunks(list(command_ids)):
                result = await conn.execute(
                    update(CommandRow)
                    .where(CommandRow.id.in_(chunk), CommandRow.status == "queued", CommandRow.name == "ota")
                    .values(status="expired")
                )
                total += int(result.rowcount or 0)
        return total

    async def reject(self, *, device_id: str, reason: str, payload: bytes, now_ms: int, topic: str | None) -> None:
        """An OTA report that could not be taken, kept with its reason (nothing refused is silent)."""
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(RejectedMessage).values(
                    received_at=now_ms,
                    source="mqtt",
                    topic=topic,
                    device_id=device_id,
                    reason=reason[:1000],
                    payload=payload.decode("utf-8", "replace")[:4096],
                )
            )
