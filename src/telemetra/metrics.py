"""Prometheus metrics, one registry per app so several apps (tests, workers) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # process_* (memory, CPU, start time): per process, so `serve --workers N` shows each worker.
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.points = Counter("telemetra_ingested_points", "Points committed to storage", ["transport"], registry=r)
        self.messages = Counter(
            "telemetra_ingested_messages", "Messages committed to storage", ["transport"], registry=r
        )
        self.rejected = Counter(
            "telemetra_rejected_messages",
            "Messages refused, by transport and reason",
            ["transport", "reason"],
            registry=r,
        )
        self.unstorable = Counter(
            "telemetra_unstorable_messages",
            "Messages whose values the database refused (kept as rejected records, or answered 422)",
            ["transport"],
            registry=r,
        )
        self.rejected_unkept = Counter(
            "telemetra_rejected_unkept",
            "Refused messages counted but not kept: their device used up its allowance of rejected records",
            ["transport"],
            registry=r,
        )
        self.batches = Counter("telemetra_batches", "Group-commit batches written", registry=r)
        self.batch_failures = Counter("telemetra_batch_failures", "Batches whose commit failed", registry=r)
        self.batch_seconds = Histogram(
            "telemetra_batch_seconds",
            "Time to write and commit one batch",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.batch_points = Histogram(
            "telemetra_batch_points",
            "Points per committed batch",
            registry=r,
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 20000, 50000),
        )
        self.queue_depth = Gauge("telemetra_ingest_queue_points", "Points waiting in the ingest queue", registry=r)
        self.http_requests = Counter(
            "telemetra_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.http_seconds = Histogram(
            "telemetra_http_request_seconds",
            "HTTP request latency",
            ["route"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.mqtt_messages = Counter(
            "telemetra_mqtt_messages", "MQTT messages received by the collector", ["kind"], registry=r
        )
        # OTA (issue 8): created here, with the rest, so an app whose lifespan runs twice registers once.
        self.ota_steps = Counter("telemetra_ota_scheduler_steps", "OTA scheduler steps run", registry=r)
        self.ota_notifications = Counter(
            "telemetra_ota_notifications", "ota commands sent to devices by rollouts", registry=r
        )
        self.ota_reports = Counter(
            "telemetra_ota_reports", "Device OTA reports taken from ingest, by outcome", ["outcome"], registry=r
        )
        # Rules and presence (issue 10).
        self.rule_evaluations = Counter(
            "telemetra_rule_evaluations", "Readings evaluated against threshold rules", registry=r
        )
        self.rule_events_missed = Counter(
            "telemetra_rule_events_missed", "Committed events the rules engine fell too far behind to see", registry=r
        )
        self.alerts_changed = Counter(
            "telemetra_alerts", "Alerts raised and cleared server-side", ["type", "change"], registry=r
        )
        self.presence_sweeps = Counter("telemetra_presence_sweeps", "Presence sweeps run", registry=r)
        self.webhook_enqueued = Counter(
            "telemetra_webhook_enqueued", "Webhook deliveries enqueued (one per event and webhook)", registry=r
        )
        self.webhook_attempts = Counter(
            "telemetra_webhook_attempts",
            "Webhook delivery attempts, by outcome (delivered, retry, failed)",
            ["outcome"],
            registry=r,
        )
        self.webhook_seconds = Histogram(
            "telemetra_webhook_attempt_seconds",
            "Time of one webhook delivery attempt",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.webhook_pending = Gauge("telemetra_webhook_pending", "Webhook deliveries waiting to be sent", registry=r)
        self.webhook_events_missed = Counter(
            "telemetra_webhook_events_missed",
            "Committed events the webhook producer fell too far behind to see (never enqueued)",
            registry=r,
        )
        self.retention_deleted = Counter(
            "telemetra_retention_deleted_rows", "Rows retention deleted, by tier", ["tier"], registry=r
        )
        self.retention_runs = Counter("telemetra_retention_runs", "Retention passes finished", registry=r)
        self.retention_seconds = Gauge(
            "telemetra_retention_last_seconds", "How long the last retention pass took", registry=r
        )
        self.retention_pending = Gauge(
            "telemetra_retention_pending_rows",
            "Rows past retention the current pass has still to delete",
            ["tier"],
            registry=r,
        )
        self.storage_bytes = Gauge("telemetra_storage_bytes", "Bytes per storage tier", ["tier"], registry=r)
        self.storage_rows = Gauge("telemetra_storage_rows", "Rows per storage tier", ["tier"], registry=r)
        self.storage_days_left = Gauge(
            "telemetra_storage_days_left", "Days until the disk budget is reached at the last week's growth", registry=r
        )
        self.mqtt_connected = Gauge("telemetra_mqtt_connected", "1 while the collector is connected", registry=r)
        # Mosquitto dynamic security against the device registry (mqtt/broker_accounts.py).
        self.mqtt_account_drift = Counter(
            "telemetra_mqtt_account_drift",
            "Differences between the device registry and the broker's accounts found by a reconciliation",
            ["kind"],
            registry=r,
        )
        self.mqtt_account_repairs = Counter(
            "telemetra_mqtt_account_repairs", "Differences a reconciliation repaired", ["kind"], registry=r
        )
        self.mqtt_account_reconciliations = Counter(
            "telemetra_mqtt_account_reconciliations", "Full reconciliations run", ["outcome"], registry=r
        )
        self.mqtt_accounts_unrepaired = Gauge(
            "telemetra_mqtt_accounts_unrepaired",
            "Devices the last reconciliation could not bring in line (their credentials need a rotation)",
            registry=r,
        )
        self.mqtt_account_changes_pending = Gauge(
            "telemetra_mqtt_account_changes_pending",
            "Registry changes made while the broker was unreachable, not applied to it yet",
            registry=r,
        )
