"""Rollups against the raw points they summarise: random readings arriving late, out of order and
twice (in one batch and across batches), on SQLite and PostgreSQL; and which tier answers which request."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetra.config import Settings
from telemetra.domain.records import Batch, Telemetry, Value, ValueType
from telemetra.domain.rollups import HOUR, MINUTE, RAW, choose_resolution
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.queries import AGGREGATES, TelemetryQueries, bucket_values
from telemetra.storage.writes import write_batch

BASE = 1_780_000_000_000 - 1_780_000_000_000 % 3_600_000  # an hour edge
SPAN = 3 * 3_600_000

# A reading: key, offset in seconds within three hours (coarse, so repeats are common), value.
readings = st.tuples(st.sampled_from(["t", "h"]), st.integers(0, SPAN // 1000 - 1), st.integers(-50, 50))
batches = st.lists(st.lists(readings, min_size=1, max_size=25), min_size=1, max_size=6)


def _batch(device_id: str, items: list[tuple[str, int, int]], *, as_bool: bool = False) -> Batch:
    out = []
    for key, offset, value in items:
        vtype = ValueType.BOOL if as_bool and key == "h" else ValueType.NUMBER
        num = float(value > 0) if vtype == ValueType.BOOL else value / 4
        out.append(Telemetry(device_id, BASE + offset * 1000, (Value(key, num, None, int(vtype)),), True))
    return Batch(telemetry=out)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return bool(a == b)


def _same(raw: list[Any], rolled: list[Any]) -> None:
    assert [(b.key, b.start) for b in raw] == [(b.key, b.start) for b in rolled]
    for r, o in zip(raw, rolled, strict=True):
        for fn in AGGREGATES:
            assert _close(r.values[fn], o.values[fn]), (r.key, r.start, fn, r.values, o.values)


class Checker:
    """One database for every example; each example writes its own device."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.settings = Settings(_env_file=None, database_url=url, data_dir=data_dir)  # type: ignore[call-arg]
        self.migrated = False

    async def run(self, batches: list[list[tuple[str, int, int]]], as_bool: bool) -> None:
        engine = create_engine(self.settings)
        try:
            if not self.migrated:
                await migrate(engine)
                self.migrated = True
            device = f"d-{uuid.uuid4().hex[:10]}"
            for n, items in enumerate(batches):
                async with engine.begin() as conn:
                    await write_batch(conn, _batch(device, items, as_bool=as_bool), now_ms=BASE + n)
            raw = TelemetryQueries(engine, rollups=False)
            rolled = TelemetryQueries(engine)
            cases: list[tuple[int, int, int | None, str]] = [
                (BASE, BASE + SPAN, 3_600_000, HOUR),
                (BASE, BASE + SPAN, 60_000, MINUTE),
                (BASE, BASE + SPAN, 300_000, MINUTE),
                (BASE, BASE + SPAN, None, HOUR),
                (BASE + 60_000, BASE + SPAN - 120_000, None, MINUTE),
                (BASE + 60_000, BASE + 2 * 3_600_000, 7_200_000, MINUTE),
            ]
            for start, end, interval, tier in cases:
                kwargs: dict[str, Any] = {
                    "keys": ["t", "h"],
                    "start": start,
                    "end": end,
                    "interval_ms": interval,
                    "functions": AGGREGATES,
                }
                expected = await raw.aggregate_at(device, **kwargs)
                got = await rolled.aggregate_at(device, **kwargs)
                assert (expected.resolution, got.resolution) == (RAW, tier)
                _same(expected.buckets, got.buckets)
            # Some functions, in an order of the caller's (the answer keeps it), with and without ``last``.
            for functions in (["count", "min"], ["last", "max"]):
                kwargs = {"keys": ["t", "h"], "start": BASE, "end": BASE + SPAN, "functions": functions}
                for interval in (3_600_000, 7_200_000):
                    expected = await raw.aggregate_at(device, interval_ms=interval, **kwargs)
                    got = await rolled.aggregate_at(device, interval_ms=interval, **kwargs)
                    assert [list(b.values) for b in got.buckets] == [functions] * len(expected.buckets)
                    assert [b.values for b in got.buckets] == [b.values for b in expected.buckets]
        finally:
            await engine.dispose()


@pytest.fixture
def checker(database_url: str, tmp_path: Path) -> Checker:
    return Checker(database_url, tmp_path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches, as_bool=st.booleans())
def test_rollups_answer_as_the_raw_points_do(
    checker: Checker, batches: list[list[tuple[str, int, int]]], as_bool: bool
) -> None:
    asyncio.run(checker.run(batches, as_bool))


