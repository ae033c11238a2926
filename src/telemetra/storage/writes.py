"""One batch → one transaction. The hot part (points, latest values, last-seen) takes a dialect fast path.

PostgreSQL: the points are COPYed (binary) straight into ``telemetry`` inside a savepoint. COPY costs the
client several times less CPU than binding the rows as ``unnest`` arrays (measured: 11 ms against 89 ms
for 19,200 rows) and the server half the time of an ``INSERT … SELECT … ON CONFLICT`` (118 ms against
264 ms). COPY cannot skip duplicates, though: when a reading is already stored (a redelivery), the
savepoint is rolled back and the batch goes through a per-connection temporary staging table and
``INSERT … SELECT … ON CONFLICT DO NOTHING`` instead, which stores exactly what is new. Latest values
(one row per device and key) and last-seen go as ``unnest`` arrays.

SQLite: ``executemany``. The rest (state, events, reports, rejected messages) is rare and uses Core."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from telemetra.domain.records import AlertRaise, Batch, DeviceReport, StateUpdate
from telemetra.storage.schema import (
    AlertRow,
    CommandRow,
    Device,
    DeviceState,
    EventRow,
    RejectedMessage,
    StateHistory,
)

_POINT_COLUMNS = ("device_id", "key", "ts", "value_num", "value_text", "vtype")
_PG_STAGE_TABLE = "telemetra_points_in"
# Temporary, so private to the connection; emptied by every commit (and by a rollback, with the rest).
_PG_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_PG_STAGE_TABLE} (
    device_id text, key text, ts int8, value_num float8, value_text text, vtype int2
) ON COMMIT DELETE ROWS
"""
_PG_POINTS = f"""
INSERT INTO telemetry (device_id, key, ts, value_num, value_text, vtype)
SELECT device_id, key, ts, value_num, value_text, vtype FROM {_PG_STAGE_TABLE}
ON CONFLICT DO NOTHING
"""
_PG_LATEST = """
INSERT INTO latest (device_id, key, ts, value_num, value_text, vtype)
SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::float8[], $5::text[], $6::int2[])
ON CONFLICT (device_id, key) DO UPDATE
SET ts = EXCLUDED.ts, value_num = EXCLUDED.value_num, value_text = EXCLUDED.value_text, vtype = EXCLUDED.vtype
WHERE latest.ts <= EXCLUDED.ts
"""
_PG_TOUCH = """
UPDATE devices AS d SET last_seen_at = $2::int8, online = true
FROM unnest($1::text[]) AS v(id)
WHERE d.id = v.id
"""
_SQLITE_POINTS = (
    "INSERT OR IGNORE INTO telemetry (device_id, key, ts, value_num, value_text, vtype) VALUES (?, ?, ?, ?, ?, ?)"
)
_SQLITE_LATEST = """
INSERT INTO latest (device_id, key, ts, value_num, value_text, vtype) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (device_id, key) DO UPDATE
SET ts = excluded.ts, value_num = excluded.value_num, value_text = excluded.value_text, vtype = excluded.vtype
WHERE latest.ts <= excluded.ts
"""
_SQLITE_TOUCH = "UPDATE devices SET last_seen_at = ?, online = 1 WHERE id = ?"

MAX_REJECTED_PAYLOAD = 4096


@dataclass(frozen=True, slots=True)
class WriteResult:
    points: int
    messages: int
    rejected: int = 0  # messages the database refused, kept as rejected-message records instead


PointRow = tuple[str, str, int, float | None, str | None, int]


def _point_rows(batch: Batch) -> list[PointRow]:
    rows: list[PointRow] = []
    extend = rows.extend
    for t in batch.telemetry:
        device_id, ts = t.device_id, t.ts
        extend([(device_id, key, ts, num, text, vtype) for key, num, text, vtype in t.values])
    return rows


