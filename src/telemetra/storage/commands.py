"""Commands down to devices and alerts: the rows behind their lifecycles."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.errors import Conflict, NotFound
from telemetra.storage.schema import AlertRow, CommandRow, Device

OPEN = ("queued", "sent")


def _takeable(for_poll_before: int | None) -> Any:
    wanted = CommandRow.status == "queued"
    if for_poll_before is None:
        return wanted
    unanswered = CommandRow.status == "sent"
    return or_(
        wanted,
        and_(unanswered, CommandRow.sent_via == "mqtt"),
        and_(unanswered, CommandRow.sent_at < for_poll_before),
    )


class CommandRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(self, device_id: str, name: str, params: Any, *, now_ms: int, ttl_s: int) -> CommandRow:
        row = {
            "id": str(uuid.uuid4()),
            "device_id": device_id,
            "name": name,
            "params": params,
            "status": "queued",
            "created_at": now_ms,
            "expires_at": now_ms + ttl_s * 1000,
            "sent_via": None,
            "sent_at": None,
            "acked_at": None,
            "result": None,
        }
        async with self._engine.begin() as conn:
            await conn.execute(CommandRow.__table__.insert().values(**row))
        return CommandRow(**row)

    async def get(self, command_id: str, device_id: str | None = None) -> CommandRow:
        stmt = select(CommandRow.__table__).where(CommandRow.id == command_id)
        if device_id is not None:
            stmt = stmt.where(CommandRow.device_id == device_id)
        async with self._engine.connect() as conn:
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFound(f"command {command_id!r} not found", field="command_id")
        return CommandRow(**row._mapping)

    async def list(self, device_id: str, *, status: str | None = None, limit: int = 100) -> list[CommandRow]:
        stmt = select(CommandRow.__table__).where(CommandRow.device_id == device_id)
        if status:
            stmt = stmt.where(CommandRow.status == status)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(CommandRow.created_at.desc()).limit(limit))).all()
        return [CommandRow(**r._mapping) for r in rows]

    async def queued(
        self, device_id: str, *, now_ms: int, limit: int = 100, for_poll_before: int | None = None
    ) -> list[CommandRow]:
        """Queued commands; with ``for_poll_before`` (an HTTP poll), also those published over MQTT that
        are still unanswered (the device is evidently not listening there) and those handed to an
        HTTP poller before then that are still unanswered (it lost its answer: at least once, like QoS 1)."""
        stmt = (
            select(CommandRow.__table__)
            .where(CommandRow.device_id == device_id, _takeable(for_poll_before), CommandRow.expires_at > now_ms)
            .order_by(CommandRow.created_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [CommandRow(**r._mapping) for r in (await conn.execute(stmt)).all()]

    async def devices_with_queued(self, *, now_ms: int) -> set[str]:
        stmt = select(CommandRow.device_id).where(CommandRow.status == "queued", CommandRow.expires_at > now_ms)
        async with self._engine.connect() as conn:
            return {r[0] for r in (await conn.execute(stmt.distinct())).all()}

    async def mark_sent(
        self, command_ids: list[str], *, now_ms: int, via: str, for_poll_before: int | None = None
    ) -> list[str]:
        """Claim commands for sending: queued (or, for a poll, takeable) → sent. Returns the ids this call
        moved; another dispatcher or poller, in this process or another, may have taken the rest."""
        moved = []
        async with self._engine.begin() as conn:
            for command_id in command_ids:
                result = await conn.execute(
                    update(CommandRow)
                    .where(CommandRow.id == command_id, _takeable(for_poll_before))
                    .values(status="sent", sent_at=now_ms, sent_via=via)
                )
                if result.rowcount:
                    moved.append(command_id)
        return moved

    async def release(self, command_ids: list[str]) -> None:
        """Back to queued: claimed for publishing, but the publish failed."""
        if not command_ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                update(CommandRow)
                .where(CommandRow.id.in_(command_ids), CommandRow.status == "sent")
                .values(status="queued", sent_at=None, sent_via=None)
            )

    async def expire(self, *, now_ms: int) -> list[tuple[str, str]]:
        """Expire what outlived its TTL; returns the (command id, device id) of each."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(CommandRow)
                .where(CommandRow.status.in_(OPEN), CommandRow.expires_at <= now_ms)
                .values(status="expired")
                .returning(CommandRow.id, CommandRow.device_id)
            )
            return [(row[0], row[1]) for row in result.all()]

    async def set_desired_config(self, device_id: str, config: dict[str, Any], *, now_ms: int) -> int:
        async with self._engine.begin() as conn:
            version = (
                await conn.execute(select(Device.desired_version).where(Device.id == device_id).with_for_update())
            ).scalar_one_or_none()
            if version is None:
                raise NotFound(f"device {device_id!r} not found", field="device_id")
            new_version = int(version) + 1
            await conn.execute(
                update(Device)
                .where(Device.id == device_id)
                .values(desired_config=config, desired_version=new_version, updated_at=now_ms)
            )
        return new_version


class AlertRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list(
        self,
        *,
        status: str | None,
        device_id: str | None,
        limit: int,
        since: int | None = None,
        type_: str | None = None,
        rule_id: int | None = None,
    ) -> list[AlertRow]:
        """Newest first; ``since``: only alerts raised or repeated from then on."""
        stmt = select(AlertRow.__table__)
        if type_ is not None:
            stmt = stmt.where(AlertRow.type == type_)
        if rule_id is not None:
            stmt = stmt.where(AlertRow.rule_id == rule_id)
        if since is not None:
            stmt = stmt.where(AlertRow.updated_at >= since)
        if status:
            stmt = stmt.where(AlertRow.status == status)
        if device_id:
            stmt = stmt.where(AlertRow.device_id == device_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(AlertRow.id.desc()).limit(limit))).all()
        return [AlertRow(**r._mapping) for r in rows]

    async def counts(self) -> dict[str, dict[str, int]]:
        """How many alerts per status, and the open ones (active or acknowledged) per type and severity."""
        open_ = AlertRow.status.in_(("active", "acknowledged"))
        async with self._engine.connect() as conn:
            by_status = (await conn.execute(select(AlertRow.status, func.count()).group_by(AlertRow.status))).all()
            by_type = (
                await conn.execute(select(AlertRow.type, func.count()).where(open_).group_by(AlertRow.type))
            ).all()
            by_severity = (
                await conn.execute(select(AlertRow.severity, func.count()).where(open_).group_by(AlertRow.severity))
            ).all()
        return {
            "status": {"active": 0, "acknowledged": 0, "cleared": 0} | {s: int(n) for s, n in by_status},
            "open_by_type": {t: int(n) for t, n in by_type},
            "open_by_severity": {s: int(n) for s, n in by_severity},
        }

    async def transition(self, alert_id: int, to: str, *, now_ms: int) -> AlertRow:
        """active → acknowledged → cleared (an active alert may also be cleared directly)."""
        allowed_from = {"acknowledged": ("active",), "cleared": ("active", "acknowledged")}[to]
        stamp = {"acknowledged": "acknowledged_at", "cleared": "cleared_at"}[to]
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(AlertRow)
                .where(AlertRow.id == alert_id, AlertRow.status.in_(allowed_from))
                .values(status=to, updated_at=now_ms, **{stamp: now_ms})
            )
            row = (await conn.execute(select(AlertRow.__table__).where(AlertRow.id == alert_id))).first()
        if row is None:
            raise NotFound(f"alert {alert_id} not found", field="alert_id")
        if not result.rowcount:
            raise Conflict(f"alert {alert_id} is {row.status}; cannot move to {to}", field="status")
        return AlertRow(**row._mapping)
