"""Rules, where each stands per device, and the alerts they raise and clear.

Every transition is one conditional statement, so when several processes evaluate the same committed
reading (each sees every commit through the event bridge) exactly one of them makes it and raises or
clears the alert, in the same transaction: pending → firing is an upsert that only updates a pending row
(or inserts), firing → cleared a delete of the firing row, online → offline an update of a device still
online and still silent. The loser sees no row changed and does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.errors import Conflict, NotFound
from telemetra.domain.rules import FIRING, OFFLINE, PENDING, Rule, Standing
from telemetra.storage.database import write_gate
from telemetra.storage.schema import AlertRow, Device, LatestRow, RuleRow, RuleStateRow

OPEN = ("active", "acknowledged")
# A rule's own fields, as the API and the rules file write them.
RULE_FIELDS = (
    "name",
    "kind",
    "key",
    "op",
    "value",
    "for_s",
    "clear_value",
    "severity",
    "devices",
    "models",
    "kinds",
    "enabled",
)


def rule_of(row: RuleRow) -> Rule:
    return Rule(
        id=row.id,
        name=row.name,
        kind=row.kind,
        severity=row.severity,
        key=row.key,
        op=row.op,
        value=row.value,
        for_s=row.for_s,
        clear_value=row.clear_value,
        devices=tuple(row.devices) if row.devices is not None else None,
        models=tuple(row.models) if row.models is not None else None,
        kinds=tuple(row.kinds) if row.kinds is not None else None,
        enabled=bool(row.enabled),
    )


def _alert_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


class RuleRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    # --- the rules ------------------------------------------------------------------------------------

    async def list(self) -> list[RuleRow]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(RuleRow.__table__).order_by(RuleRow.id))).all()
        return [RuleRow(**r._mapping) for r in rows]

    async def get(self, rule_id: int) -> RuleRow:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(RuleRow.__table__).where(RuleRow.id == rule_id))).first()
        if row is None:
            raise NotFound(f"rule {rule_id} not found", field="rule_id")
        return RuleRow(**row._mapping)

    async def create(self, values: dict[str, Any], *, now_ms: int, source: str = "api") -> RuleRow:
        row = {f: values.get(f) for f in RULE_FIELDS} | {"source": source, "created_at": now_ms, "updated_at": now_ms}
        row["for_s"] = row["for_s"] or 0
        row["enabled"] = True if row["enabled"] is None else row["enabled"]
        async with self._engine.begin() as conn:
            result = await conn.execute(RuleRow.__table__.insert().values(**row))
            assert result.inserted_primary_key is not None
            rule_id = int(result.inserted_primary_key[0])
        return await self.get(rule_id)

    async def update(self, rule_id: int, values: dict[str, Any], *, now_ms: int) -> RuleRow:
        """Replace the rule's fields; where it stood is forgotten (the new rule starts afresh)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(RuleRow).where(RuleRow.id == rule_id).values(**values, updated_at=now_ms)
            )
            if not result.rowcount:
                raise NotFound(f"rule {rule_id} not found", field="rule_id")
            await conn.execute(delete(RuleStateRow).where(RuleStateRow.rule_id == rule_id))
        return await self.get(rule_id)

    async def delete(self, rule_id: int, *, now_ms: int) -> list[dict[str, Any]]:
        """Delete the rule; its open alerts are cleared (returned, to be announced)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(RuleRow).where(RuleRow.id == rule_id))
            if not result.rowcount:
                raise NotFound(f"rule {rule_id} not found", field="rule_id")
            await conn.execute(delete(RuleStateRow).where(RuleStateRow.rule_id == rule_id))
            return await self._clear_alerts(conn, and_(AlertRow.rule_id == rule_id), now_ms=now_ms)

    async def sync_file(self, rules: Sequence[dict[str, Any]], *, now_ms: int) -> int:
        """Make the rules from the rules file (``source = file``, known by name) what the file says."""
        names = [r["name"] for r in rules]
        if len(set(names)) != len(names):
            raise Conflict("two rules in the rules file have the same name", field="name")
        async with self._engine.begin() as conn:
            if self._pg:  # two processes starting together load the file one after the other
                await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7355609)")
            existing = {
                r.name: r.id
                for r in (await conn.execute(select(RuleRow.id, RuleRow.name).where(RuleRow.source == "file"))).all()
            }
            for values in rules:
                fields = {f: values.get(f) for f in RULE_FIELDS}
                fields["for_s"] = fields["for_s"] or 0
                fields["enabled"] = True if fields["enabled"] is None else fields["enabled"]
                rule_id = existing.pop(values["name"], None)
                if rule_id is None:
                    await conn.execute(
                        RuleRow.__table__.insert().values(**fields, source="file", created_at=now_ms, updated_at=now_ms)
                    )
                else:
                    current = (await conn.execute(select(RuleRow.__table__).where(RuleRow.id == rule_id))).one()
                    if any(current._mapping[f] != fields[f] for f in RULE_FIELDS):
                        await conn.execute(
                            update(RuleRow).where(RuleRow.id == rule_id).values(**fields, updated_at=now_ms)
                        )
                        await conn.execute(delete(RuleStateRow).where(RuleStateRow.rule_id == rule_id))
            for rule_id in existing.values():
                await conn.execute(delete(RuleRow).where(RuleRow.id == rule_id))
                await conn.execute(delete(RuleStateRow).where(RuleStateRow.rule_id == rule_id))
        return len(rules)

    # --- where each rule stands -----------------------------------------------------------------------

    async def standings(self) -> dict[tuple[int, str], Standing]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(RuleStateRow.__table__))).all()
        return {(r.rule_id, r.device_id): Standing(r.status, r.since, r.value) for r in rows}

    async def standing(self, rule_id: int, device_id: str) -> Standing | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(RuleStateRow.__table__).where(
                        RuleStateRow.rule_id == rule_id, RuleStateRow.device_id == device_id
                    )
                )
            ).first()
        return Standing(row.status, row.since, row.value) if row is not None else None

    async def set_pending(self, rule_id: int, device_id: str, standing: Standing, *, now_ms: int) -> None:
        insert = postgresql.insert(RuleStateRow) if self._pg else sqlite.insert(RuleStateRow)
        stmt = insert.values(
            rule_id=rule_id,
            device_id=device_id,
            status=PENDING,
            since=standing.since,
            value=standing.value,
            updated_at=now_ms,
        ).on_conflict_do_update(
            index_elements=["rule_id", "device_id"],
            set_={"value": standing.value, "updated_at": now_ms},
            where=RuleStateRow.status == PENDING,
        )
        async with write_gate(self._engine), self._engine.begin() as conn:
            await conn.execute(stmt)

    async def forget_pending(self, rule_id: int, device_id: str) -> None:
        async with write_gate(self._engine), self._engine.begin() as conn:
            await conn.execute(
                delete(RuleStateRow).where(
                    RuleStateRow.rule_id == rule_id, RuleStateRow.device_id == device_id, RuleStateRow.status == PENDING
                )
            )

    async def fire(
        self, rule: Rule, device_id: str, standing: Standing, *, now_ms: int, message: str
    ) -> dict[str, Any] | None:
        """Pending (or nothing) → firing, and the alert raised; None when another process got there first."""
        insert = postgresql.insert(RuleStateRow) if self._pg else sqlite.insert(RuleStateRow)
        stmt = (
            insert.values(
                rule_id=rule.id,
                device_id=device_id,
                status=FIRING,
                since=standing.since,
                value=standing.value,
                updated_at=now_ms,
            )
            .on_conflict_do_update(
                index_elements=["rule_id", "device_id"],
                set_={"status": FIRING, "value": standing.value, "updated_at": now_ms},
                where=RuleStateRow.status == PENDING,
            )
            .returning(RuleStateRow.rule_id)
        )
        async with write_gate(self._engine), self._engine.begin() as conn:
            if (await conn.execute(stmt)).first() is None:
                return None
            return await self._raise(conn, rule, device_id, standing.value, message=message, now_ms=now_ms)

    async def clear(self, rule_id: int, device_id: str, *, now_ms: int) -> list[dict[str, Any]]:
        """Firing → cleared; the alerts cleared (none when another process got there first)."""
        async with write_gate(self._engine), self._engine.begin() as conn:
            gone = await conn.execute(
                delete(RuleStateRow)
                .where(
                    RuleStateRow.rule_id == rule_id, RuleStateRow.device_id == device_id, RuleStateRow.status == FIRING
                )
                .returning(RuleStateRow.rule_id)
            )
            if gone.first() is None:
                return []
            where = and_(AlertRow.rule_id == rule_id, AlertRow.device_id == device_id)
            return await self._clear_alerts(conn, where, now_ms=now_ms)

    async def pending(self) -> list[tuple[int, str, Standing]]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(RuleStateRow.__table__).where(RuleStateRow.status == PENDING))).all()
        return [(r.rule_id, r.device_id, Standing(r.status, r.since, r.value)) for r in rows]

    async def last_readings(self, key: str) -> list[tuple[str, str | None, str | None, int]]:
        """Every device's newest reading time of ``key``: (device, model, kind, ts)."""
        stmt = (
            select(LatestRow.device_id, Device.model, Device.kind, LatestRow.ts)
            .join(Device, Device.id == LatestRow.device_id)
            .where(LatestRow.key == key)
        )
        async with self._engine.connect() as conn:
            return [(r[0], r[1], r[2], int(r[3])) for r in (await conn.execute(stmt)).all()]

    # --- presence -------------------------------------------------------------------------------------

    async def silent_devices(self, *, before: int) -> list[tuple[str, str | None, str | None, int]]:
        """Devices flagged online and not heard from since ``before``: (id, model, kind, last seen)."""
        stmt = select(Device.id, Device.model, Device.kind, Device.last_seen_at).where(
            Device.online.is_(True), Device.last_seen_at <= before
        )
        async with self._engine.connect() as conn:
            return [(r[0], r[1], r[2], int(r[3])) for r in (await conn.execute(stmt)).all()]

    async def mark_offline(
        self, device_id: str, *, cutoff: int, rule: Rule | None, severity: str, now_ms: int, message: str
    ) -> dict[str, Any] | None:
        """Online → offline if still silent since ``cutoff``, and the offline alert raised; None when the
        device spoke meanwhile or another process marked it first."""
        async with write_gate(self._engine), self._engine.begin() as conn:
            result = await conn.execute(
                update(Device)
                .where(Device.id == device_id, Device.online.is_(True), Device.last_seen_at <= cutoff)
                .values(online=False)
            )
            if not result.rowcount:
                return None
            return await self._raise_offline(conn, device_id, rule, severity, message=message, now_ms=now_ms)

    async def raise_offline(
        self, device_id: str, *, rule: Rule | None, severity: str, now_ms: int, message: str
    ) -> dict[str, Any] | None:
        """A device that said it went offline (Last Will, a state message): the alert, if it still is and
        none is open yet."""
        async with write_gate(self._engine), self._engine.begin() as conn:
            online = (await conn.execute(select(Device.online).where(Device.id == device_id))).scalar_one_or_none()
            if online is None or online:
                return None
            if await self._open_offline(conn, device_id) is not None:
                return None
            return await self._raise_offline(conn, device_id, rule, severity, message=message, now_ms=now_ms)

    async def clear_returned(self, *, now_ms: int, device_id: str | None = None) -> list[dict[str, Any]]:
        """Open offline alerts of devices that are online again (flagged, and heard from since the alert)."""
        stmt = (
            select(AlertRow.id)
            .join(Device, Device.id == AlertRow.device_id)
            .where(
                AlertRow.type == OFFLINE,
                AlertRow.status.in_(OPEN),
                Device.online.is_(True),
                Device.last_seen_at >= AlertRow.created_at,
            )
        )
        if device_id is not None:
            stmt = stmt.where(AlertRow.device_id == device_id)
        async with write_gate(self._engine), self._engine.begin() as conn:
            ids = [r[0] for r in (await conn.execute(stmt)).all()]
            if not ids:
                return []
            return await self._clear_alerts(conn, AlertRow.id.in_(ids), now_ms=now_ms)

    # --- alerts ---------------------------------------------------------------------------------------

    async def _open_offline(self, conn: AsyncConnection, device_id: str) -> int | None:
        stmt = select(AlertRow.id).where(
            AlertRow.device_id == device_id, AlertRow.type == OFFLINE, AlertRow.status.in_(OPEN)
        )
        return (await conn.execute(stmt.limit(1))).scalar_one_or_none()

    async def _raise_offline(
        self, conn: AsyncConnection, device_id: str, rule: Rule | None, severity: str, *, message: str, now_ms: int
    ) -> dict[str, Any]:
        open_id = await self._open_offline(conn, device_id)
        if open_id is not None:
            return await self._refresh(conn, open_id, None, message=message, now_ms=now_ms)
        return await self._insert(
            conn,
            device_id=device_id,
            type=OFFLINE,
            severity=severity,
            message=message,
            value=None,
            payload={"rule": rule.name if rule else None},
            rule_id=rule.id if rule else None,
            now_ms=now_ms,
        )

    async def _raise(
        self, conn: AsyncConnection, rule: Rule, device_id: str, value: float | None, *, message: str, now_ms: int
    ) -> dict[str, Any]:
        """One open alert per rule and device: a repeat is counted on it."""
        open_id = (
            await conn.execute(
                select(AlertRow.id)
                .where(AlertRow.rule_id == rule.id, AlertRow.device_id == device_id, AlertRow.status.in_(OPEN))
                .limit(1)
            )
        ).scalar_one_or_none()
        if open_id is not None:
            return await self._refresh(conn, open_id, value, message=message, now_ms=now_ms)
        payload = {"rule": rule.name, "key": rule.key, "op": rule.op, "threshold": rule.value}
        return await self._insert(
            conn,
            device_id=device_id,
            type=rule.kind,
            severity=rule.severity,
            message=message,
            value=value,
            payload=payload,
            rule_id=rule.id,
            now_ms=now_ms,
        )

    async def _insert(self, conn: AsyncConnection, *, now_ms: int, **values: Any) -> dict[str, Any]:
        result = await conn.execute(
            AlertRow.__table__.insert().values(**values, status="active", count=1, created_at=now_ms, updated_at=now_ms)
        )
        assert result.inserted_primary_key is not None
        row = (
            await conn.execute(select(AlertRow.__table__).where(AlertRow.id == result.inserted_primary_key[0]))
        ).one()
        return _alert_dict(row)

    async def _refresh(
        self, conn: AsyncConnection, alert_id: int, value: float | None, *, message: str, now_ms: int
    ) -> dict[str, Any]:
        await conn.execute(
            update(AlertRow)
            .where(AlertRow.id == alert_id)
            .values(count=AlertRow.count + 1, value=value, message=message, updated_at=now_ms)
        )
        return _alert_dict((await conn.execute(select(AlertRow.__table__).where(AlertRow.id == alert_id))).one())

    async def _clear_alerts(self, conn: AsyncConnection, where: Any, *, now_ms: int) -> list[dict[str, Any]]:
        ids = [r[0] for r in (await conn.execute(select(AlertRow.id).where(where, AlertRow.status.in_(OPEN)))).all()]
        if not ids:
            return []
        await conn.execute(
            update(AlertRow)
            .where(AlertRow.id.in_(ids), AlertRow.status.in_(OPEN))
            .values(status="cleared", cleared_at=now_ms, updated_at=now_ms)
        )
        rows = (await conn.execute(select(AlertRow.__table__).where(AlertRow.id.in_(ids)))).all()
        return [_alert_dict(r) for r in rows]
