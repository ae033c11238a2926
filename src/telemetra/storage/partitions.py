"""PostgreSQL: ``telemetry`` is partitioned by time, one partition per UTC calendar month
(``telemetry_pYYYYMM``), plus a default partition for readings outside every month made so far (a device
that sends a reading from years back). Telemetra makes them itself — no pg_partman needed: migration 0006
makes the months that hold data and the next ones, and every retention pass makes the coming
``AHEAD_MONTHS`` (a month whose range the default partition already holds rows of is left to the default:
PostgreSQL would refuse it). Retention drops a whole month once every device's raw cutoff is past its end
(``DETACH`` then ``DROP``: no row-by-row delete, no vacuum debt); the rest goes by chunked deletes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncConnection

AHEAD_MONTHS = 3
DEFAULT_PARTITION = "telemetry_default"
_NAME = re.compile(r"^telemetry_p(\d{4})(\d{2})$")


def month_start(ms: int) -> tuple[int, int]:
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.year, dt.month


def next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def month_ms(year: int, month: int) -> int:
    return int(datetime(year, month, 1, tzinfo=UTC).timestamp() * 1000)


def partition_name(year: int, month: int) -> str:
    return f"telemetry_p{year:04d}{month:02d}"


def bounds_of(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    if m is None:
        return None
    year, month = int(m.group(1)), int(m.group(2))
    return month_ms(year, month), month_ms(*next_month(year, month))


def create_sql(year: int, month: int) -> str:
    lo, hi = month_ms(year, month), month_ms(*next_month(year, month))
    name = partition_name(year, month)
    return f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF telemetry FOR VALUES FROM ({lo}) TO ({hi})"


async def is_partitioned(conn: AsyncConnection) -> bool:
    kind = (
        await conn.exec_driver_sql("SELECT relkind::text FROM pg_class WHERE oid = 'telemetry'::regclass")
    ).scalar_one()
    return str(kind) == "p"


async def partitions(conn: AsyncConnection) -> list[str]:
    rows = await conn.exec_driver_sql(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'telemetry'::regclass ORDER BY c.relname"
    )
    return [r[0] for r in rows.all()]


async def ensure_ahead(conn: AsyncConnection, now_ms: int, months: int = AHEAD_MONTHS) -> list[str]:
    """Make this month's and the next ``months`` partitions; returns the ones made."""
    existing = set(await partitions(conn))
    made = []
    year, month = month_start(now_ms)
    for _ in range(months + 1):
        name = partition_name(year, month)
        if name not in existing:
            lo, hi = month_ms(year, month), month_ms(*next_month(year, month))
            held = await conn.exec_driver_sql(
                f"SELECT 1 FROM {DEFAULT_PARTITION} WHERE ts >= {lo} AND ts < {hi} LIMIT 1"
            )
            if held.first() is None:
                await conn.exec_driver_sql(create_sql(year, month))
                made.append(name)
        year, month = next_month(year, month)
    return made


async def drop_before(conn: AsyncConnection, cutoff: int) -> list[tuple[str, int]]:
    """Detach and drop every month that ends at or before ``cutoff``: (name, rows it held)."""
    dropped = []
    for name in await partitions(conn):
        bounds = bounds_of(name)
        if bounds is None or bounds[1] > cutoff:
            continue
        rows = (await conn.exec_driver_sql(f"SELECT count(*) FROM {name}")).scalar_one()
        await conn.exec_driver_sql(f"ALTER TABLE telemetry DETACH PARTITION {name}")
        await conn.exec_driver_sql(f"DROP TABLE {name}")
        dropped.append((name, int(rows)))
    return dropped
