"""Data lifecycle and server-side rules (issue 10): rollups, rules and their state, alerts' rule,
per-model retention.

The rollups are filled from the telemetry already stored, so ``/aggregate`` answers the same before and
after the upgrade. On PostgreSQL ``telemetry`` becomes a table partitioned by month (storage.partitions):
the old table's rows are moved into it, every one, in this migration's transaction.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 03:00:00.000000
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_TEXT = 2  # domain.records.ValueType.TEXT: not aggregated

# The value of the newest point of each bucket rides along as a window value, constant over its group.
_BACKFILL_1M = f"""
INSERT INTO rollup_1m (device_id, key, bucket, min, max, sum, count, last_ts, last_value)
SELECT device_id, key, bucket, min(value_num), max(value_num), sum(value_num), count(*), max(ts), max(last_value)
FROM (
    SELECT device_id, key, ts, value_num, ts - ts % 60000 AS bucket,
           first_value(value_num) OVER (PARTITION BY device_id, key, ts - ts % 60000 ORDER BY ts DESC) AS last_value
    FROM telemetry WHERE vtype != {_TEXT}
) AS points
GROUP BY device_id, key, bucket
"""
_BACKFILL_1H = """
INSERT INTO rollup_1h (device_id, key, bucket, min, max, sum, count, last_ts, last_value)
SELECT device_id, key, bucket, min(min), max(max), sum(sum), sum(count), max(last_ts), max(last)
FROM (
    SELECT device_id, key, min, max, sum, count, last_ts, bucket - bucket % 3600000 AS bucket,
           first_value(last_value) OVER (PARTITION BY device_id, key, bucket - bucket % 3600000
                                         ORDER BY last_ts DESC) AS last
    FROM rollup_1m
) AS minutes
GROUP BY device_id, key, bucket
"""


def _rollup_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("bucket", sa.BigInteger(), nullable=False),
        sa.Column("min", sa.Double(), nullable=True),
        sa.Column("max", sa.Double(), nullable=True),
        sa.Column("sum", sa.Double(), nullable=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=False),
        sa.Column("last_value", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "key", "bucket"),
        sqlite_with_rowid=False,
    )


_PG_PARTITIONED = """
CREATE TABLE telemetry (
    device_id varchar(128) NOT NULL,
    key varchar(128) NOT NULL,
    ts bigint NOT NULL,
    value_num double precision,
    value_text text,
    vtype smallint NOT NULL,
    CONSTRAINT telemetry_pkey PRIMARY KEY (device_id, key, ts)
) PARTITION BY RANGE (ts)
"""
_AHEAD_MONTHS = 3


def _months(lo_ms: int, hi_ms: int) -> list[tuple[int, int, int, int]]:
    """(year, month, start ms, end ms) for every UTC month from lo's to hi's."""
    out = []
    dt = datetime.fromtimestamp(lo_ms / 1000, tz=UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    while int(dt.timestamp() * 1000) <= hi_ms:
        nxt = dt.replace(year=dt.year + 1, month=1) if dt.month == 12 else dt.replace(month=dt.month + 1)
        out.append((dt.year, dt.month, int(dt.timestamp() * 1000), int(nxt.timestamp() * 1000)))
        dt = nxt
    return out


def _partition_telemetry() -> None:
    bind = op.get_bind()
    lo, hi = bind.exec_driver_sql("SELECT min(ts), max(ts) FROM telemetry").one()
    now = int(time.time() * 1000)
    ahead = now + (_AHEAD_MONTHS * 31 + 1) * 86_400_000
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_unpartitioned")
    op.execute("ALTER TABLE telemetry_unpartitioned RENAME CONSTRAINT telemetry_pkey TO telemetry_unpartitioned_pkey")
    op.execute(_PG_PARTITIONED)
    op.execute("CREATE TABLE telemetry_default PARTITION OF telemetry DEFAULT")
    # Every month that holds a stored reading, up to the months ahead; readings from before the earliest go
    # to the default partition (there are none at first).
    first = min(lo, now) if lo is not None else now
    for year, month, start, end in _months(first, max(ahead, hi or 0)):
        op.execute(
            f"CREATE TABLE telemetry_p{year:04d}{month:02d} PARTITION OF telemetry FOR VALUES FROM ({start}) TO ({end})"
        )
    op.execute(
        "INSERT INTO telemetry SELECT device_id, key, ts, value_num, value_text, vtype FROM telemetry_unpartitioned"
    )
    op.execute("DROP TABLE telemetry_unpartitioned")


def _unpartition_telemetry() -> None:
    op.execute("ALTER TABLE telemetry RENAME TO telemetry_partitioned")
    op.execute("ALTER TABLE telemetry_partitioned RENAME CONSTRAINT telemetry_pkey TO telemetry_partitioned_pkey")
    op.execute(_PG_PARTITIONED.replace(" PARTITION BY RANGE (ts)", ""))
    op.execute("INSERT INTO telemetry SELECT * FROM telemetry_partitioned")
    op.execute("DROP TABLE telemetry_partitioned CASCADE")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _partition_telemetry()
    _rollup_table("rollup_1m")
    _rollup_table("rollup_1h")
    op.execute(_BACKFILL_1M)
    op.execute(_BACKFILL_1H)
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=True),
        sa.Column("op", sa.String(length=2), nullable=True),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("for_s", sa.Integer(), nullable=False),
        sa.Column("clear_value", sa.Double(), nullable=True),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "rule_state",
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("since", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "device_id"),
    )
    op.create_table(
        "retention_policies",
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("raw_days", sa.Integer(), nullable=True),
        sa.Column("rollup_1m_days", sa.Integer(), nullable=True),
        sa.Column("rollup_1h_days", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule_id", sa.Integer(), nullable=True))
        batch_op.create_index("ix_alerts_rule_device", ["rule_id", "device_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_rule_device")
        batch_op.drop_column("rule_id")
    for table in ("retention_policies", "rule_state", "rules", "rollup_1h", "rollup_1m"):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_telemetry()
