"""Retention per tier (raw points, 1-minute and 1-hour rollups), by setting and per device model.

A pass deletes, per series (device, key) — a primary-key range, never a scan of the table — the rows
older than the series' cutoff, in chunks of ``chunk`` rows, each its own short transaction: on SQLite
the single writer waits for one chunk at most (milliseconds), then the ingest writer goes on. After a
pass on SQLite, ``PRAGMA incremental_vacuum`` gives the freed pages back to the file system (databases
made since this version use ``auto_vacuum = INCREMENTAL``; an older one reuses its free pages for new
rows instead). On PostgreSQL ``telemetry`` is partitioned by month (``storage.partitions``): a pass first
makes the coming months and drops whole the months past every device's cutoff, then deletes the rest the
same way as on SQLite (autovacuum reuses that space).

Cutoffs (``domain``-like rules, kept here beside the SQL): a tier keeps ``days`` days back from now; 0
or None keeps everything. A model's override replaces the default for the tiers it names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.errors import NotFound
from telemetra.domain.rollups import HOUR, MINUTE, RAW, TIERS
from telemetra.storage import partitions
from telemetra.storage.schema import Device, LatestRow, RetentionPolicyRow, Rollup1h, Rollup1m, TelemetryRow

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
VACUUM_PAGES = 2048  # per statement: 8 MiB of 4 KiB pages
TABLES: dict[str, Any] = {RAW: TelemetryRow, MINUTE: Rollup1m, HOUR: Rollup1h}
TIME_COLUMN = {RAW: "ts", MINUTE: "bucket", HOUR: "bucket"}
POLICY_COLUMNS = {RAW: "raw_days", MINUTE: "rollup_1m_days", HOUR: "rollup_1h_days"}


@dataclass(frozen=True, slots=True)
class Days:
    raw: int | None = None
    rollup_1m: int | None = None
    rollup_1h: int | None = None

    def of(self, tier: str) -> int | None:
        return {RAW: self.raw, MINUTE: self.rollup_1m, HOUR: self.rollup_1h}[tier]


@dataclass
class Policies:
    defaults: Days
    models: dict[str, Days] = field(default_factory=dict)

    def days(self, model: str | None, tier: str) -> int | None:
        override = self.models.get(model) if model is not None else None
        if override is not None and override.of(tier) is not None:
            return override.of(tier)
        return self.defaults.of(tier)

    def longest(self, tier: str) -> int | None:
        """The most days any device keeps of ``tier`` (None: some device keeps everything)."""
        kept = [self.defaults.of(tier), *(self.days(m, tier) for m in self.models)]
        return None if any(not d for d in kept) else max(d for d in kept if d)

    def kept_since(self, model: str | None, now: int) -> dict[str, int]:
        """Per tier with a limit, the oldest time it still holds (absent: everything)."""
        out = {}
        for tier in TIERS:
            days = self.days(model, tier)
            if days:
                out[tier] = now - days * DAY_MS
        return out


@dataclass
class PassResult:
    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    seconds: float = 0.0
    vacuumed_pages: int = 0
    dropped_partitions: list[str] = field(default_factory=list)


class RetentionRepository:
    def __init__(self, engine: AsyncEngine, defaults: Days) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self.defaults = defaults

    async def policies(self) -> Policies:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(RetentionPolicyRow.__table__))).all()
        return Policies(
            self.defaults,
            {r.model: Days(r.raw_days, r.rollup_1m_days, r.rollup_1h_days) for r in rows},
        )

    async def set_model(self, model: str, days: Days, *, now_ms: int) -> None:
        insert = postgresql.insert(RetentionPolicyRow) if self._pg else sqlite.insert(RetentionPolicyRow)
        values = {"raw_days": days.raw, "rollup_1m_days": days.rollup_1m, "rollup_1h_days": days.rollup_1h}
        stmt = insert.values(model=model, updated_at=now_ms, **values).on_conflict_do_update(
            index_elements=["model"], set_={**values, "updated_at": now_ms}
        )
        async with self._engine.begin() as conn:
            await conn.execute(stmt)

    async def delete_model(self, model: str) -> None:
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(RetentionPolicyRow).where(RetentionPolicyRow.model == model))
        if not result.rowcount:
            raise NotFound(f"no retention override for model {model!r}", field="model")

    async def device_model(self, device_id: str) -> str | None:
        async with self._engine.connect() as conn:
            found = await conn.execute(select(Device.model).where(Device.id == device_id))
            return found.scalar_one_or_none()

    async def run_pass(
        self, policies: Policies, *, now_ms: int, chunk: int, on_chunk: Callable[[str, int], None] | None = None
    ) -> PassResult:
        """Delete what every tier keeps no longer, in chunks; returns how many rows per tier."""
        started = time.perf_counter()
        result = PassResult()
        if self._pg:
            await self._partitions(policies, now_ms=now_ms, result=result)
        async with self._engine.connect() as conn:
            series = (await conn.execute(select(LatestRow.device_id, LatestRow.key))).all()
            models = dict((await conn.execute(select(Device.id, Device.model))).all())
        for device_id, key in series:
            model = models.get(device_id)
            for tier in TIERS:
                days = policies.days(model, tier)
                if not days:
                    continue
                cutoff = now_ms - days * DAY_MS
                while True:
                    n = await self._delete_chunk(tier, device_id, key, cutoff, chunk)
                    if n:
                        result.deleted[tier] += n
                        if on_chunk is not None:
                            on_chunk(tier, n)
                    if n < chunk:
                        break
        if not self._pg and sum(result.deleted.values()):
            result.vacuumed_pages = await self._incremental_vacuum()
        result.seconds = time.perf_counter() - started
        return result

    async def _partitions(self, policies: Policies, *, now_ms: int, result: PassResult) -> None:
        """PostgreSQL: the coming months made, the months past every device's raw cutoff dropped whole."""
        async with self._engine.begin() as conn:
            if not await partitions.is_partitioned(conn):
                return
            made = await partitions.ensure_ahead(conn, now_ms)
            if made:
                log.info("made partitions %s", ", ".join(made))
            longest = policies.longest(RAW)
            if longest is None:
                return  # some device keeps its raw points for ever
            for name, rows in await partitions.drop_before(conn, now_ms - longest * DAY_MS):
                log.info("retention dropped partition %s (%d rows)", name, rows)
                result.deleted[RAW] += rows
                result.dropped_partitions.append(name)

    async def _delete_chunk(self, tier: str, device_id: str, key: str, cutoff: int, chunk: int) -> int:
        table = TABLES[tier].__tablename__
        column = TIME_COLUMN[tier]
        # The oldest ``chunk`` rows of one series below the cutoff: a primary-key range on both databases.
        sql = text(
            f"DELETE FROM {table} WHERE device_id = :d AND key = :k AND {column} < :c AND {column} <= ("
            f"SELECT max({column}) FROM (SELECT {column} FROM {table} WHERE device_id = :d AND key = :k "
            f"AND {column} < :c ORDER BY {column} LIMIT :n) AS oldest)"
        )
        async with self._engine.begin() as conn:
            deleted = await conn.execute(sql, {"d": device_id, "k": key, "c": cutoff, "n": chunk})
        return int(deleted.rowcount or 0)

    async def _incremental_vacuum(self) -> int:
        async with self._engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA auto_vacuum")).scalar_one()
            if int(mode) != 2:  # not INCREMENTAL: free pages stay in the file for new rows
                return 0
            free = int((await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one())
            # SQLite frees one page per step of this statement and Python's driver steps a statement without
            # columns once; ``executescript`` steps it to the end. A bounded number of pages per statement
            # keeps each hold on the write lock short (the ingest writer waits for one at most).
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            left = free
            while left > 0:
                await driver.executescript(f"PRAGMA incremental_vacuum({VACUUM_PAGES});")
                now_free = int((await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one())
                if now_free >= left:
                    break
                left = now_free
            return free - left

    async def oldest(self, tier: str) -> int | None:
        model = TABLES[tier]
        column = getattr(model, TIME_COLUMN[tier])
        async with self._engine.connect() as conn:
            return (await conn.execute(select(func.min(column)))).scalar_one_or_none()
