"""OTA: firmware, update jobs and their devices

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-01 23:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "firmware",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("hardware", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("path", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("release_notes", sa.Text(), nullable=True),
        sa.Column("is_stable", sa.Boolean(), nullable=False),
        sa.Column("prerelease", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model", "version", "hardware", name="uq_firmware_model_version_hardware"),
    )
    with op.batch_alter_table("firmware", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_firmware_model"), ["model"], unique=False)

    op.create_table(
        "ota_jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("firmware_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("delivery", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("target_node_id", sa.String(length=128), nullable=True),
        sa.Column("target_node_type", sa.String(length=128), nullable=True),
        sa.Column("force_update", sa.Boolean(), nullable=False),
        sa.Column("target_model", sa.String(length=128), nullable=True),
        sa.Column("target_device_ids", sa.JSON(), nullable=True),
        sa.Column("target_filter", sa.JSON(), nullable=True),
        sa.Column("target_percentage", sa.Integer(), nullable=True),
        sa.Column("waves", sa.JSON(), nullable=True),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("rate_per_minute", sa.Integer(), nullable=False),
        sa.Column("device_timeout_s", sa.Integer(), nullable=False),
        sa.Column("max_retries", sa.Integer(), nullable=False),
        sa.Column("pause_failure_percent", sa.Double(), nullable=True),
        sa.Column("pause_min_finished", sa.Integer(), nullable=False),
        sa.Column("criteria_since", sa.BigInteger(), nullable=False),
        sa.Column("next_notify_at", sa.BigInteger(), nullable=True),
        sa.Column("base_url", sa.Text(), nullable=True),
        sa.Column("lease_holder", sa.String(length=160), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("completed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ota_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ota_jobs_firmware_id"), ["firmware_id"], unique=False)
        batch_op.create_index("ix_ota_jobs_status_created", ["status", "created_at"], unique=False)

    op.create_table(
        "ota_job_nodes",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("current_part", sa.Integer(), nullable=False),
        sa.Column("total_parts", sa.Integer(), nullable=True),
        sa.Column("progress", sa.Integer(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("command_id", sa.String(length=36), nullable=True),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("notified_at", sa.BigInteger(), nullable=True),
        sa.Column("deadline_at", sa.BigInteger(), nullable=True),
        sa.Column("completed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("job_id", "node_id"),
    )
    with op.batch_alter_table("ota_job_nodes", schema=None) as batch_op:
        batch_op.create_index("ix_ota_job_nodes_job_status", ["job_id", "status"], unique=False)
        batch_op.create_index("ix_ota_job_nodes_node", ["node_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ota_job_nodes", schema=None) as batch_op:
        batch_op.drop_index("ix_ota_job_nodes_node")
        batch_op.drop_index("ix_ota_job_nodes_job_status")
    op.drop_table("ota_job_nodes")
    with op.batch_alter_table("ota_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_ota_jobs_status_created")
        batch_op.drop_index(batch_op.f("ix_ota_jobs_firmware_id"))
    op.drop_table("ota_jobs")
    with op.batch_alter_table("firmware", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_firmware_model"))
    op.drop_table("firmware")
