"""Read queries over telemetry, latest values, state and events. Every query is bounded by device, keys
and a time range, and served by a primary key or index (``telemetry`` is keyed (device, key, ts))."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, and_, bindparam, func, literal_column, null, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.records import ValueType
from telemetra.domain.rollups import HOUR, MINUTE, RAW, WIDTHS, choose_resolution
from telemetra.storage.schema import (
    DeviceState,
    EventRow,
    LatestRow,
    RejectedMessage,
    Rollup1h,
    Rollup1m,
    StateHistory,
    TelemetryRow,
)

AGGREGATES = ("min", "max", "avg", "sum", "count", "last")
ROLLUP_TABLES: dict[str, type[Rollup1m] | type[Rollup1h]] = {MINUTE: Rollup1m, HOUR: Rollup1h}


@dataclass(frozen=True, slots=True)
class PointOut:
    key: str
    ts: int
    value: float | bool | str | None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    points: list[PointOut]
    next_after: tuple[int, str] | None


@dataclass(frozen=True, slots=True)
class Bucket:
    key: str
    start: int
    values: dict[str, float | int | bool | str | None]


def stored_value(num: float | None, text: str | None, vtype: int) -> float | bool | str | None:
    """A row's value as the client sent it: number, boolean or text."""
    if vtype == ValueType.TEXT:
        return text
    if vtype == ValueType.BOOL:
        return bool(num)
    return num


_value = stored_value

BucketValues = Callable[[Any, Any, Any, Any, int, Any], dict[str, Any]]


def bucket_values(functions: Sequence[str]) -> BucketValues:
    """``(min, max, avg, sum, count, last) -> {function: value}`` for the functions asked, in their order.

    An answer has thousands of buckets: building all six and deleting the unwanted ones is ~4x faster
    than a comprehension over the names, so that is the path when the names come in ``AGGREGATES``
    order (as every client asks); any other order keeps the order asked."""
    wanted = list(dict.fromkeys(functions))
    unwanted = tuple(f for f in AGGREGATES if f not in wanted)
    in_order = wanted == [f for f in AGGREGATES if f in wanted]

    def values(lo: Any, hi: Any, avg: Any, total: Any, count: int, last: Any) -> dict[str, Any]:
        out = {"min": lo, "max": hi, "avg": avg, "sum": total, "count": count, "last": last}
        if not in_order:
            return {f: out[f] for f in wanted}
        for f in unwanted:
            del out[f]
        return out

    return values


@dataclass(frozen=True, slots=True)
class Aggregate:
    resolution: str  # which tier answered: "raw", "1m" or "1h" (domain.rollups)
    buckets: list[Bucket]
    # Set when no tier still holds the whole range: the answering tier holds data from then on only.
    data_since: int | None = None


# Per tier, the oldest time retention still keeps for a device (None: everything); see storage.retention.
KeptSince = Callable[[str], Awaitable[dict[str, int]]]