def _latest_rows(rows: Iterable[PointRow]) -> list[PointRow]:
    """Newest point per (device, key), sorted: an upsert may touch a row once per statement, and a fixed
    lock order keeps several writer processes from deadlocking each other."""
    newest: dict[tuple[str, str], PointRow] = {}
    for row in rows:
        current = newest.get((row[0], row[1]))
        if current is None or row[2] >= current[2]:
            newest[(row[0], row[1])] = row
    return [newest[k] for k in sorted(newest)]


def _columns(rows: Sequence[PointRow]) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(6)]


async def _pg_points(conn: AsyncConnection, rows: list[PointRow]) -> None:
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        # The SAVEPOINT also opens the outer transaction (SQLAlchemy begins lazily), so the COPY,
        # which bypasses SQLAlchemy, runs inside it.
        async with conn.begin_nested():
            await driver.copy_records_to_table("telemetry", records=rows, columns=_POINT_COLUMNS)
    except asyncpg.UniqueViolationError:
        await conn.exec_driver_sql(_PG_STAGE)
        await driver.copy_records_to_table(_PG_STAGE_TABLE, records=rows, columns=_POINT_COLUMNS)
        await conn.exec_driver_sql(_PG_POINTS)


async def write_batch(conn: AsyncConnection, batch: Batch, *, now_ms: int) -> WriteResult:
    """Write everything in ``batch`` on ``conn`` (the caller owns the transaction)."""
    pg = conn.dialect.name == "postgresql"
    if batch.register:
        await _register(conn, batch, now_ms=now_ms, pg=pg)
    rows = _point_rows(batch)
    seen = sorted(
        {t.device_id for t in batch.telemetry}
        | {r.device_id for r in batch.states}
        | {r.device_id for r in batch.events}
    )
    if pg:
        # Through SQLAlchemy, not the raw asyncpg connection: SQLAlchemy opens its transaction lazily on
        # the first statement it runs, so raw calls made first would autocommit on their own.
        if rows:
            await _pg_points(conn, rows)
            await conn.exec_driver_sql(_PG_LATEST, tuple(_columns(_latest_rows(rows))))
        if seen:
            await conn.exec_driver_sql(_PG_TOUCH, (seen, now_ms))
    else:
        if rows:
            await conn.exec_driver_sql(_SQLITE_POINTS, rows)  # type: ignore[arg-type]
            await conn.exec_driver_sql(_SQLITE_LATEST, _latest_rows(rows))  # type: ignore[arg-type]
        if seen:
            await conn.exec_driver_sql(_SQLITE_TOUCH, [(now_ms, d) for d in seen])  # type: ignore[arg-type]
    if batch.states:
        await _write_states(conn, batch.states, pg=pg)
    for report in batch.reports:
        await _apply_report(conn, report, now_ms=now_ms)
    if batch.events:
        await conn.execute(
            EventRow.__table__.insert(),
            [{"device_id": e.device_id, "ts": e.ts, "name": e.name, "payload": e.payload} for e in batch.events],
        )
    if batch.rejected:
        await conn.execute(
            RejectedMessage.__table__.insert(),
            [
                {
                    "received_at": r.received_ts,
                    "source": r.source,
                    "topic": storable_text(r.topic, 1000),
                    "device_id": storable_text(r.device_id, 128),
                    "reason": storable_text(r.reason, 1000),
                    "payload": storable_payload(r.payload),
                }
                for r in batch.rejected
            ],
        )
    for alert in batch.alerts:
        await _raise_alert(conn, alert, now_ms=now_ms)
    for ack in batch.acks:
        await conn.execute(
            update(CommandRow)
            .where(
                CommandRow.id == ack.command_id,
                CommandRow.device_id == ack.device_id,
                CommandRow.status.in_(("queued", "sent")),
            )
            .values(status="acked" if ack.ok else "failed", acked_at=now_ms, result=ack.result)
        )
    return WriteResult(points=len(rows), messages=len(batch.telemetry))


def storable_payload(payload: bytes) -> str:
    """Any bytes as text every database takes: invalid UTF-8 as ``\\xNN`` escapes, NUL as ``\\x00``."""
    return payload[:MAX_REJECTED_PAYLOAD].decode("utf-8", "backslashreplace").replace("\x00", "\\x00")


