"""The one ``storage_budget`` alert: raised, refreshed and cleared as the retention pass finds the
database against its budget (``domain.budget``).

At most one is open, whatever the number of processes: each change is one transaction that first takes
a lock — an advisory lock on PostgreSQL; on SQLite a write statement, which takes the database's single
write lock before anything is read (pysqlite begins a transaction only at the first write) — then reads
the open alert and inserts, updates or clears it. What it should be is decided under that lock from
the open alert's severity (``domain.budget.settled_budget_state``: the hysteresis), so two processes
settling at once never disagree about what was open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.budget import NO_DEVICE, STORAGE_BUDGET, BudgetState
from telemetra.storage.rules import OPEN
from telemetra.storage.schema import AlertRow

_LOCK = 7355610  # beside storage.rules' and storage.database's advisory locks

# The severity of the open alert (None: none open) → what the alert should be (None: none).
Decide = Callable[[str | None], BudgetState | None]


class BudgetAlertRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    async def settle(
        self, decide: Decide, *, value: float | None, payload: dict[str, Any], now_ms: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Make the open alert what ``decide`` says, given its severity: the alerts changed and how
        ("raised" — new, or at a new severity —, "cleared"), or ``([], None)`` when nothing worth
        announcing changed. ``payload`` gets the state's ``reason``."""
        async with self._engine.begin() as conn:
            await self._lock(conn)
            row = await self._open(conn)
            state = decide(row.severity if row is not None else None)
            if state is None:
                if row is None:
                    return [], None
                await conn.execute(
                    update(AlertRow)
                    .where(AlertRow.id == row.id)
                    .values(status="cleared", cleared_at=now_ms, updated_at=now_ms)
                )
                return [await self._get(conn, row.id)], "cleared"
            payload = {"reason": state.reason} | payload
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

    async def open_severity(self) -> str | None:
        """The open alert's severity (None: none open), for answers that show the alert's verdict."""
        async with self._engine.connect() as conn:
            row = await self._open(conn)
        return row.severity if row is not None else None

    async def _open(self, conn: AsyncConnection) -> Any:
        return (
            await conn.execute(
                select(AlertRow.__table__)
                .where(AlertRow.type == STORAGE_BUDGET, AlertRow.status.in_(OPEN))
                .order_by(AlertRow.id)
                .limit(1)
            )
        ).first()

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
