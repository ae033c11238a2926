"""Retention per tier and per model, chunked deletes, the space given back on SQLite, aggregates across a
retention boundary, and the storage figures — on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from telemetra.domain.timeutil import now_ms
from telemetra.storage.schema import Rollup1h, Rollup1m, TelemetryRow
from tests.conftest import ADMIN, AppFactory, Running

DAY = 86_400_000
QUIET = {"retention_interval_s": 3600, "presence_sweep_s": 3600, "retention_chunk_rows": 100}


async def post(t: Running, secret: str, readings: list[dict[str, Any]]) -> None:
    for i in range(0, len(readings), 500):
        r = await t.client.post("/api/v1/ingest/batch", json=readings[i : i + 500], headers={"X-API-Key": secret})
        assert r.status_code < 300, r.text


async def count(t: Running, table: Any, device_id: str) -> int:
    async with t.services.engine.connect() as conn:
        return int(
            (
                await conn.execute(select(func.count()).select_from(table).where(table.device_id == device_id))
            ).scalar_one()
        )


def hourly(start: int, hours: int, per_hour: int = 6) -> list[dict[str, Any]]:
    step = 3_600_000 // per_hour
    return [{"ts": start + i * step, "t": float(i % 7)} for i in range(hours * per_hour)]


async def test_each_tier_keeps_its_days_and_a_model_keeps_its_own(app_factory: AppFactory) -> None:
    async with app_factory(retention_raw_days=1, retention_1m_days=2, **QUIET) as t:
        now = now_ms() // 3_600_000 * 3_600_000
        a = await t.create_device("plain")
        b = await t.create_device("kept", model="keeper")
        r = await t.client.put("/api/v1/retention/models/keeper", json={"raw_days": 10}, headers=ADMIN)
        assert r.status_code == 200, r.text
        start = now - 4 * DAY
        await post(t, a, hourly(start, 4 * 24))
        await post(t, b, hourly(start, 4 * 24))
        assert await count(t, TelemetryRow, "plain") == 4 * 24 * 6
        stamps = [p["ts"] for p in hourly(start, 4 * 24)]
        cut = now_ms()
        result = await t.services.retention.run_pass()
        one_day = sum(1 for ts in stamps if ts >= cut - DAY)
        # Raw: a day for the plain device (in chunks of 100), ten for the keeper; 1m: two days; 1h: all.
        assert await count(t, TelemetryRow, "plain") == one_day
        assert await count(t, TelemetryRow, "kept") == 4 * 24 * 6
        assert await count(t, Rollup1m, "plain") == sum(1 for ts in stamps if ts >= cut - 2 * DAY)
        assert await count(t, Rollup1h, "plain") == 4 * 24
        assert result.deleted["raw"] == 4 * 24 * 6 - one_day
        metrics = (await t.client.get("/metrics")).text
        assert f'telemetra_retention_deleted_rows_total{{tier="raw"}} {4 * 24 * 6 - one_day}.0' in metrics
        r = await t.client.get("/api/v1/retention", headers=ADMIN)
        assert r.json()["models"] == [
            {"model": "keeper", "raw_days": 10, "rollup_1m_days": None, "rollup_1h_days": None}
        ]
        assert (await t.client.delete("/api/v1/retention/models/keeper", headers=ADMIN)).status_code == 204
        await t.services.retention.run_pass()
        assert await count(t, TelemetryRow, "kept") == sum(1 for ts in stamps if ts >= now_ms() - DAY)


async def test_an_aggregate_is_never_served_by_a_tier_that_lost_part_of_the_range(app_factory: AppFactory) -> None:
    async with app_factory(retention_raw_days=1, retention_1h_days=1, **QUIET) as t:
        now = now_ms() // 3_600_000 * 3_600_000
        secret = await t.create_device("agg")
        start = now - 3 * DAY
        await post(t, secret, hourly(start, 3 * 24))
        await t.services.retention.run_pass()
        base = f"/api/v1/devices/agg/aggregate?keys=t&start={start}&end={now}"
        r = await t.client.get(f"{base}&interval=1h&fn=count,min,max", headers=ADMIN)
        body = r.json()
        # 1h and raw hold one day of three: the 1-minute tier, which holds it all, answers.
        assert body["resolution"] == "1m" and "data_since" not in body
        assert len(body["series"]["t"]) == 3 * 24 and all(b["count"] == 6 for b in body["series"]["t"])
        # No exact tier holds it all (90 s buckets need raw points): the answer says from when it holds data.
        r = await t.client.get(f"{base}&interval=90s&fn=count", headers=ADMIN)
        assert r.json()["resolution"] == "raw" and "data_since" in r.json()


async def test_storage_figures(app_factory: AppFactory) -> None:
    async with app_factory(storage_budget_bytes=10**12, **QUIET) as t:
        secret = await t.create_device("big")
        small = await t.create_device("small")
        now = now_ms() // 3_600_000 * 3_600_000
        await post(t, secret, hourly(now - 2 * DAY, 48))
        await post(t, small, hourly(now - DAY, 2))
        if t.services.engine.dialect.name == "postgresql":
            async with t.services.engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
        r = await t.client.get("/api/v1/storage?top=5", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tiers"]["raw"]["rows"] == 48 * 6 + 12
        assert body["tiers"]["raw"]["bytes"] > 0 and body["tiers"]["1h"]["rows"] == 50
        assert [d["device_id"] for d in body["top_devices"]] == ["big", "small"]
        assert body["points_per_day"] > 0 and body["days_left"] > 0 and body["warning"] is False
        r = await t.client.get("/api/v1/storage?top=0", headers=ADMIN)
        assert r.status_code == 422 and r.json()["field"] == "top"


async def test_sqlite_gives_the_space_back(sqlite_url: str, tmp_path: Any) -> None:
    from tests.conftest import make_settings, running_app

    async with running_app(make_settings(sqlite_url, tmp_path / "data", retention_raw_days=1, **QUIET)) as t:
        secret = await t.create_device("v")
        await post(t, secret, [{"ts": now_ms() - 3 * DAY + i, "t": float(i), "pad": "x" * 200} for i in range(5000)])
        async with t.services.engine.connect() as conn:
            before = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
        result = await t.services.retention.run_pass()
        async with t.services.engine.connect() as conn:
            after = (await conn.exec_driver_sql("PRAGMA page_count")).scalar_one()
            free = (await conn.exec_driver_sql("PRAGMA freelist_count")).scalar_one()
        assert result.deleted["raw"] == 10_000 and result.vacuumed_pages > 0
        assert after < before and free == 0


async def test_postgres_migration_moves_every_row_into_month_partitions(tmp_path: Any) -> None:
    from telemetra.config import Settings
    from telemetra.storage import partitions
    from telemetra.storage.database import create_engine, migrate
    from tests.conftest import postgres_database

    async with postgres_database() as url:
        engine = create_engine(Settings(_env_file=None, database_url=url, data_dir=tmp_path))  # type: ignore[call-arg]
        try:
            await migrate(engine, "0005")
            now = now_ms()
            stamps = [now - d * DAY for d in (0, 1, 40, 75, 400)]
            async with engine.begin() as conn:
                for i, ts in enumerate(stamps):
                    values = f"('m', 'k', {ts}, {float(i)}, NULL, 0), ('m', 's', {ts}, NULL, 'x', 2)"
                    await conn.exec_driver_sql(f"INSERT INTO telemetry VALUES {values}")
            await migrate(engine)
            async with engine.connect() as conn:
                assert await partitions.is_partitioned(conn)
                names = await partitions.partitions(conn)
                rows = (
                    await conn.exec_driver_sql("SELECT ts, value_num FROM telemetry WHERE key = 'k' ORDER BY ts")
                ).all()
                in_default = (await conn.exec_driver_sql("SELECT count(*) FROM telemetry_default")).scalar_one()
            assert [r[0] for r in rows] == sorted(stamps) and in_default == 0
            assert partitions.partition_name(*partitions.month_start(now - 400 * DAY)) in names
            assert partitions.partition_name(*partitions.month_start(now + 80 * DAY)) in names  # made ahead
        finally:
            await engine.dispose()


async def test_postgres_retention_drops_whole_months(tmp_path: Any) -> None:
    from tests.conftest import make_settings, postgres_database, running_app

    async with postgres_database() as url:
        settings = make_settings(url, tmp_path / "data", retention_raw_days=60, **QUIET)
        async with running_app(settings) as t:
            secret = await t.create_device("old")
            now = now_ms()
            stamps = [now - d * DAY for d in (0, 10, 59, 61, 100, 130, 200, 400)]
            from telemetra.storage import partitions

            async with t.services.engine.begin() as conn:  # as if it had run for half a year
                for ts in stamps[:-1]:
                    await conn.exec_driver_sql(partitions.create_sql(*partitions.month_start(ts)))
            await post(t, secret, [{"ts": ts, "t": 1.0} for ts in stamps])  # the oldest: default partition
            async with t.services.engine.connect() as conn:
                before = await partitions.partitions(conn)
            result = await t.services.retention.run_pass()
            async with t.services.engine.connect() as conn:
                after = await partitions.partitions(conn)
                left = sorted(r[0] for r in (await conn.exec_driver_sql("SELECT ts FROM telemetry")).all())
            assert left == sorted(ts for ts in stamps if ts >= now - 60 * DAY - 5_000)
            assert result.dropped_partitions and set(result.dropped_partitions) == set(before) - set(after)
            assert result.deleted["raw"] == len(stamps) - len(left)
