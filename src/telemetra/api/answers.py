"""The shapes of the answers the API builds as plain dicts (written by orjson or FastAPI's encoder), for the
OpenAPI document (``api.openapi.answers``): documented, not validated on every answer; the schemathesis
test holds the answers to them. Timestamps are ISO 8601 UTC with ``Z`` and milliseconds."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

Value = Any  # a stored value: number, string, boolean, or a JSON document


class Point(BaseModel):
    ts: str
    value: Value = Field(description="number, string, boolean or JSON document")


class HistoryPage(BaseModel):
    device_id: str
    start: str
    end: str
    series: dict[str, list[Point]] = Field(description="points per key")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class LatestValues(BaseModel):
    device_id: str
    values: dict[str, Point] = Field(description="the newest point of each key")


class AggregatePage(BaseModel):
    device_id: str
    interval: str | None
    resolution: str = Field(description="the tier the buckets were computed from (raw, or a rollup)")
    data_since: str | None = Field(None, description="present when retention removed the start of the range")
    start: str
    end: str
    series: dict[str, list[dict[str, Any]]] = Field(
        description="per key, buckets of `{start, min, max, avg, sum, count, last}` (the functions asked for)"
    )


class StatsPage(AggregatePage):
    stats: dict[str, dict[str, Any] | None] = Field(description="per key: min, max, avg and count over the range")


class StateValue(BaseModel):
    value: Value
    ts: str
    version: int | None


class DeviceState(BaseModel):
    device_id: str
    state: dict[str, StateValue]


class StateChange(BaseModel):
    key: str
    value: Value
    ts: str


class StateHistory(BaseModel):
    device_id: str
    history: list[StateChange]


class Event(BaseModel):
    id: int
    name: str
    ts: str
    payload: Value


class Events(BaseModel):
    device_id: str
    events: list[Event]


class RejectedMessage(BaseModel):
    id: int
    received_at: str
    source: str
    topic: str | None
    device_id: str | None
    reason: str
    payload: str | None


class Rejected(BaseModel):
    rejected: list[RejectedMessage]


class Command(BaseModel):
    id: str
    device_id: str
    name: str
    params: Value
    status: str = Field(description="queued, sent, acked, failed or expired")
    created_at: str | None
    sent_at: str | None
    acked_at: str | None
    expires_at: str | None
    result: Value = Field(None, description="the device's answer")


class CommandList(BaseModel):
    device_id: str
    commands: list[Command]


class PendingCommand(BaseModel):
    id: str
    name: str
    params: Value
    ts: int = Field(description="queued at, milliseconds since the epoch")


class PendingCommands(BaseModel):
    commands: list[PendingCommand]


class ConfigView(BaseModel):
    device_id: str
    desired: dict[str, Any]
    desired_version: int | None
    reported: dict[str, Any]
    reported_version: int | None
    delta: dict[str, Any] = Field(description="desired values the device has not reported yet")
    in_sync: bool


class ConfigPublished(ConfigView):
    published: bool = Field(description="handed to the broker (retained) now")


class Check(BaseModel):
    status: str = Field(description="ok, off, down, failing, stalled, …")


class HealthReport(BaseModel):
    status: str = Field(description="healthy, or degraded (answered with 503)")
    version: str
    timestamp: str
    checks: dict[str, dict[str, Any]] = Field(description="database, mqtt, ingest, websocket, … each with `status`")


class HeatpumpHealth(HealthReport):
    influxdb_connected: bool
    database_connected: bool
    mqtt_connected: bool


class NodeTelemetryAccepted(BaseModel):
    status: str
    node_id: str
    device_id: str
    timestamp: str
    points: int


class Alert(BaseModel):
    id: int
    device_id: str
    type: str = Field(description="threshold, offline, … or what a device reported")
    rule: int | None = Field(description="the rule that raised it (server-side alerts)")
    severity: str
    level: str = Field(description="the severity again, under smart-heat-pump's name")
    message: str | None
    value: float | None
    status: str = Field(description="active, acknowledged or cleared")
    count: int = Field(description="times raised while open")
    payload: Value
    created_at: str | None
    updated_at: str | None
    acknowledged_at: str | None
    cleared_at: str | None


class AlertList(BaseModel):
    alerts: list[Alert]


class AlertCounts(BaseModel):
    status: dict[str, int] = Field(description="alerts per status")
    open_by_type: dict[str, int]
    open_by_severity: dict[str, int]


class Rule(BaseModel):
    id: int
    name: str
    kind: str
    key: str | None
    op: str | None
    value: float | None
    for_s: int
    clear_value: float | None
    severity: str
    devices: list[str] | None
    models: list[str] | None
    kinds: list[str] | None = Field(description="device kinds watched (device, gateway); null: any")
    enabled: bool
    source: str = Field(description="api, or file (TELEMETRA_RULES_FILE)")
    created_at: str
    updated_at: str


class RuleList(BaseModel):
    rules: list[Rule]


class RetentionDays(BaseModel):
    raw_days: int | None
    rollup_1m_days: int | None
    rollup_1h_days: int | None


class ModelRetention(RetentionDays):
    model: str


class RetentionPolicies(BaseModel):
    defaults: RetentionDays
    models: list[ModelRetention]


class TierUsage(BaseModel):
    rows: int
    bytes: int


class RetentionPass(BaseModel):
    deleted: dict[str, int] = Field(description="rows per tier")
    seconds: float


class StorageRetention(BaseModel):
    defaults: RetentionDays
    last_pass: RetentionPass | None


class StorageUsage(BaseModel):
    tiers: dict[str, TierUsage] = Field(description="raw, rollup_1m, rollup_1h")
    rows_estimated: bool
    total_bytes: int
    database_bytes: int
    top_devices: list[dict[str, Any]]
    points_per_day: float
    growth_bytes_per_day: float
    budget_bytes: int | None
    days_left: float | None
    warning: bool = Field(
        description="past the budget, over TELEMETRA_STORAGE_WARN_FRACTION of it, or days_left within"
        " TELEMETRA_STORAGE_WARN_DAYS (an open alert held until TELEMETRA_STORAGE_CLEAR_MARGIN below):"
        " what the storage_budget alert says"
    )
    budget_alert: str | None = Field(description="the storage_budget alert's severity now: warning, critical or null")
    retention: StorageRetention


class DeviceCounts(BaseModel):
    total: int
    online: int
    offline: int


class IngestFigures(BaseModel):
    queue_depth: int


class FleetStats(BaseModel):
    devices: DeviceCounts
    series: int = Field(description="stored series (device and key)")
    ingest: IngestFigures
    timestamp: str


class Webhook(BaseModel):
    id: int
    name: str
    url: str
    events: list[str] = Field(description="event names or patterns it receives")
    enabled: bool
    deliveries: dict[str, int] = Field(description="deliveries in the log per state: pending, delivered, failed")
    created_at: str
    updated_at: str


class WebhookCreated(Webhook):
    secret: str | None = Field(
        None, description="the signing secret: in the answer that sets it, never again (keep it now)"
    )


class WebhookList(BaseModel):
    webhooks: list[Webhook]


class WebhookTestQueued(BaseModel):
    delivery_id: int
    event: str


class WebhookDelivery(BaseModel):
    id: int = Field(description="also the X-Telemetra-Delivery header")
    event: str
    device_id: str | None
    status: str = Field(description="pending, delivered or failed")
    attempts: int
    response_status: int | None = Field(description="the receiver's HTTP status at the last attempt")
    error: str | None = Field(description="why the last attempt failed")
    duration_ms: int | None
    created_at: str
    last_attempt_at: str | None
    next_attempt_at: str | None = Field(description="when a pending delivery is tried next")
    delivered_at: str | None
    body: str = Field(description="the JSON body, exactly as signed and sent")


class WebhookDeliveries(BaseModel):
    webhook_id: int
    deliveries: list[WebhookDelivery]
    next_before: int | None = Field(description="pass as `before` for the next page; null on the last")
