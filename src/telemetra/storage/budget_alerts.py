"""The one ``storage_budget`` alert: raised, refreshed and cleared as the retention pass finds the
database against its budget (``domain.budget``).

At most one is open, whatever the number of processes: each change is one transaction that first takes
a lock — an advisory lock on PostgreSQL; on SQLite a write statement, which takes the database's single
write lock before anything is read (pysqlite begins a transaction only at the first write) — then reads
the open alert and inserts, updates or clears it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.budget import NO_DEVICE, STORAGE_BUDGET, BudgetState
from telemetra.storage.rules import OPEN
from telemetra.storage.schema import AlertRow

_LOCK = 7355610  # beside storage.rules' and storage.database's advisory locks


class BudgetAlertRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    async def settle(
        self, state: BudgetState | None, *, value: float | None, payload: dict[str, Any], now_ms: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Make the open alert what ``state`` says: the alerts changed and how ("raised" — new, or at a
        new severity —, "cleared"), or ``([], None)`` when nothing worth announcing changed."""
        async with self._engine.begin() as conn:
            await self._lock(conn)
            row = (
                await conn.execute(
                    select(AlertRow.__table__)
                    .where(AlertRow.type == STORAGE_BUDGET, AlertRow.status.in_(OPEN))
                    .order_by(AlertRow.id)
                    .limit(1)
                )
            ).first()
            if state is None:
                if row is None:
                    return [], None
                await conn.execute(
                    update(AlertRow)
                    .where(AlertRow.id == row.id)
                    .values(status="cleared", cleared_at=now_ms, updated_at=now_ms)
                )
                return [await self._get(conn, row.id)], "cleared"
            values = {"message": state.message, "value": value, "payload": payload, "updated_at": now_ms}
            if row is None:
                result = await conn.execute(
                    AlertRow.__table__.insert().values(
                        **values,
                        device_id=NO_DEVICE,
                        type=STORAGE_BUDGET,
                        severity=state.severity,
                        status="active",
                        count=1,
                        created_at=now_ms,
                    )
                )
                assert result.inserted_primary_key is not None
                return [await self._get(conn, int(result.inserted_primary_key[0]))], "raised"
            if row.severity != state.severity:  # raised again, at its new severity
                values |= {"severity": state.severity, "count": AlertRow.count + 1}
            await conn.execute(update(AlertRow).where(AlertRow.id == row.id).values(**values))
            return ([await self._get(conn, row.id)], "raised") if "severity" in values else ([], None)

    async def _lock(self, conn: AsyncConnection) -> None:
        if self._pg:
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK})")
        else:
            await conn.execute(
                update(AlertRow)
                .where(AlertRow.type == STORAGE_BUDGET, AlertRow.status.in_(OPEN))
                .values(count=AlertRow.count)
            )

    async def _get(self, conn: AsyncConnection, alert_id: int) -> dict[str, Any]:
        row = (await conn.execute(select(AlertRow.__table__).where(AlertRow.id == alert_id))).one()
        return dict(row._mapping)
