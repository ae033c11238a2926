"""A message the database refuses for good (poison) never fails, holds up or loses its neighbours.

The records are built by hand, past the normaliser (which refuses these values up front), so that the
writer's own safety net is what is tested: the batch is split until the refused message is alone, every
good message is committed once, and the refused one becomes a rejected-message record (MQTT) or an
``Unstorable`` error (HTTP) — on a real SQLite and a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.config import Settings
from telemetra.domain.errors import Unstorable
from telemetra.domain.records import Batch, Event, Origin, Telemetry, Value, ValueType
from telemetra.ingest.queue import IngestQueue
from telemetra.metrics import Metrics
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.faults import DatabaseLocation, DatabaseState
from telemetra.storage.schema import EventRow, RejectedMessage, TelemetryRow

TS = 1_790_000_000_000


def good(n: int) -> Batch:
    payload = b'{"ts":%d,"n":%d}' % (TS + n, n)
    batch = Batch(telemetry=[Telemetry("dev", TS + n, (Value("n", float(n), None, int(ValueType.NUMBER)),), True)])
    batch.origin = Origin("mqtt", "telemetry", "telemetra/dev/telemetry", payload, "dev", TS)
    return batch


def deep(levels: int) -> Any:
    doc: Any = "bottom"
    for _ in range(levels):
        doc = {"a": doc}
    return doc


def poison_event() -> Batch:
    """Nested past what the JSON serialiser can recurse through: refused by SQLite and PostgreSQL alike."""
    batch = Batch(events=[Event("dev", TS, "boot", deep(5000))])
    batch.origin = Origin("mqtt", "event", "telemetra/dev/event/boot", b'{"a":{"a":"...\x00\xff"}}', "dev", TS)
    return batch


def poison_text() -> Batch:
    """A NUL in a text value: PostgreSQL refuses it (SQLite stores it)."""
    values = (Value("label", None, "bad\x00text", int(ValueType.TEXT)),)
    batch = Batch(telemetry=[Telemetry("dev", TS + 99_999, values, True)])
    batch.origin = Origin("mqtt", "telemetry", "telemetra/dev/telemetry", b'{"label":"bad\\u0000text"}', "dev", TS)
    return batch


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def queue(engine: AsyncEngine) -> AsyncIterator[IngestQueue]:
    in_flight = 1 if engine.dialect.name == "sqlite" else 2
    queue = IngestQueue(
        engine,
        metrics=Metrics(),
        state=DatabaseState(DatabaseLocation("test", "test")),
        max_points=100_000,
        batch_max_points=20_000,
        commits_in_flight=in_flight,
    )
    writer = asyncio.create_task(queue.run())
    yield queue
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_poison_in_a_chunk_is_kept_as_rejected_and_its_neighbours_are_stored(
    engine: AsyncEngine, queue: IngestQueue
) -> None:
    parts = [good(n) for n in range(300)]
    poison = [poison_event()]
    if engine.dialect.name == "postgresql":
        poison.append(poison_text())
    for i, bad in enumerate(poison):
        parts.insert(50 + 100 * i, bad)
    futures = [
        await queue.put(parts, transport="mqtt"),
        await queue.put([good(n) for n in range(300, 400)], transport="mqtt"),
    ]
    results = await asyncio.wait_for(asyncio.gather(*futures), timeout=60)
    assert results[0].rejected == len(poison) and results[1].rejected == 0
    assert results[0].points == 300 and results[1].points == 100
    assert await count(engine, TelemetryRow) == 400  # every good neighbour, once
    assert await count(engine, EventRow) == 0
    async with engine.connect() as conn:
        rows = (await conn.execute(select(RejectedMessage.__table__).order_by(RejectedMessage.id))).all()
    assert len(rows) == len(poison)
    for row in rows:
        assert row.reason.startswith("unstorable: ") and row.device_id == "dev"
        assert "\x00" not in row.payload  # kept in a storable form: escaped
    assert rows[0].topic == "telemetra/dev/event/boot" and "\\x00\\xff" in rows[0].payload
    assert queue.status().ok


async def test_poison_over_http_is_refused_with_422_and_a_neighbour_commits(
    engine: AsyncEngine, queue: IngestQueue
) -> None:
    bad = poison_event()
    bad.origin = None  # HTTP keeps no rejected record: the client is told instead
    neighbour = good(1)
    neighbour.origin = None
    refused, stored = await asyncio.gather(
        queue.submit(bad, transport="http"), queue.submit(neighbour, transport="http"), return_exceptions=True
    )
    assert isinstance(refused, Unstorable) and refused.status == 422 and refused.field == "body"
    assert not isinstance(stored, BaseException) and stored.points == 1
    assert await count(engine, TelemetryRow) == 1
    assert await count(engine, RejectedMessage) == 0
