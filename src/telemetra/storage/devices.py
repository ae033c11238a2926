"""The device registry: create, list, update, delete (with data), credentials and claim codes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, not_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain import presence
from telemetra.domain.credentials import hash_claim_code, hash_secret, new_claim_code, new_device_secret
from telemetra.domain.errors import Conflict, Gone, NotFound
from telemetra.storage.schema import (
    AlertRow,
    ClaimCode,
    CommandRow,
    Device,
    DeviceState,
    EventRow,
    LatestRow,
    Rollup1h,
    Rollup1m,
    RuleStateRow,
    StateHistory,
    TelemetryRow,
)

_EDITABLE = ("name", "model", "kind", "parent_id", "notes", "meta", "fw_version", "role", "disabled")
# Ids per IN (...) list: well under SQLite's and asyncpg's bound-parameter limits.
_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class DevicePage:
    devices: list[Device]
    total: int


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a broker's copy of the registry needs about one device."""

    id: str
    secret_hash: str | None
    disabled: bool


class DeviceRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(
        self, device_id: str, *, now_ms: int, with_secret: bool = True, **fields: Any
    ) -> tuple[Device, str | None]:
        secret = new_device_secret() if with_secret else None
        device = _new_device(device_id, now_ms, secret_hash=hash_secret(secret) if secret else None, **fields)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(Device.__table__.insert().values(**_row(device)))
        except IntegrityError:
            raise Conflict(f"device {device_id!r} already exists", field="id") from None
        return device, secret

    async def get(self, device_id: str) -> Device:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(Device.__table__).where(Device.id == device_id))).first()
        if row is None:
            raise NotFound(f"device {device_id!r} not found", field="device_id")
        return _from_row(row)

    async def find(self, device_id: str) -> Device | None:
        try:
            return await self.get(device_id)
        except NotFound:
            return None

    async def by_secret(self, secret: str) -> Device | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(Device.__table__).where(Device.secret_hash == hash_secret(secret)))
            ).first()
        return _from_row(row) if row else None

    async def list(
        self,
        *,
        model: str | None = None,
        online: bool | None = None,
        search: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
        now_ms: int = 0,
        offline_after_s: int = 120,
        recent_first: bool = False,
        sort: str | None = None,
    ) -> DevicePage:
        """By id; ``recent_first``: most recently heard from first (the seeds' dashboards), never heard last;
        ``sort``: one of ``SORTABLE`` (``-`` first for descending), empty values last, then by id."""
        conditions: list[Any] = []
        if model is not None:
            conditions.append(Device.model == model)
        if online is not None:
            # domain.presence's rule, in SQL: flagged online and heard from since the cutoff.
            cutoff = presence.offline_cutoff(now_ms, offline_after_s)
            fresh = and_(Device.online.is_(True), func.coalesce(Device.last_seen_at, 0) > cutoff)
            conditions.append(fresh if online else not_(fresh))
        if kind is not None:
            conditions.append(Device.kind == kind)
        if search:
            like = f"%{search.lower()}%"
            conditions.append(
                or_(
                    func.lower(Device.id).like(like),
                    func.lower(Device.name).like(like),
                    func.lower(Device.notes).like(like),
                )
            )
        table = Device.__table__
        order = (Device.last_seen_at.desc().nulls_last(), Device.id) if recent_first else (Device.id,)
        if sort:
            order = _sort_order(sort)
        async with self._engine.connect() as conn:
            total = (await conn.execute(select(func.count()).select_from(table).where(*conditions))).scalar_one()
            rows = (
                await conn.execute(select(table).where(*conditions).order_by(*order).limit(limit).offset(offset))
            ).all()
        return DevicePage([_from_row(r) for r in rows], int(total))

    async def credentials(self, device_id: str | None = None) -> list[DeviceCredentials]:
        """Every device's (or one device's) credential hash and enabled flag: the registry side of a
        reconciliation with the MQTT broker's accounts."""
        query = select(Device.id, Device.secret_hash, Device.disabled)
        if device_id is not None:
            query = query.where(Device.id == device_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [DeviceCredentials(r.id, r.secret_hash, bool(r.disabled)) for r in rows]

    async def update(self, device_id: str, *, now_ms: int, **fields: Any) -> Device:
        values = {k: v for k, v in fields.items() if k in _EDITABLE}
        values["updated_at"] = now_ms
        async with self._engine.begin() as conn:
            result = await conn.execute(update(Device).where(Device.id == device_id).values(**values))
        if result.rowcount == 0:
            raise NotFound(f"device {device_id!r} not found", field="device_id")
        return await self.get(device_id)

    async def rotate(self, device_id: str, *, now_ms: int) -> tuple[Device, str]:
        secret = new_device_secret()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(Device).where(Device.id == device_id).values(secret_hash=hash_secret(secret), updated_at=now_ms)
            )
        if result.rowcount == 0:
            raise NotFound(f"device {device_id!r} not found", field="device_id")
        return await self.get(device_id), secret

    async def delete(self, device_id: str) -> None:
        """Delete the device and everything stored for it, in one transaction."""
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(Device).where(Device.id == device_id))
            if result.rowcount == 0:
                raise NotFound(f"device {device_id!r} not found", field="device_id")
            for model in (
                TelemetryRow,
                Rollup1m,
                Rollup1h,
                LatestRow,
                DeviceState,
                StateHistory,
                EventRow,
                ClaimCode,
                CommandRow,
                AlertRow,
                RuleStateRow,
            ):
                await conn.execute(delete(model).where(model.device_id == device_id))

    async def create_claim_codes(
        self, device_ids: Sequence[str], *, now_ms: int, ttl_s: int, **fields: Any
    ) -> list[tuple[str, str]]:
        """Create (or reuse, if not yet claimed) devices without credentials and one code for each.

        A fixed number of statements however many devices (a batch of 1,000 was 3,000 round trips)."""
        wanted = list(dict.fromkeys(device_ids))
        codes = [(device_id, new_claim_code()) for device_id in device_ids]
        async with self._engine.begin() as conn:
            existing: dict[str, str | None] = {}
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                rows = await conn.execute(select(Device.id, Device.secret_hash).where(Device.id.in_(chunk)))
                existing.update((row.id, row.secret_hash) for row in rows)
            taken = next((d for d in wanted if existing.get(d) is not None), None)
            if taken is not None:
                raise Conflict(f"device {taken!r} already has credentials", field="device_ids")
            new = [
                _row(_new_device(d, now_ms, kind=fields.get("kind"), model=fields.get("model")))
                for d in wanted
                if d not in existing
            ]
            if new:
                await conn.execute(Device.__table__.insert(), new)
            await conn.execute(
                ClaimCode.__table__.insert(),
                [
                    {
                        "code_hash": hash_claim_code(code),
                        "device_id": device_id,
                        "created_at": now_ms,
                        "expires_at": now_ms + ttl_s * 1000,
                    }
                    for device_id, code in codes
                ],
            )
        return codes

    async def claim(self, code: str, *, now_ms: int) -> tuple[Device, str]:
        """Exchange a claim code once for the device's credentials."""
        secret = new_device_secret()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    select(ClaimCode.__table__).where(ClaimCode.__table__.c.code_hash == hash_claim_code(code))
                )
            ).first()
            if row is None:
                raise NotFound("unknown claim code", field="claim_code")
            if row.used_at is not None:
                raise Gone("this claim code has already been used", field="claim_code")
            if row.expires_at < now_ms:
                raise Gone("this claim code has expired", field="claim_code")
            # The guarded UPDATE makes a concurrent second claim of the same code lose cleanly.
            used = await conn.execute(
                update(ClaimCode)
                .where(ClaimCode.code_hash == row.code_hash, ClaimCode.used_at.is_(None))
                .values(used_at=now_ms)
            )
            if used.rowcount != 1:
                raise Gone("this claim code has already been used", field="claim_code")
            await conn.execute(
                update(Device)
                .where(Device.id == row.device_id)
                .values(secret_hash=hash_secret(secret), updated_at=now_ms)
            )
            device_id = row.device_id
        return await self.get(device_id), secret


