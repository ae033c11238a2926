"""Data lifecycle and server-side rules (issue 10): rollups, rules and their state, alerts' rule,
per-model retention.

The rollups are filled from the telemetry already stored, so ``/aggregate`` answers the same before and
after the upgrade.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 03:00:00.000000
"""

from __future__ import annotations

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


def upgrade() -> None:
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
