"""Reads in the seeds' terms: a *reading* is one message's values, all at one time (the narrow table keeps
one row per key; grouped by timestamp they are the message again). Every query is bounded by device (or a
list of them), keys and a time range, as in ``storage.queries``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.storage.queries import PointOut, stored_value
from telemetra.storage.schema import AlertRow, LatestRow, TelemetryRow

MAX_READINGS = 10_000
# Below this many points (or before the first ANALYZE) counting them is cheap enough to be exact.
EXACT_COUNT_BELOW = 1_000_000


@dataclass(slots=True)
class Reading:
    ts: int
    values: dict[str, float | bool | str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Span:
    readings: int
    first: int | None
    last: int | None


class ReadingQueries:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def readings(
        self,
        device_id: str,
        *,
        keys: Sequence[str] | None,
        start: int,
        end: int,
        limit: int,
        newest_first: bool,
    ) -> list[Reading]:
        """The newest ``limit`` readings in ``[start, end)`` (with values of ``keys``, or all), newest first
        or, with ``newest_first=False``, the same readings oldest first (what a chart plots)."""
        t = TelemetryRow
        where = [t.device_id == device_id, t.ts >= start, t.ts < end]
        if keys:
            where.append(t.key.in_(list(keys)))
        limit = max(1, min(limit, MAX_READINGS))
        stamps = select(t.ts).where(*where).group_by(t.ts).order_by(t.ts.desc()).limit(limit)
        async with self._engine.connect() as conn:
            times = [r[0] for r in (await conn.execute(stamps)).all()]
            if not times:
                return []
            rows = (
                await conn.execute(
                    select(t.key, t.ts, t.value_num, t.value_text, t.vtype)
                    .where(*where, t.ts >= min(times), t.ts <= max(times))
                    .order_by(t.ts, t.key)
                )
            ).all()
        grouped: dict[int, Reading] = {}
        for r in rows:
            reading = grouped.get(r.ts)
            if reading is None:
                reading = grouped[r.ts] = Reading(r.ts)
            reading.values[r.key] = stored_value(r.value_num, r.value_text, r.vtype)
        ordered = sorted(grouped.values(), key=lambda reading: reading.ts, reverse=newest_first)
        return ordered

    async def span(self, device_id: str, *, start: int, end: int) -> Span:
        """How many readings lie in ``[start, end)``, and the first and last one's time."""
        t = TelemetryRow
        stmt = select(func.count(func.distinct(t.ts)), func.min(t.ts), func.max(t.ts)).where(
            t.device_id == device_id, t.ts >= start, t.ts < end
        )
        async with self._engine.connect() as conn:
            count, first, last = (await conn.execute(stmt)).one()
        return Span(int(count or 0), first, last)

    async def reading_counts(self, device_ids: Sequence[str], *, since: int) -> dict[str, int]:
        """Readings per device since ``since``, for a list in one query."""
        if not device_ids:
            return {}
        t = TelemetryRow
        stmt = (
            select(t.device_id, func.count(func.distinct(t.ts)))
            .where(t.device_id.in_(list(device_ids)), t.ts >= since)
            .group_by(t.device_id)
        )
        async with self._engine.connect() as conn:
            return {r[0]: int(r[1]) for r in (await conn.execute(stmt)).all()}

    async def latest_many(
        self, device_ids: Sequence[str], keys: Sequence[str] | None = None
    ) -> dict[str, list[PointOut]]:
        """Latest value of every key (or of ``keys``) of each device, for a list in one query."""
        if not device_ids:
            return {}
        t = LatestRow
        stmt = select(t.device_id, t.key, t.ts, t.value_num, t.value_text, t.vtype).where(
            t.device_id.in_(list(device_ids))
        )
        if keys:
            stmt = stmt.where(t.key.in_(list(keys)))
        out: dict[str, list[PointOut]] = {}
        async with self._engine.connect() as conn:
            for r in (await conn.execute(stmt.order_by(t.device_id, t.key))).all():
                point = PointOut(r.key, r.ts, stored_value(r.value_num, r.value_text, r.vtype))
                out.setdefault(r.device_id, []).append(point)
        return out

    async def stored_points(self) -> int:
        """Points stored in all: counted, except on a large PostgreSQL table, where counting means reading
        it all and the planner's estimate (kept fresh by autovacuum's ANALYZE) is what is answered."""
        async with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                estimate = (
                    await conn.execute(text("SELECT reltuples::bigint FROM pg_class WHERE relname = 'telemetry'"))
                ).scalar_one_or_none()
                if estimate is not None and estimate >= EXACT_COUNT_BELOW:
                    return int(estimate)
            return int((await conn.execute(select(func.count()).select_from(TelemetryRow))).scalar_one())

    async def alert_count(self, *, since: int) -> int:
        stmt = select(func.count()).select_from(AlertRow).where(AlertRow.updated_at >= since)
        async with self._engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())


def number(value: Any) -> float | int | None:
    """A stored value for a client's number field: whole floats as ints (the seeds' integer fields), and
    None for anything that is not a number (text, or a boolean where a number was expected)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value