def _new_device(device_id: str, now_ms: int, **fields: Any) -> Device:
    """A registry row as the admin creates it: enabled, offline, not auto-registered."""
    return Device(
        id=device_id,
        kind=fields.pop("kind", None) or "device",
        meta=fields.pop("meta", None) or {},
        disabled=False,
        auto_registered=False,
        online=False,
        created_at=now_ms,
        updated_at=now_ms,
        desired_version=0,
        **fields,
    )


def _row(device: Device) -> dict[str, Any]:
    values = {c.key: getattr(device, c.key) for c in Device.__mapper__.column_attrs}
    values["metadata"] = values.pop("meta")
    return {k: v for k, v in values.items() if v is not None or k == "metadata"}


def _from_row(row: Any) -> Device:
    values = dict(row._mapping)
    values["meta"] = values.pop("metadata")
    return Device(**values)


# What the dashboard's fleet table sorts by (API name → column).
SORTABLE: dict[str, Any] = {
    "id": Device.id,
    "name": Device.name,
    "model": Device.model,
    "kind": Device.kind,
    "fw_version": Device.fw_version,
    "last_seen_at": Device.last_seen_at,
    "created_at": Device.created_at,
}


def _sort_order(sort: str) -> tuple[Any, ...]:
    descending = sort.startswith("-")
    column = SORTABLE.get(sort.removeprefix("-"))
    if column is None:
        raise ValueError(f"unknown sort {sort!r}")
    if column is Device.id:
        return (column.desc() if descending else column.asc(),)
    # NULLS LAST both ways: a device never heard from, or without a model, is never the first row.
    return ((column.desc() if descending else column.asc()).nulls_last(), Device.id)
