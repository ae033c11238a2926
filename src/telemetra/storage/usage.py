"""What the data takes: bytes and rows per tier, the devices that take the most, growth per day, and the
days left until a disk budget is reached.

Rows on PostgreSQL are the planner's estimate (``reltuples``: exact after ANALYZE, and free), bytes its
relation sizes with indexes; on SQLite rows are counted and bytes read from ``dbstat`` where the library
has it, else shared out of the file's size by rows. Growth and the per-device figures come from the
1-hour rollup (one row per series and hour, so cheap to read): numeric points per day over the last
week, times the raw tier's bytes per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.budget import days_left
from telemetra.domain.rollups import HOUR, MINUTE, RAW, TIERS
from telemetra.storage.schema import Rollup1h

DAY_MS = 86_400_000
TABLE = {RAW: "telemetry", MINUTE: "rollup_1m", HOUR: "rollup_1h"}
GROWTH_DAYS = 7


@dataclass(frozen=True, slots=True)
class TierUsage:
    rows: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    tiers: dict[str, TierUsage]
    total_bytes: int
    database_bytes: int
    top_devices: list[dict[str, Any]]
    points_per_day: float
    growth_bytes_per_day: float
    budget_bytes: int | None
    days_left: float | None
    rows_estimated: bool


class UsageQueries:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    async def tiers(self) -> tuple[dict[str, TierUsage], int]:
        async with self._engine.connect() as conn:
            if self._pg:
                out = {}
                for tier, table in TABLE.items():
                    # The table itself or, partitioned, the sum of its partitions (a partitioned parent holds nothing).
                    row = (
                        await conn.exec_driver_sql(
                            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8, "
                            "coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c "
                            f"WHERE c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = '{table}'::regclass) "
                            f"OR (c.oid = '{table}'::regclass AND c.relkind <> 'p')"
                        )
                    ).one()
                    out[tier] = TierUsage(int(row[0]), int(row[1]))
                database = int((await conn.exec_driver_sql("SELECT pg_database_size(current_database())")).scalar_one())
                return out, database
            rows = {}
            for tier, table in TABLE.items():
                rows[tier] = int((await conn.exec_driver_sql(f"SELECT count(*) FROM {table}")).scalar_one())
            page_size = int((await conn.exec_driver_sql("PRAGMA page_size")).scalar_one())
            pages = int((await conn.exec_driver_sql("PRAGMA page_count")).scalar_one())
            database = page_size * pages
            try:
                sizes = dict((await conn.exec_driver_sql("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")).all())
                by_tier = {tier: int(sizes.get(table, 0)) for tier, table in TABLE.items()}
            except Exception:  # dbstat is a compile-time option of SQLite
                total_rows = sum(rows.values()) or 1
                by_tier = {tier: database * rows[tier] // total_rows for tier in TIERS}
            return {tier: TierUsage(rows[tier], by_tier[tier]) for tier in TIERS}, database

    async def usage(self, *, now_ms: int, top: int, budget_bytes: int | None) -> Usage:
        tiers, database = await self.tiers()
        raw = tiers[RAW]
        bytes_per_point = raw.bytes / raw.rows if raw.rows else 0.0
        since = now_ms - GROWTH_DAYS * DAY_MS
        r = Rollup1h
        async with self._engine.connect() as conn:
            recent = (await conn.execute(select(func.sum(r.count)).where(r.bucket >= since))).scalar_one_or_none()
            per_device = (
                await conn.execute(
                    select(r.device_id, func.sum(r.count).label("points"))
                    .group_by(r.device_id)
                    .order_by(func.sum(r.count).desc(), r.device_id)
                    .limit(top)
                )
            ).all()
        points_per_day = float(recent or 0) / GROWTH_DAYS
        growth = points_per_day * bytes_per_point
        total = sum(t.bytes for t in tiers.values())
        top_devices = [
            {"device_id": d, "points": int(p), "bytes": int(int(p) * bytes_per_point)} for d, p in per_device
        ]
        return Usage(
            tiers=tiers,
            total_bytes=total,
            database_bytes=database,
            top_devices=top_devices,
            points_per_day=points_per_day,
            growth_bytes_per_day=growth,
            budget_bytes=budget_bytes,
            days_left=days_left(budget_bytes, database, growth),
            rows_estimated=self._pg,
        )
