"""Firmware rows: metadata of the images the OTA store keeps on disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.errors import Conflict, NotFound
from telemetra.domain.ota import JOB_ACTIVE
from telemetra.storage.schema import FirmwareRow, OtaJobRow, OtaNodeRow


@dataclass(frozen=True, slots=True)
class FirmwarePage:
    items: list[FirmwareRow]
    total: int


def _firmware(row: Any) -> FirmwareRow:
    return FirmwareRow(**row._mapping)


class FirmwareRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(self, **values: Any) -> FirmwareRow:
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(insert(FirmwareRow).values(**values))
                new_id = result.inserted_primary_key[0]  # type: ignore[index]
        except IntegrityError:
            raise Conflict(
                f"firmware {values['model']!r} {values['version']!r} for hardware {values['hardware']!r} "
                "already exists; delete it first or upload another version",
                field="version",
            ) from None
        return await self.get(int(new_id))

    async def exists(self, model: str, version: str, hardware: str) -> bool:
        stmt = select(FirmwareRow.id).where(
            FirmwareRow.model == model, FirmwareRow.version == version, FirmwareRow.hardware == hardware
        )
        async with self._engine.connect() as conn:
            return (await conn.execute(stmt)).first() is not None

    async def get(self, firmware_id: int) -> FirmwareRow:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(FirmwareRow.__table__).where(FirmwareRow.id == firmware_id))).first()
        if row is None:
            raise NotFound("Firmware not found", field="firmware_id")
        return _firmware(row)

    async def page(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        hardware: str | None = None,
        is_stable: bool | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> FirmwarePage:
        conditions: list[Any] = []
        if model is not None:
            conditions.append(FirmwareRow.model == model)
        if version is not None:
            conditions.append(FirmwareRow.version == version)
        if hardware is not None:
            conditions.append(FirmwareRow.hardware == hardware)
        if is_stable is not None:
            conditions.append(FirmwareRow.is_stable.is_(is_stable))
        table = FirmwareRow.__table__
        async with self._engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(table).where(*conditions))).scalar_one()
            rows = (
                await conn.execute(
                    select(table).where(*conditions).order_by(FirmwareRow.id.desc()).limit(limit).offset(offset)
                )
            ).all()
        return FirmwarePage([_firmware(r) for r in rows], int(total))

    async def by_version(self, version: str, model: str | None = None) -> FirmwareRow | None:
        """The newest firmware with exactly this stored ``version`` (of ``model``, if given): paku's
        firmware is keyed by (version, device model), not by id."""
        stmt = select(FirmwareRow.__table__).where(FirmwareRow.version == version)
        if model is not None:
            stmt = stmt.where(FirmwareRow.model == model)
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt.order_by(FirmwareRow.id.desc()).limit(1))).first()
        return _firmware(row) if row else None

    async def for_model(self, model: str | None) -> list[FirmwareRow]:
        """Every firmware of ``model`` (all models when None), for the manifest to order by version."""
        stmt = select(FirmwareRow.__table__)
        if model is not None:
            stmt = stmt.where(FirmwareRow.model == model)
        async with self._engine.connect() as conn:
            return [_firmware(r) for r in (await conn.execute(stmt.order_by(FirmwareRow.id))).all()]

    async def set_stable(self, firmware_id: int, is_stable: bool | None) -> FirmwareRow:
        """Set the star, or toggle it when ``is_stable`` is None (iotmesh's PATCH toggles)."""
        async with self._engine.begin() as conn:
            value: Any = ~FirmwareRow.is_stable if is_stable is None else is_stable
            result = await conn.execute(
                update(FirmwareRow).where(FirmwareRow.id == firmware_id).values(is_stable=value)
            )
        if not result.rowcount:
            raise NotFound("Firmware not found", field="firmware_id")
        return await self.get(firmware_id)

    async def delete(self, firmware_id: int) -> FirmwareRow:
        """Delete the row with its pending and finished jobs; refused while one of its rollouts runs.
        The caller removes the file once this committed."""
        async with self._engine.begin() as conn:
            # FOR UPDATE (PostgreSQL) serialises this with a job being created for the same firmware.
            stmt = select(FirmwareRow.__table__).where(FirmwareRow.id == firmware_id).with_for_update()
            row = (await conn.execute(stmt)).first()
            if row is None:
                raise NotFound("Firmware not found", field="firmware_id")
            running = (
                await conn.execute(
                    select(OtaJobRow.id).where(OtaJobRow.firmware_id == firmware_id, OtaJobRow.status.in_(JOB_ACTIVE))
                )
            ).all()
            if running:
                ids = ", ".join(str(r[0]) for r in running)
                raise Conflict(
                    f"firmware {firmware_id} is used by running update(s) {ids}: cancel or complete them first",
                    field="firmware_id",
                )
            job_ids = select(OtaJobRow.id).where(OtaJobRow.firmware_id == firmware_id).scalar_subquery()
            await conn.execute(delete(OtaNodeRow).where(OtaNodeRow.job_id.in_(job_ids)))
            await conn.execute(delete(OtaJobRow).where(OtaJobRow.firmware_id == firmware_id))
            await conn.execute(delete(FirmwareRow).where(FirmwareRow.id == firmware_id))
        return _firmware(row)

    async def paths(self) -> set[str]:
        async with self._engine.connect() as conn:
            return {r[0] for r in (await conn.execute(select(FirmwareRow.path))).all()}