def storable_text(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    return value[:limit].encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


async def _raise_alert(conn: AsyncConnection, alert: AlertRaise, *, now_ms: int) -> None:
    """One open alert per (device, type): a repeat refreshes it instead of piling up copies."""
    open_id = (
        await conn.execute(
            select(AlertRow.id)
            .where(
                AlertRow.device_id == alert.device_id,
                AlertRow.type == alert.type,
                AlertRow.status.in_(("active", "acknowledged")),
            )
            .order_by(AlertRow.id.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if open_id is not None:
        await conn.execute(
            update(AlertRow)
            .where(AlertRow.id == open_id)
            .values(
                severity=alert.severity,
                message=alert.message,
                value=alert.value,
                payload=alert.payload,
                count=AlertRow.count + 1,
                updated_at=now_ms,
            )
        )
        return
    await conn.execute(
        AlertRow.__table__.insert().values(
            device_id=alert.device_id,
            type=alert.type,
            severity=alert.severity,
            message=alert.message,
            value=alert.value,
            payload=alert.payload,
            status="active",
            count=1,
            created_at=alert.ts,
            updated_at=now_ms,
        )
    )


async def _register(conn: AsyncConnection, batch: Batch, *, now_ms: int, pg: bool) -> None:
    insert = postgresql.insert(Device) if pg else sqlite.insert(Device)
    unique = {r.device_id: r for r in batch.register}
    values = [
        {
            "id": r.device_id,
            "kind": r.kind,
            "parent_id": r.parent_id,
            "auto_registered": True,
            "created_at": now_ms,
            "updated_at": now_ms,
            "meta": {},
            "disabled": False,
            "online": False,
            "desired_version": 0,
        }
        for r in sorted(unique.values(), key=lambda r: r.device_id)
    ]
    # ON CONFLICT DO NOTHING is what keeps concurrent first posts of one device from racing into errors.
    await conn.execute(insert.on_conflict_do_nothing(index_elements=["id"]), values)


async def _write_states(conn: AsyncConnection, states: list[StateUpdate], *, pg: bool) -> None:
    latest: dict[tuple[str, str], tuple[str, int]] = {}
    for s in sorted(states, key=lambda s: s.ts):
        for key, value in s.values.items():
            latest[(s.device_id, key)] = (value, s.ts)
    devices = sorted({d for d, _ in latest})
    current = {
        (row.device_id, row.key): row
        for row in (await conn.execute(select(DeviceState).where(DeviceState.device_id.in_(devices)))).all()
    }
    history: list[dict[str, Any]] = []
    insert = postgresql.insert(DeviceState) if pg else sqlite.insert(DeviceState)
    for (device_id, key), (value, ts) in sorted(latest.items()):
        row = current.get((device_id, key))
        if row is not None and (row.value == value or row.ts > ts):
            continue
        version = 1 if row is None else row.version + 1
        stmt = insert.values(device_id=device_id, key=key, value=value, ts=ts, version=version)
        stmt = stmt.on_conflict_do_update(
            index_elements=["device_id", "key"],
            set_={"value": value, "ts": ts, "version": DeviceState.version + 1},
        )
        await conn.execute(stmt)
        history.append({"device_id": device_id, "key": key, "value": value, "ts": ts})
    if history:
        await conn.execute(StateHistory.__table__.insert(), history)


async def _apply_report(conn: AsyncConnection, report: DeviceReport, *, now_ms: int) -> None:
    values: dict[str, Any] = {"updated_at": now_ms}
    for name in ("online", "rssi", "fw_version", "name", "role", "model"):
        value = getattr(report, name)
        if value is not None:
            values[name] = value
    if report.reported_config is not None:
        values["reported_config"] = report.reported_config
        version = report.reported_config.get("version")
        if isinstance(version, int) and not isinstance(version, bool):
            values["reported_version"] = version
    if report.online:
        values["last_seen_at"] = now_ms
    await conn.execute(update(Device).where(Device.id == report.device_id).values(**values))
