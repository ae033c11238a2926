"""The write path's promise: one batch is one transaction, whatever the dialect."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from telemetra.config import Settings
from telemetra.domain.records import Batch, Point, Telemetry, ValueType
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.schema import LatestRow, TelemetryRow
from telemetra.storage.writes import write_batch


class Boom(Exception):
    pass


async def test_a_failed_batch_leaves_nothing_behind(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        batch = Batch(telemetry=[Telemetry("d1", (Point("t", 1_000, 1.0, None, ValueType.NUMBER),), True)])
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
