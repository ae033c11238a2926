"""Tables. Every time is UTC epoch milliseconds in a BIGINT: one representation on SQLite and
PostgreSQL, exact to the millisecond, cheap to bucket (``ts - ts % interval``) and to partition by range.

Telemetry is narrow — (device, key, ts) → numeric or text value — so any payload shape fits; its primary
key is also what makes device-timestamped readings idempotent. There is deliberately no foreign key from
the hot tables to ``devices``: the writer never pays for the check, and deleting a device deletes its
rows explicitly (``storage.devices.delete_device``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Double, Index, Integer, SmallInteger, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = String(128)
KEY = String(128)


class Base(DeclarativeBase):
    pass


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128))
    model: Mapped[str | None] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16), default="device")
    parent_id: Mapped[str | None] = mapped_column(ID, index=True)
    role: Mapped[str | None] = mapped_column(String(128))
    fw_version: Mapped[str | None] = mapped_column(String(64))
    notes: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    # sha256 of the device secret: the secret has ≥128 random bits, so a slow hash buys nothing and a
    # fast, indexed one lets a bare X-API-Key find its device in one lookup.
    secret_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    auto_registered: Mapped[bool] = mapped_column(Boolean, default=False)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    rssi: Mapped[int | None] = mapped_column(Integer)
    last_seen_at: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    desired_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    desired_version: Mapped[int] = mapped_column(Integer, default=0)
    reported_config: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reported_version: Mapped[int | None] = mapped_column(Integer)


class ClaimCode(Base):
    __tablename__ = "claim_codes"

    code_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    used_at: Mapped[int | None] = mapped_column(BigInteger)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = ({"sqlite_with_rowid": False},)

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    value_num: Mapped[float | None] = mapped_column(Double)
    value_text: Mapped[str | None] = mapped_column(Text)
    vtype: Mapped[int] = mapped_column(SmallInteger)


class LatestRow(Base):
    __tablename__ = "latest"
    __table_args__ = ({"sqlite_with_rowid": False},)

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger)
    value_num: Mapped[float | None] = mapped_column(Double)
    value_text: Mapped[str | None] = mapped_column(Text)
    vtype: Mapped[int] = mapped_column(SmallInteger)


class DeviceState(Base):
    __tablename__ = "device_state"

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    ts: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer, default=1)


class StateHistory(Base):
    __tablename__ = "state_history"
    __table_args__ = (Index("ix_state_history_device_ts", "device_id", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    key: Mapped[str] = mapped_column(KEY)
    value: Mapped[str] = mapped_column(Text)
    ts: Mapped[int] = mapped_column(BigInteger)


class EventRow(Base):
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_device_ts", "device_id", "ts"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    ts: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(128))
    payload: Mapped[Any] = mapped_column(JSON)


class RejectedMessage(Base):
    __tablename__ = "rejected_messages"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_at: Mapped[int] = mapped_column(BigInteger, index=True)
    source: Mapped[str] = mapped_column(String(16))
    topic: Mapped[str | None] = mapped_column(Text)
    device_id: Mapped[str | None] = mapped_column(ID)
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)


class CommandRow(Base):
    """A command down to a device: queued → sent → acked | failed | expired."""

    __tablename__ = "commands"
    __table_args__ = (Index("ix_commands_device_status", "device_id", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    name: Mapped[str] = mapped_column(String(128))
    params: Mapped[Any] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    sent_via: Mapped[str | None] = mapped_column(String(8))  # "mqtt" or "http": how it went out
    sent_at: Mapped[int | None] = mapped_column(BigInteger)
    acked_at: Mapped[int | None] = mapped_column(BigInteger)
    result: Mapped[Any] = mapped_column(JSON)


class AlertRow(Base):
    """An alert: active → acknowledged → cleared. One active alert per (device, type): a repeat updates it."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index("ix_alerts_status_created", "status", "created_at"),
        Index("ix_alerts_device_type", "device_id", "type"),
        Index("ix_alerts_rule_device", "rule_id", "device_id", "status"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ID)
    type: Mapped[str] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Double)
    payload: Mapped[Any] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    acknowledged_at: Mapped[int | None] = mapped_column(BigInteger)
    cleared_at: Mapped[int | None] = mapped_column(BigInteger)
    rule_id: Mapped[int | None] = mapped_column(Integer)  # the rule that raised it (server-side alerts)


# --- OTA (issue 8) ------------------------------------------------------------------------------------


class FirmwareRow(Base):
    """A firmware image's metadata; the bytes live on disk (``ota.store``), never in the database."""

    __tablename__ = "firmware"
    __table_args__ = (UniqueConstraint("model", "version", "hardware", name="uq_firmware_model_version_hardware"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)  # iotmesh's node_type
    version: Mapped[str] = mapped_column(String(64))
    hardware: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(255))  # file name inside the firmware directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    md5: Mapped[str] = mapped_column(String(32))
    release_notes: Mapped[str | None] = mapped_column(Text)
    is_stable: Mapped[bool] = mapped_column(Boolean, default=False)
    prerelease: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(BigInteger)


