"""Webhooks and their delivery log.

A delivery is a row from the moment its event is enqueued until the log is pruned, so nothing waiting is
lost to a restart. Attempts are claimed, not locked for their duration: a claim pushes ``next_attempt_at``
a lease ahead and counts the attempt, in one statement (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two
processes never claim the same row); the outcome is written when the attempt ends. A process that dies
mid-attempt leaves the row to whoever runs when the lease ends — at least once, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.errors import NotFound
from telemetra.domain.webhooks import DELIVERED, FAILED, PENDING
from telemetra.storage.database import write_gate
from telemetra.storage.schema import WebhookDeliveryRow, WebhookRow

_WEBHOOKS = WebhookRow.__table__
_DELIVERIES = WebhookDeliveryRow.__table__
_INSERT_CHUNK = 500  # rows per INSERT: 13 parameters each, well under both databases' limits
_FIELDS = ("name", "url", "events", "secret", "enabled")


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    webhook_id: int
    event: str
    body: str
    attempts: int  # this one included


@dataclass(frozen=True, slots=True)
class Outcome:
    """An attempt's outcome: delivered; or failed and due again at ``retry_at``; or (``retry_at`` None)
    failed for good."""

    delivery_id: int
    finished_at: int  # when the attempt ended (``delivered_at`` when delivered)
    delivered: bool
    retry_at: int | None
    response_status: int | None
    error: str | None
    duration_ms: int


class WebhookRepository:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    # --- subscriptions --------------------------------------------------------------------------------

    async def list(self) -> list[WebhookRow]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(_WEBHOOKS).order_by(WebhookRow.id))).all()
        return [WebhookRow(**r._mapping) for r in rows]

    async def get(self, webhook_id: int) -> WebhookRow:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(_WEBHOOKS).where(WebhookRow.id == webhook_id))).first()
        if row is None:
            raise NotFound(f"webhook {webhook_id} not found", field="webhook_id")
        return WebhookRow(**row._mapping)

    async def create(self, values: dict[str, Any], *, now_ms: int) -> WebhookRow:
        row = {f: values[f] for f in _FIELDS} | {"created_at": now_ms, "updated_at": now_ms}
        async with self._engine.begin() as conn:
            result = await conn.execute(_WEBHOOKS.insert().values(**row))
            assert result.inserted_primary_key is not None
            webhook_id = int(result.inserted_primary_key[0])
        return await self.get(webhook_id)

    async def update(self, webhook_id: int, values: dict[str, Any], *, now_ms: int) -> WebhookRow:
        changed = {f: values[f] for f in _FIELDS if f in values} | {"updated_at": now_ms}
        async with self._engine.begin() as conn:
            result = await conn.execute(update(_WEBHOOKS).where(WebhookRow.id == webhook_id).values(**changed))
        if result.rowcount == 0:
            raise NotFound(f"webhook {webhook_id} not found", field="webhook_id")
        return await self.get(webhook_id)

    async def delete(self, webhook_id: int) -> None:
        """The webhook and its whole delivery log (what was still pending is not sent)."""
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(_WEBHOOKS).where(WebhookRow.id == webhook_id))
            if result.rowcount == 0:
                raise NotFound(f"webhook {webhook_id} not found", field="webhook_id")
            await conn.execute(delete(_DELIVERIES).where(WebhookDeliveryRow.webhook_id == webhook_id))

    # --- deliveries -----------------------------------------------------------------------------------

    async def enqueue(self, rows: Sequence[dict[str, Any]], *, now_ms: int) -> list[int]:
        """New deliveries (``webhook_id``, ``event_key``, ``event``, ``device_id``, ``body``), due now; an
        event a webhook already has (another process enqueued it) is skipped. Returns the new ids."""
        insert = postgresql.insert(_DELIVERIES) if self._pg else sqlite.insert(_DELIVERIES)
        fresh = {"status": PENDING, "attempts": 0, "next_attempt_at": now_ms, "created_at": now_ms}
        ids: list[int] = []
        async with write_gate(self._engine), self._engine.begin() as conn:
            for start in range(0, len(rows), _INSERT_CHUNK):
                chunk = [dict(r) | fresh for r in rows[start : start + _INSERT_CHUNK]]
                statement = insert.values(chunk).on_conflict_do_nothing(index_elements=["webhook_id", "event_key"])
                ids.extend((await conn.execute(statement.returning(WebhookDeliveryRow.id))).scalars())
        return ids

    async def claim(self, *, now_ms: int, limit: int, lease_ms: int, record: Sequence[Outcome] = ()) -> list[Claimed]:
        """Up to ``limit`` due deliveries of enabled webhooks, oldest due first, each claimed for ``lease_ms``;
        first, in the same transaction, the outcomes in ``record`` (the last round's, see ``record``)."""
        enabled = select(WebhookRow.id).where(WebhookRow.enabled.is_(True))
        due = (
            select(WebhookDeliveryRow.id)
            .where(
                WebhookDeliveryRow.status == PENDING,
                WebhookDeliveryRow.next_attempt_at <= now_ms,
                WebhookDeliveryRow.webhook_id.in_(enabled),
            )
            .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.id)
            .limit(limit)
        )
        if self._pg:
            due = due.with_for_update(skip_locked=True, of=_DELIVERIES)
        statement = (
            update(_DELIVERIES)
            .where(WebhookDeliveryRow.id.in_(due.scalar_subquery()))
            .values(
                next_attempt_at=now_ms + lease_ms,
                attempts=WebhookDeliveryRow.attempts + 1,
                last_attempt_at=now_ms,
            )
            .returning(
                WebhookDeliveryRow.id,
                WebhookDeliveryRow.webhook_id,
                WebhookDeliveryRow.event,
                WebhookDeliveryRow.body,
                WebhookDeliveryRow.attempts,
            )
        )
        async with write_gate(self._engine), self._engine.begin() as conn:
            await _record(conn, record)
            rows = (await conn.execute(statement)).all()
        return sorted((Claimed(*row) for row in rows), key=lambda c: c.id)

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Attempts' outcomes, all in one transaction: on SQLite, where every write transaction waits its
        turn for the single write lock, a round of attempts is one turn, not one per delivery."""
        if not outcomes:
            return
        async with write_gate(self._engine), self._engine.begin() as conn:
            await _record(conn, outcomes)

    async def release(self, delivery_ids: Sequence[int], *, now_ms: int) -> None:
        """Claims given back unattempted (a stop mid-way): due now, the attempt not counted."""
        if not delivery_ids:
            return
        async with write_gate(self._engine), self._engine.begin() as conn:
            await conn.execute(
                update(_DELIVERIES)
                .where(WebhookDeliveryRow.id.in_(list(delivery_ids)), WebhookDeliveryRow.status == PENDING)
                .values(next_attempt_at=now_ms, attempts=WebhookDeliveryRow.attempts - 1)
            )

    async def next_due(self) -> int | None:
        async with self._engine.connect() as conn:
            return await conn.scalar(
                select(func.min(WebhookDeliveryRow.next_attempt_at)).where(WebhookDeliveryRow.status == PENDING)
            )

    async def deliveries(
        self, webhook_id: int, *, status: str | None, limit: int, before_id: int | None
    ) -> list[WebhookDeliveryRow]:
        """The delivery log of one webhook, newest first."""
        where = [WebhookDeliveryRow.webhook_id == webhook_id]
        if status is not None:
            where.append(WebhookDeliveryRow.status == status)
        if before_id is not None:
            where.append(WebhookDeliveryRow.id < before_id)
        query = select(_DELIVERIES).where(and_(*where)).order_by(WebhookDeliveryRow.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [WebhookDeliveryRow(**r._mapping) for r in rows]

    async def delivery(self, webhook_id: int, delivery_id: int) -> WebhookDeliveryRow:
        query = select(_DELIVERIES).where(
            WebhookDeliveryRow.id == delivery_id, WebhookDeliveryRow.webhook_id == webhook_id
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"delivery {delivery_id} of webhook {webhook_id} not found", field="delivery_id")
        return WebhookDeliveryRow(**row._mapping)

    async def redeliver(self, webhook_id: int, delivery_id: int, *, now_ms: int) -> WebhookDeliveryRow:
        """A delivered or failed delivery, due again now with a fresh count of attempts."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(_DELIVERIES)
                .where(WebhookDeliveryRow.id == delivery_id, WebhookDeliveryRow.webhook_id == webhook_id)
                .values(status=PENDING, attempts=0, next_attempt_at=now_ms, delivered_at=None)
            )
        if result.rowcount == 0:
            raise NotFound(f"delivery {delivery_id} of webhook {webhook_id} not found", field="delivery_id")
        return await self.delivery(webhook_id, delivery_id)

    async def counts(self) -> dict[int, dict[str, int]]:
        """Per webhook, how many deliveries the log holds in each state."""
        query = select(WebhookDeliveryRow.webhook_id, WebhookDeliveryRow.status, func.count()).group_by(
            WebhookDeliveryRow.webhook_id, WebhookDeliveryRow.status
        )
        found: dict[int, dict[str, int]] = {}
        async with self._engine.connect() as conn:
            for webhook_id, status, n in (await conn.execute(query)).all():
                found.setdefault(webhook_id, {})[status] = n
        return found

    async def pending(self) -> int:
        async with self._engine.connect() as conn:
            n = await conn.scalar(
                select(func.count()).select_from(_DELIVERIES).where(WebhookDeliveryRow.status == PENDING)
            )
        return int(n or 0)

    async def prune(self, *, before_ms: int) -> int:
        """Delivered and failed deliveries created before ``before_ms`` leave the log."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(_DELIVERIES).where(
                    WebhookDeliveryRow.status.in_((DELIVERED, FAILED)), WebhookDeliveryRow.created_at < before_ms
                )
            )
        return int(result.rowcount or 0)


async def _record(conn: AsyncConnection, outcomes: Sequence[Outcome]) -> None:
    for o in outcomes:
        values: dict[str, Any] = {
            "response_status": o.response_status,
            "last_error": o.error,
            "duration_ms": o.duration_ms,
        }
        if o.delivered:
            values |= {"status": DELIVERED, "delivered_at": o.finished_at}
        elif o.retry_at is not None:
            values |= {"next_attempt_at": o.retry_at}
        else:
            values |= {"status": FAILED}
        await conn.execute(
            update(_DELIVERIES)
            .where(WebhookDeliveryRow.id == o.delivery_id, WebhookDeliveryRow.status == PENDING)
            .values(**values)
        )