class TelemetryQueries:
    def __init__(self, engine: AsyncEngine, *, rollups: bool = True, kept_since: KeptSince | None = None) -> None:
        self._engine = engine
        self._rollups = rollups
        self.kept_since = kept_since

    async def keys(self, device_id: str) -> list[str]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(LatestRow.key).where(LatestRow.device_id == device_id).order_by(LatestRow.key)
            )
        return [r[0] for r in rows]

    async def history(
        self,
        device_id: str,
        *,
        keys: Sequence[str] | None,
        start: int,
        end: int,
        limit: int,
        after: tuple[int, str] | None = None,
        descending: bool = False,
    ) -> HistoryPage:
        t = TelemetryRow
        conditions = [t.device_id == device_id, t.ts >= start, t.ts < end]
        if keys:
            conditions.append(t.key.in_(list(keys)))
        if after is not None:
            cursor = tuple_(t.ts, t.key)
            conditions.append(cursor < tuple_(*after) if descending else cursor > tuple_(*after))
        order = (t.ts.desc(), t.key.desc()) if descending else (t.ts, t.key)
        stmt = (
            select(t.key, t.ts, t.value_num, t.value_text, t.vtype)
            .where(and_(*conditions))
            .order_by(*order)
            .limit(limit + 1)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        points = [PointOut(r.key, r.ts, _value(r.value_num, r.value_text, r.vtype)) for r in rows]
        next_after = (points[-1].ts, points[-1].key) if more and points else None
        return HistoryPage(points, next_after)

    async def stream(
        self, device_id: str, *, keys: Sequence[str] | None, start: int, end: int, chunk: int = 5000
    ) -> AsyncIterator[PointOut]:
        """Every point in the range, read in chunks (CSV export of any size in bounded memory)."""
        after: tuple[int, str] | None = None
        while True:
            page = await self.history(device_id, keys=keys, start=start, end=end, limit=chunk, after=after)
            for point in page.points:
                yield point
            if page.next_after is None:
                return
            after = page.next_after

    async def latest(self, device_id: str, keys: Sequence[str] | None = None) -> list[PointOut]:
        t = LatestRow
        stmt = select(t.key, t.ts, t.value_num, t.value_text, t.vtype).where(t.device_id == device_id)
        if keys:
            stmt = stmt.where(t.key.in_(list(keys)))
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(t.key))).all()
        return [PointOut(r.key, r.ts, _value(r.value_num, r.value_text, r.vtype)) for r in rows]

    async def aggregate(
        self,
        device_id: str,
        *,
        keys: Sequence[str],
        start: int,
        end: int,
        interval_ms: int | None,
        functions: Sequence[str],
    ) -> list[Bucket]:
        result = await self.aggregate_at(
            device_id, keys=keys, start=start, end=end, interval_ms=interval_ms, functions=functions
        )
        return result.buckets

    async def aggregate_at(
        self,
        device_id: str,
        *,
        keys: Sequence[str],
        start: int,
        end: int,
        interval_ms: int | None,
        functions: Sequence[str],
    ) -> Aggregate:
        """Buckets aligned to multiples of ``interval_ms`` since the epoch; one bucket from ``start`` when
        there is no interval. Text series are left out (no arithmetic on text). Served by the coarsest
        rollup tier that answers exactly (``domain.rollups.choose_resolution``), else by the raw points."""
        kept = await self.kept_since(device_id) if self.kept_since is not None else None
        resolution = choose_resolution(
            start=start, end=end, interval_ms=interval_ms, enabled=self._rollups, kept_since=kept
        )
        if not keys:
            buckets: list[Bucket] = []
        elif resolution == RAW:
            buckets = await self._aggregate_raw(device_id, keys, start, end, interval_ms, functions)
        else:
            buckets = await self._aggregate_rollup(resolution, device_id, keys, start, end, interval_ms, functions)
        since = kept.get(resolution) if kept else None
        return Aggregate(resolution, buckets, since if since is not None and since > start else None)

    async def _aggregate_rollup(
        self,
        tier: str,
        device_id: str,
        keys: Sequence[str],
        start: int,
        end: int,
        interval_ms: int | None,
        functions: Sequence[str],
    ) -> list[Bucket]:
        r = ROLLUP_TABLES[tier].__table__.c
        if interval_ms == WIDTHS[tier]:
            return await self._read_rollup(r, device_id, keys, start, end, functions)
        if interval_ms:
            iv = literal_column(str(int(interval_ms)), BigInteger)
            bucket: Any = r.bucket - r.bucket % iv
        else:
            bucket = literal_column(str(int(start)), BigInteger)
        # The range rendered into the SQL at execution (the compiled form stays cached): asyncpg's prepared
        # statements go to PostgreSQL's generic plan after five runs, which guesses a bound range holds 0.5 %
        # of the rows and so sorts a year's 26,280 hour rows for a GroupAggregate; knowing the range it
        # hashes them (~30 % less time).
        lo, hi = (bindparam(None, int(v), BigInteger, literal_execute=True) for v in (start, end))
        where = and_(r.device_id == device_id, r.key.in_(list(keys)), r.bucket >= lo, r.bucket < hi)
        group = [r.key, bucket] if interval_ms else [r.key]
        grouped = (
            select(
                r.key,
                bucket.label("bucket"),
                func.min(r.min).label("min"),
                func.max(r.max).label("max"),
                func.sum(r.sum).label("sum"),
                func.sum(r.count).label("count"),
                # A tier bucket's points are all newer than an earlier bucket's, so the answer bucket's
                # newest point is the newest tier bucket's ``last``: one primary-key lookup per answer bucket.
                func.max(r.bucket).label("newest"),
            )
            .where(where)
            .group_by(*group)
            .subquery()
        )
        newest = ROLLUP_TABLES[tier].__table__.alias("newest_bucket")
        # A correlated primary-key lookup per answer bucket, not a join: PostgreSQL planned the join as a
        # hash over every row of the device (a sequential scan, 80 ms of a year's 1-day answer at 3
        # devices and growing with the fleet); the lookups are 1,095 index probes (~2 ms).
        last_value = (
            select(newest.c.last_value)
            .where(
                newest.c.device_id == device_id,
                newest.c.key == grouped.c.key,
                newest.c.bucket == grouped.c.newest,
            )
            .scalar_subquery()
        )
        last_column = last_value if "last" in functions else null()  # no lookups when ``last`` is not asked
        stmt = select(
            *(grouped.c[c] for c in ("key", "bucket", "min", "max", "sum", "count")), last_column.label("last_value")
        ).order_by(grouped.c.key, grouped.c.bucket)
        async with self._engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # PostgreSQL guesses ~17 times too many answer buckets, so from about ten devices a year's
                # answer costs past jit_above_cost and spends 70 ms compiling a query that runs in 20 ms.
                # SET LOCAL: for this read's transaction only.
                await conn.exec_driver_sql("SET LOCAL jit = off")
            rows = (await conn.execute(stmt)).all()
        shape = bucket_values(functions)
        buckets = []
        for key, bucket, lo, hi, total, count, last in rows:
            count = int(count)
            avg = total / count if count and total is not None else None
            buckets.append(Bucket(key, int(bucket), shape(lo, hi, avg, total, count, last)))
        return buckets

    async def _read_rollup(
        self, r: Any, device_id: str, keys: Sequence[str], start: int, end: int, functions: Sequence[str]
    ) -> list[Bucket]:
        """Answer buckets that are the tier's own: its rows as they are."""
        stmt = (
            select(r.key, r.bucket, r.min, r.max, r.sum, r.count, r.last_value)
            .where(r.device_id == device_id, r.key.in_(list(keys)), r.bucket >= start, r.bucket < end)
            .order_by(r.key, r.bucket)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        shape = bucket_values(functions)
        buckets = []
        for key, bucket, lo, hi, total, count, last in rows:
            count = int(count)
            avg = total / count if count and total is not None else None
            buckets.append(Bucket(key, int(bucket), shape(lo, hi, avg, total, count, last)))
        return buckets

    async def _aggregate_raw(
        self,
        device_id: str,
        keys: Sequence[str],
        start: int,
        end: int,
        interval_ms: int | None,
        functions: Sequence[str],
    ) -> list[Bucket]:
        t = TelemetryRow
        if interval_ms:
            # Inlined (a validated int), so PostgreSQL sees the same expression in SELECT and GROUP BY.
            iv = literal_column(str(int(interval_ms)), BigInteger)
            bucket = (t.ts - t.ts % iv).label("bucket")
            group: list[Any] = [t.key, bucket]
        else:
            bucket = literal_column(str(int(start)), BigInteger).label("bucket")
            group = [t.key]
        where = and_(
            t.device_id == device_id, t.key.in_(list(keys)), t.ts >= start, t.ts < end, t.vtype != int(ValueType.TEXT)
        )
        cols = [
            t.key,
            bucket,
            func.min(t.value_num).label("min"),
            func.max(t.value_num).label("max"),
            func.avg(t.value_num).label("avg"),
            func.sum(t.value_num).label("sum"),
            func.count().label("count"),
            func.max(t.ts).label("last_ts"),
        ]
        stmt = select(*cols).where(where).group_by(*group).order_by(t.key, "bucket")
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
            last_values: dict[tuple[str, int], float | None] = {}
            if "last" in functions and rows:
                pairs = [(r.key, r.last_ts) for r in rows]
                for i in range(0, len(pairs), 500):
                    chunk = pairs[i : i + 500]
                    found = await conn.execute(
                        select(t.key, t.ts, t.value_num).where(t.device_id == device_id, tuple_(t.key, t.ts).in_(chunk))
                    )
                    last_values.update({(f.key, f.ts): f.value_num for f in found})
        shape = bucket_values(functions)
        buckets = []
        for r in rows:
            avg = float(r.avg) if r.avg is not None else None
            last = last_values.get((r.key, r.last_ts))
            buckets.append(Bucket(r.key, int(r.bucket), shape(r.min, r.max, avg, r.sum, int(r.count), last)))
        return buckets

    async def state(self, device_id: str | None = None) -> list[DeviceState]:
        stmt = select(DeviceState.__table__)
        if device_id is not None:
            stmt = stmt.where(DeviceState.device_id == device_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(DeviceState.device_id, DeviceState.key))).all()
        return [DeviceState(**r._mapping) for r in rows]

    async def state_history(self, device_id: str, *, start: int, end: int, limit: int) -> list[StateHistory]:
        t = StateHistory
        stmt = (
            select(t.__table__)
            .where(t.device_id == device_id, t.ts >= start, t.ts < end)
            .order_by(t.ts.desc(), t.id.desc())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [StateHistory(**r._mapping) for r in rows]

    async def events(
        self, device_id: str, *, start: int, end: int, limit: int, name: str | None = None
    ) -> list[EventRow]:
        t = EventRow
        stmt = select(t.__table__).where(t.device_id == device_id, t.ts >= start, t.ts < end)
        if name:
            stmt = stmt.where(t.name == name)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(t.ts.desc(), t.id.desc()).limit(limit))).all()
        return [EventRow(**r._mapping) for r in rows]

    async def rejected(self, *, limit: int, device_id: str | None = None) -> list[RejectedMessage]:
        t = RejectedMessage
        stmt = select(t.__table__)
        if device_id:
            stmt = stmt.where(t.device_id == device_id)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt.order_by(t.id.desc()).limit(limit))).all()
        return [RejectedMessage(**r._mapping) for r in rows]

    async def count_points(self, device_id: str | None = None, *, since: int | None = None) -> int:
        stmt = select(func.count()).select_from(TelemetryRow)
        if device_id:
            stmt = stmt.where(TelemetryRow.device_id == device_id)
        if since is not None:
            stmt = stmt.where(TelemetryRow.ts >= since)
        async with self._engine.connect() as conn:
            return int((await conn.execute(stmt)).scalar_one())
