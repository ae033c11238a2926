"""The write path's promise: one batch is one transaction, whatever the dialect."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from telemetra.config import Settings
from telemetra.domain.records import Batch, Telemetry, Value, ValueType
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.schema import LatestRow, TelemetryRow
from telemetra.storage.writes import write_batch


class Boom(Exception):
    pass


async def test_a_failed_batch_leaves_nothing_behind(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        batch = Batch(telemetry=[Telemetry("d1", 1_000, (Value("t", 1.0, None, int(ValueType.NUMBER)),), True)])
        with pytest.raises(Boom):
            async with engine.begin() as conn:
                await write_batch(conn, batch, now_ms=2_000)
                raise Boom  # the commit never happens
        async with engine.connect() as conn:
            points = (await conn.execute(select(func.count()).select_from(TelemetryRow))).scalar_one()
            latest = (await conn.execute(select(func.count()).select_from(LatestRow))).scalar_one()
        assert (points, latest) == (0, 0)
        async with engine.begin() as conn:
            await write_batch(conn, batch, now_ms=2_000)
        async with engine.connect() as conn:
            points = (await conn.execute(select(func.count()).select_from(TelemetryRow))).scalar_one()
        assert points == 1
    finally:
        await engine.dispose()


def _reading(device_id: str, ts: int, key: str, num: float) -> Telemetry:
    return Telemetry(device_id, ts, (Value(key, num, None, int(ValueType.NUMBER)),), True)


async def test_redelivered_readings_mixed_with_new_ones_are_stored_once(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL COPYs a batch straight in and falls back to INSERT … ON CONFLICT when a reading is
    already there; either way every (device, key, ts) is stored once and nothing new is dropped."""
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        first = Batch(telemetry=[_reading("d1", 1_000 + i, "t", float(i)) for i in range(5)])
        async with engine.begin() as conn:
            await write_batch(conn, first, now_ms=2_000)
        # Two already stored, three new, and one new reading twice in the same batch.
        second = Batch(
            telemetry=[_reading("d1", 1_003 + i, "t", 100.0 + i) for i in range(5)] + [_reading("d1", 1_007, "t", 9.0)]
        )
        async with engine.begin() as conn:
            await write_batch(conn, second, now_ms=3_000)
        async with engine.connect() as conn:
            query = select(TelemetryRow.ts, TelemetryRow.value_num).order_by(TelemetryRow.ts)
            stored = (await conn.execute(query)).all()
            newest = (await conn.execute(select(LatestRow.ts))).scalar_one()
        assert [ts for ts, _ in stored] == list(range(1_000, 1_008))
        assert dict(stored)[1_003] == 3.0  # the first copy stays: a redelivery does not overwrite
        assert dict(stored)[1_005] == 102.0
        assert newest == 1_007
    finally:
        await engine.dispose()
