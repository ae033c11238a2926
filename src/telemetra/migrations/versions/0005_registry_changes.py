"""Registry changes announced by the database itself (storage.event_bridge)

PostgreSQL: a trigger on ``devices`` calls ``pg_notify('telemetra_registry', …)``; SQLite: triggers
append to ``registry_changes``. Only the columns that say who a device is, whether it may connect and
what it should run fire them — not last-seen and presence, which every ingest commit updates.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 03:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_EDITED = ("name", "model", "kind", "parent_id", "notes", "role")

_PG_FUNCTION = """
CREATE OR REPLACE FUNCTION telemetra_registry_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    change text;
    device text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        change := 'created'; device := NEW.id;
    ELSIF TG_OP = 'DELETE' THEN
        change := 'deleted'; device := OLD.id;
    ELSE
        device := NEW.id;
        IF NEW.secret_hash IS DISTINCT FROM OLD.secret_hash THEN
            change := CASE WHEN OLD.secret_hash IS NULL THEN 'claimed' ELSE 'rotated' END;
        ELSIF NEW.disabled IS DISTINCT FROM OLD.disabled THEN
            change := CASE WHEN NEW.disabled THEN 'disabled' ELSE 'enabled' END;
        ELSIF NEW.desired_version IS DISTINCT FROM OLD.desired_version THEN
            change := 'config';
        ELSIF ROW(NEW.name, NEW.model, NEW.kind, NEW.parent_id, NEW.notes, NEW.role, NEW.metadata::text)
              IS DISTINCT FROM
              ROW(OLD.name, OLD.model, OLD.kind, OLD.parent_id, OLD.notes, OLD.role, OLD.metadata::text)
        THEN
            change := 'updated';
        ELSE
            RETURN NULL;
        END IF;
    END IF;
    PERFORM pg_notify('telemetra_registry', json_build_object(
        'op', change, 'id', device, 'ts', (extract(epoch FROM clock_timestamp()) * 1000)::bigint)::text);
    RETURN NULL;
END
$$
"""
_PG_TRIGGER = """
CREATE TRIGGER telemetra_registry_changed
AFTER INSERT OR DELETE OR UPDATE OF secret_hash, disabled, desired_version, name, model, kind, parent_id,
    notes, role, metadata
ON devices FOR EACH ROW EXECUTE FUNCTION telemetra_registry_notify()
"""

_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


def _sqlite_triggers() -> list[str]:
    insert = "INSERT INTO registry_changes (device_id, op, ts) VALUES"
    edited_when = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in (*_EDITED, "metadata"))
    edited_cols = ", ".join((*_EDITED, "metadata"))
    return [
        f"""CREATE TRIGGER telemetra_device_created AFTER INSERT ON devices
            BEGIN {insert} (NEW.id, 'created', {_NOW_MS}); END""",
        f"""CREATE TRIGGER telemetra_device_deleted AFTER DELETE ON devices
            BEGIN {insert} (OLD.id, 'deleted', {_NOW_MS}); END""",
        f"""CREATE TRIGGER telemetra_device_keyed AFTER UPDATE OF secret_hash ON devices
            WHEN NEW.secret_hash IS NOT OLD.secret_hash
            BEGIN {insert} (NEW.id, CASE WHEN OLD.secret_hash IS NULL THEN 'claimed' ELSE 'rotated' END, {_NOW_MS});
            END""",
        f"""CREATE TRIGGER telemetra_device_disabled AFTER UPDATE OF disabled ON devices
            WHEN NEW.disabled IS NOT OLD.disabled AND NEW.secret_hash IS OLD.secret_hash
            BEGIN {insert} (NEW.id, CASE WHEN NEW.disabled THEN 'disabled' ELSE 'enabled' END, {_NOW_MS}); END""",
        f"""CREATE TRIGGER telemetra_device_config AFTER UPDATE OF desired_version ON devices
            WHEN NEW.desired_version IS NOT OLD.desired_version
            BEGIN {insert} (NEW.id, 'config', {_NOW_MS}); END""",
        f"""CREATE TRIGGER telemetra_device_edited AFTER UPDATE OF {edited_cols} ON devices
            WHEN ({edited_when}) AND NEW.secret_hash IS OLD.secret_hash AND NEW.disabled IS OLD.disabled
            BEGIN {insert} (NEW.id, 'updated', {_NOW_MS}); END""",
    ]


_SQLITE_TRIGGER_NAMES = (
    "telemetra_device_created",
    "telemetra_device_deleted",
    "telemetra_device_keyed",
    "telemetra_device_disabled",
    "telemetra_device_config",
    "telemetra_device_edited",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(_PG_TRIGGER)
        return
    op.create_table(
        "registry_changes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("op", sa.String(length=16), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sqlite_autoincrement=True,
    )
    for statement in _sqlite_triggers():
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS telemetra_registry_changed ON devices")
        op.execute("DROP FUNCTION IF EXISTS telemetra_registry_notify()")
        return
    for name in _SQLITE_TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("registry_changes")
