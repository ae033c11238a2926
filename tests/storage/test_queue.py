"""The group-commit queue against a real database: several commits in flight on PostgreSQL, one on SQLite."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from telemetra.config import Settings
from telemetra.domain.records import Batch, Telemetry, Value, ValueType
from telemetra.ingest.queue import IngestQueue
from telemetra.metrics import Metrics
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.faults import DatabaseLocation, DatabaseState
from telemetra.storage.schema import LatestRow, TelemetryRow


def _message(device_id: str, ts: int) -> Batch:
    values = tuple(Value(k, float(ts), None, int(ValueType.NUMBER)) for k in ("a", "b", "c"))
    return Batch(telemetry=[Telemetry(device_id, ts, values, True)])


async def test_overlapping_commits_store_every_point_once_and_free_the_queue(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    in_flight = 1 if engine.dialect.name == "sqlite" else 3
    queue = IngestQueue(
        engine,
        metrics=Metrics(),
        state=DatabaseState(DatabaseLocation("test", "test")),
        max_points=100_000,
        batch_max_points=30,
        commits_in_flight=in_flight,
    )
    committed: list[int] = []
    queue.add_listener(lambda batch: committed.append(batch.point_count))
    await migrate(engine)
    writer = asyncio.create_task(queue.run())
    try:
        # 400 messages from 8 devices, every fourth one (after the first 40) a redelivery of the message 41
        # before it: small batches (10 messages) so several commits overlap, with duplicates across them.
        origin = [i - 41 if i % 4 == 0 and i >= 44 else i for i in range(400)]
        batches = [_message(f"d{n % 8}", 1_000_000 + n) for n in origin]
        results = await asyncio.wait_for(
            asyncio.gather(*(queue.submit(b, transport="test") for b in batches)), timeout=60
        )
        assert all(r.points == 3 for r in results)
        assert queue.depth == 0
        async with engine.connect() as conn:
            stored = (await conn.execute(select(func.count()).select_from(TelemetryRow))).scalar_one()
            latest = select(LatestRow.device_id, LatestRow.ts).where(LatestRow.key == "a")
            newest = dict((await conn.execute(latest)).all())
        distinct = {(f"d{n % 8}", 1_000_000 + n) for n in origin}
        assert len(distinct) == 311  # control: the redeliveries are there
        assert stored == 3 * len(distinct)
        for device in {d for d, _ in distinct}:  # latest moved only forward, whatever the commit order
            assert newest[device] == max(ts for d, ts in distinct if d == device)
        assert sum(committed) == 3 * 400 and len(committed) >= 400 // 10
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await engine.dispose()
