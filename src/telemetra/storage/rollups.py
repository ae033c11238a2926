"""Rollups kept up to date by the writer, in the transaction that inserts the raw points.

The writer knows which points were really inserted (a redelivered duplicate is not), so it folds exactly
those into one partial bucket per (device, key, bucket) in Python — a batch of readings a few seconds
apart becomes one row per series — and merges the partials into ``rollup_1m`` and ``rollup_1h`` with one
upsert each: min of mins, max of maxes, sums and counts added, and ``last`` taken from whichever side has
the newer point. A late or out-of-order reading merges into the bucket it belongs to like any other;
``last`` only moves when the reading is newer than the bucket's newest. The hour partials are folded from
the minute partials, not from the points again.

Rows go in sorted by key: two writer transactions in flight on PostgreSQL lock the same buckets in the
same order (as for ``latest``), so they wait for each other instead of deadlocking."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from telemetra.domain.records import ValueType
from telemetra.domain.rollups import HOUR, MINUTE, WIDTHS

# (device, key, ts, value): numeric points only (numbers and booleans; text is not aggregated).
NumericPoint = tuple[str, str, int, float]
# (device, key, bucket) → [min, max, sum, count, last_ts, last_value]
Partials = dict[tuple[str, str, int], list[Any]]

TABLES = {MINUTE: "rollup_1m", HOUR: "rollup_1h"}
_TEXT = int(ValueType.TEXT)

_COLUMNS = "device_id, key, bucket, min, max, sum, count, last_ts, last_value"


def _merge_set(table: str, excluded: str) -> str:
    return f"""
ON CONFLICT (device_id, key, bucket) DO UPDATE SET
    min = CASE WHEN {excluded}.min < {table}.min THEN {excluded}.min ELSE {table}.min END,
    max = CASE WHEN {excluded}.max > {table}.max THEN {excluded}.max ELSE {table}.max END,
    sum = {table}.sum + {excluded}.sum,
    count = {table}.count + {excluded}.count,
    last_value = CASE WHEN {excluded}.last_ts > {table}.last_ts THEN {excluded}.last_value ELSE {table}.last_value END,
    last_ts = CASE WHEN {excluded}.last_ts > {table}.last_ts THEN {excluded}.last_ts ELSE {table}.last_ts END
"""


def _pg_upsert(table: str) -> str:
    return (
        f"INSERT INTO {table} ({_COLUMNS}) SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], "
        "$4::float8[], $5::float8[], $6::float8[], $7::int8[], $8::int8[], $9::float8[])"
        + _merge_set(table, "EXCLUDED")
    )


def _sqlite_upsert(table: str) -> str:
    # As on PostgreSQL, every SET reads the row as it was before the update, so their order is free.
    return f"INSERT INTO {table} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" + _merge_set(table, "excluded")


_PG = {tier: _pg_upsert(table) for tier, table in TABLES.items()}
_SQLITE = {tier: _sqlite_upsert(table) for tier, table in TABLES.items()}


def numeric(rows: Iterable[tuple[Any, ...]]) -> list[NumericPoint]:
    """From point rows (device, key, ts, value_num, value_text, vtype), the ones rollups hold."""
    return [(r[0], r[1], r[2], r[3]) for r in rows if r[5] != _TEXT and r[3] is not None]


def fold_points(points: Iterable[NumericPoint], width: int) -> Partials:
    out: Partials = {}
    for device_id, key, ts, value in points:
        slot = (device_id, key, ts - ts % width)
        p = out.get(slot)
        if p is None:
            out[slot] = [value, value, value, 1, ts, value]
            continue
        if value < p[0]:
            p[0] = value
        if value > p[1]:
            p[1] = value
        p[2] += value
        p[3] += 1
        if ts > p[4]:
            p[4], p[5] = ts, value
    return out


def fold_partials(partials: Partials, width: int) -> Partials:
    out: Partials = {}
    for (device_id, key, bucket), (lo, hi, total, count, last_ts, last) in partials.items():
        slot = (device_id, key, bucket - bucket % width)
        p = out.get(slot)
        if p is None:
            out[slot] = [lo, hi, total, count, last_ts, last]
            continue
        p[0] = min(p[0], lo)
        p[1] = max(p[1], hi)
        p[2] += total
        p[3] += count
        if last_ts > p[4]:
            p[4], p[5] = last_ts, last
    return out


def _rows(partials: Partials) -> list[tuple[Any, ...]]:
    return [(*slot, *partials[slot]) for slot in sorted(partials)]


async def write_rollups(conn: AsyncConnection, points: Sequence[NumericPoint], *, pg: bool) -> None:
    """Merge ``points`` (each newly inserted, none twice) into every rollup tier, on ``conn``."""
    if not points:
        return
    minutes = fold_points(points, WIDTHS[MINUTE])
    for tier, partials in ((MINUTE, minutes), (HOUR, fold_partials(minutes, WIDTHS[HOUR]))):
        rows = _rows(partials)
        if pg:
            columns = tuple(list(col) for col in zip(*rows, strict=True))
            await conn.exec_driver_sql(_PG[tier], columns)
        else:
            await conn.exec_driver_sql(_SQLITE[tier], rows)  # type: ignore[arg-type]