class OtaJobRow(Base):
    """An update job: iotmesh's gateway-driven job, or a server-driven rollout with waves."""

    __tablename__ = "ota_jobs"
    __table_args__ = (Index("ix_ota_jobs_status_created", "status", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    firmware_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    delivery: Mapped[str] = mapped_column(String(16))  # "gateway" | "devices"
    status: Mapped[str] = mapped_column(String(16))
    target_node_id: Mapped[str | None] = mapped_column(String(128))
    target_node_type: Mapped[str | None] = mapped_column(String(128))
    force_update: Mapped[bool] = mapped_column(Boolean, default=False)
    target_model: Mapped[str | None] = mapped_column(String(128))
    target_device_ids: Mapped[Any] = mapped_column(JSON, nullable=True)
    target_filter: Mapped[Any] = mapped_column(JSON, nullable=True)
    target_percentage: Mapped[int | None] = mapped_column(Integer)
    waves: Mapped[Any] = mapped_column(JSON, nullable=True)  # cumulative percentages
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    rate_per_minute: Mapped[int] = mapped_column(Integer)
    device_timeout_s: Mapped[int] = mapped_column(Integer)
    max_retries: Mapped[int] = mapped_column(Integer)
    pause_failure_percent: Mapped[float | None] = mapped_column(Double)
    pause_min_finished: Mapped[int] = mapped_column(Integer)
    criteria_since: Mapped[int] = mapped_column(BigInteger)  # failures before the last resume were accepted
    next_notify_at: Mapped[int | None] = mapped_column(BigInteger)  # the notification rate's clock
    base_url: Mapped[str | None] = mapped_column(Text)  # where devices download from
    lease_holder: Mapped[str | None] = mapped_column(String(160))  # the gateway that took a pending job
    lease_until: Mapped[int | None] = mapped_column(BigInteger)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    started_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)


class OtaNodeRow(Base):
    """One device (or mesh node) in a job: iotmesh's ``nodes[]`` and a rollout's per-device state."""

    __tablename__ = "ota_job_nodes"
    __table_args__ = (
        Index("ix_ota_job_nodes_job_status", "job_id", "status"),
        Index("ix_ota_job_nodes_node", "node_id"),
    )

    job_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(ID, primary_key=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    position: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    current_part: Mapped[int] = mapped_column(Integer, default=0)
    total_parts: Mapped[int | None] = mapped_column(Integer)
    progress: Mapped[int | None] = mapped_column(Integer)  # percent, as devices report it
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # notifications sent
    command_id: Mapped[str | None] = mapped_column(String(36))
    started_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    notified_at: Mapped[int | None] = mapped_column(BigInteger)
    deadline_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)


# --- Data lifecycle (issue 10) ------------------------------------------------------------------------


class _Rollup:
    """One time bucket of one numeric series: what min/max/sum/count/avg/last need, kept up to date by the
    writer in the transaction that inserts the raw points (``storage.rollups``)."""

    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    key: Mapped[str] = mapped_column(KEY, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # start, epoch ms
    min: Mapped[float | None] = mapped_column(Double)
    max: Mapped[float | None] = mapped_column(Double)
    sum: Mapped[float | None] = mapped_column(Double)
    count: Mapped[int] = mapped_column(BigInteger)
    last_ts: Mapped[int] = mapped_column(BigInteger)
    last_value: Mapped[float | None] = mapped_column(Double)


class Rollup1m(_Rollup, Base):
    __tablename__ = "rollup_1m"
    __table_args__ = ({"sqlite_with_rowid": False},)


class Rollup1h(_Rollup, Base):
    __tablename__ = "rollup_1h"
    __table_args__ = ({"sqlite_with_rowid": False},)


class RuleRow(Base):
    """A server-side rule (``domain.rules``): a threshold on a key, or "offline" (not heard from for
    ``for_s``). ``devices`` / ``models`` / ``kinds``: lists of ids / model names / device kinds; none =
    every device."""

    __tablename__ = "rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    key: Mapped[str | None] = mapped_column(KEY)
    op: Mapped[str | None] = mapped_column(String(2))
    value: Mapped[float | None] = mapped_column(Double)
    for_s: Mapped[int] = mapped_column(Integer, default=0)
    clear_value: Mapped[float | None] = mapped_column(Double)
    severity: Mapped[str] = mapped_column(String(16))
    devices: Mapped[Any] = mapped_column(JSON, nullable=True)
    models: Mapped[Any] = mapped_column(JSON, nullable=True)
    kinds: Mapped[Any] = mapped_column(JSON, nullable=True)  # device kinds ("device", "gateway"); null: any
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    source: Mapped[str] = mapped_column(String(16), default="api")  # "api" or "file" (TELEMETRA_RULES_FILE)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class RuleStateRow(Base):
    """Where one rule stands for one device: ``pending`` (condition true since ``since``, held for
    ``for_s``) or ``firing`` (its alert is open). Kept in the database, so every process and a restart
    see the same thing; a transition is a conditional update, so two processes never both make it."""

    __tablename__ = "rule_state"

    rule_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ID, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    since: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[float | None] = mapped_column(Double)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class RetentionPolicyRow(Base):
    """Per device model, how many days each tier keeps (None: the setting's default)."""

    __tablename__ = "retention_policies"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    raw_days: Mapped[int | None] = mapped_column(Integer)
    rollup_1m_days: Mapped[int | None] = mapped_column(Integer)
    rollup_1h_days: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class WebhookRow(Base):
    """A subscription: ``events`` (names or patterns, ``domain.webhooks``) POSTed to ``url``, signed with
    ``secret``. The secret is kept as given — signing needs it — and never shown again after creation."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[Any] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(256))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class WebhookDeliveryRow(Base):
    """One event for one webhook, and how its delivery went (the delivery log). ``event_key`` identifies
    the event whichever process saw it, so the same event enqueued by two processes is one delivery.
    A delivery being attempted has ``next_attempt_at`` pushed a lease ahead, so a process that dies
    mid-attempt leaves it to be tried again, by whoever is running, when the lease ends."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("webhook_id", "event_key", name="uq_webhook_deliveries_event"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_log", "webhook_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(Integer)
    event_key: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(ID)
    body: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    last_attempt_at: Mapped[int | None] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger)
    response_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