@pytest.mark.parametrize(
    ("start", "end", "interval", "expected"),
    [
        (BASE, BASE + SPAN, 3_600_000, HOUR),
        (BASE, BASE + SPAN, 86_400_000, HOUR),
        (BASE, BASE + SPAN, 60_000, MINUTE),
        (BASE, BASE + SPAN, 90_000, RAW),  # not a multiple of a minute
        (BASE + 60_000, BASE + SPAN, 3_600_000, MINUTE),  # start off the hour
        (BASE + 1, BASE + SPAN, 3_600_000, RAW),  # start off the minute
        (BASE, BASE + SPAN - 1, None, RAW),
        (BASE, BASE + SPAN, None, HOUR),
    ],
)
def test_the_coarsest_exact_tier_is_chosen(start: int, end: int, interval: int | None, expected: str) -> None:
    assert choose_resolution(start=start, end=end, interval_ms=interval) == expected
    assert choose_resolution(start=start, end=end, interval_ms=interval, enabled=False) == RAW


def test_a_tier_that_lost_part_of_the_range_is_passed_over() -> None:
    kept = {RAW: BASE + SPAN, MINUTE: BASE - 1, HOUR: BASE + 3_600_000}
    assert choose_resolution(start=BASE, end=BASE + SPAN, interval_ms=3_600_000, kept_since=kept) == MINUTE
    # Nothing holds it all: the tier that holds the most answers, never a mix.
    kept = {RAW: BASE + SPAN, MINUTE: BASE + 7_200_000, HOUR: BASE + 3_600_000}
    assert choose_resolution(start=BASE, end=BASE + SPAN, interval_ms=3_600_000, kept_since=kept) == HOUR


async def test_the_aggregate_answer_says_which_tier_served_it(api: Any) -> None:
    from tests.conftest import ADMIN

    secret = await api.create_device("agg-1")
    points = [{"ts": BASE + i * 30_000, "t": float(i)} for i in range(240)]
    r = await api.client.post("/api/v1/ingest/batch", json=points, headers={"X-API-Key": secret})
    assert r.status_code < 300, r.text
    base = f"/api/v1/devices/agg-1/aggregate?keys=t&start={BASE}&end={BASE + 7_200_000}"
    answers = {}
    for interval in ("1h", "1m", "90s"):
        r = await api.client.get(f"{base}&interval={interval}", headers=ADMIN)
        assert r.status_code == 200, r.text
        answers[interval] = r.json()
    assert [answers[i]["resolution"] for i in ("1h", "1m", "90s")] == [HOUR, MINUTE, RAW]
    hours = answers["1h"]["series"]["t"]
    assert [(b["count"], b["min"], b["max"], b["last"]) for b in hours] == [
        (120, 0.0, 119.0, 119.0),
        (120, 120.0, 239.0, 239.0),
    ]


async def test_the_migration_rolls_up_what_is_already_stored(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine, "0005")
        rows = [("m1", "t", BASE + i * 7_000, float(i % 13), None, 0) for i in range(2_000)]
        rows += [("m1", "s", BASE + 5, None, "text", 2)]
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO telemetry (device_id, key, ts, value_num, value_text, vtype) VALUES "
                + ", ".join(
                    f"('{d}', '{k}', {ts}, {'NULL' if v is None else v}, {'NULL' if x is None else repr(x)}, {vt})"
                    for d, k, ts, v, x, vt in rows
                )
            )
        await migrate(engine)
        raw, rolled = TelemetryQueries(engine, rollups=False), TelemetryQueries(engine)
        for interval, tier in ((3_600_000, HOUR), (60_000, MINUTE)):
            kwargs: dict[str, Any] = {"keys": ["t", "s"], "start": BASE, "end": BASE + 4 * 3_600_000}
            expected = await raw.aggregate_at("m1", interval_ms=interval, functions=AGGREGATES, **kwargs)
            got = await rolled.aggregate_at("m1", interval_ms=interval, functions=AGGREGATES, **kwargs)
            assert got.resolution == tier
            assert len(got.buckets) > 3
            _same(expected.buckets, got.buckets)
    finally:
        await engine.dispose()


def test_bucket_values_keep_the_functions_asked_in_their_order() -> None:
    full = bucket_values(AGGREGATES)(1.0, 3.0, 2.0, 6.0, 3, 2.5)
    assert full == {"min": 1.0, "max": 3.0, "avg": 2.0, "sum": 6.0, "count": 3, "last": 2.5}
    assert list(full) == list(AGGREGATES)
    some = bucket_values(["min", "avg", "last"])(1.0, 3.0, 2.0, 6.0, 3, 2.5)
    assert list(some.items()) == [("min", 1.0), ("avg", 2.0), ("last", 2.5)]
    reordered = bucket_values(["last", "min", "last"])(1.0, 3.0, 2.0, 6.0, 3, 2.5)
    assert list(reordered.items()) == [("last", 2.5), ("min", 1.0)]
