"""PostgreSQL's LISTEN/NOTIFY between two Telemetra apps on one database: batches larger than NOTIFY's
8,000-byte payload arrive whole and in order, and a listener that loses its connection says so (resync)
and receives again once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from telemetra.events import model
from telemetra.events.model import ChangeEvent
from tests.conftest import PG_ADMIN_URL, Running, make_settings, postgres_database, running_app


@asynccontextmanager
async def two_processes(tmp_path: Path) -> AsyncIterator[tuple[Running, Running]]:
    async with (
        postgres_database() as url,
        running_app(make_settings(url, tmp_path / "a")) as a,
        running_app(make_settings(url, tmp_path / "b")) as b,
    ):
        for _ in range(200):  # each learns of the other from its first heartbeat
            if a.services.bridge.active and b.services.bridge.active:
                break
            await asyncio.sleep(0.025)
        assert a.services.bridge.active and b.services.bridge.active
        yield a, b


async def telemetry_of(events, n: int) -> list[ChangeEvent]:  # type: ignore[no-untyped-def]
    got: list[ChangeEvent] = []
    async with asyncio.timeout(10):
        async for event in events:
            if isinstance(event, ChangeEvent) and event.type == model.TELEMETRY:
                got.append(event)
                if len(got) == n:
                    return got
    raise AssertionError("the subscription ended")


async def test_a_batch_larger_than_one_notify_arrives_whole_and_in_order(tmp_path: Path) -> None:
    async with two_processes(tmp_path) as (a, b):
        key = await a.create_device("big")
        events = b.services.hub.subscribe(types=[model.TELEMETRY], devices=["big"])
        readings = [{"ts": 1_790_000_000_000 + i, "label": f"{i:04d}-" + "x" * 120, "n": i} for i in range(300)]
        r = await a.client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": key})
        assert r.status_code == 201, r.text
        got = await telemetry_of(events, 300)  # ~45 kB of events: six or more notifications
        assert [e.data["values"]["n"] for e in got] == list(range(300))
        assert got[7].data["values"]["label"] == "0007-" + "x" * 120
        assert b.services.bridge.received >= 300


async def test_a_listener_that_reconnects_resyncs_and_receives_again(tmp_path: Path) -> None:
    async with two_processes(tmp_path) as (a, b):
        key = await a.create_device("again")
        events = b.services.hub.subscribe(devices=None)
        admin = await asyncpg.connect(PG_ADMIN_URL)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'telemetra-events' AND pid = $1",
                b.services.bridge.server_pid,
            )
        finally:
            await admin.close()
        assert killed == 1
        async with asyncio.timeout(10):
            async for event in events:
                if isinstance(event, ChangeEvent) and event.data.get("change") == "resync":
                    break
        for _ in range(400):
            if b.services.bridge.connected and a.services.bridge.active:
                break
            await asyncio.sleep(0.025)
        r = await a.client.post("/api/v1/ingest", json={"device_id": "again", "t": 1}, headers={"X-API-Key": key})
        assert r.status_code == 201
        assert (await telemetry_of(events, 1))[0].data["values"] == {"t": 1.0}
