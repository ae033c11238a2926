"""``create_app(settings)``: the app and the one lifespan that starts and stops everything it owns.

The lifespan builds the services (``telemetra.services``), brings the schema up to date, then enters each
capability — ingest core, MQTT, OTA, realtime — as an async context manager that owns its background
tasks (each under a ``Supervisor``); leaving the lifespan leaves them in the reverse order, so the writer
stops last and commits what the others handed it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.middleware.cors import CORSMiddleware

from telemetra import __version__, web
from telemetra.alerts.budget import BudgetAlerts
from telemetra.alerts.engine import RulesEngine
from telemetra.api import (
    alerts,
    commands,
    compat_heatpump,
    compat_iotmesh,
    compat_paku_ota,
    compat_telemetry_app,
    devices,
    firmware,
    health,
    ingest,
    me,
    ota,
    realtime,
    rules,
    storage,
    telemetry,
    webhooks,
)
from telemetra.api.deps import warn_open_access
from telemetra.api.errors import install_error_handlers
from telemetra.api.fastpath import FastPath
from telemetra.api.middleware import RequestMetrics
from telemetra.api.openapi import document_errors
from telemetra.api.security_headers import SecureHeaders
from telemetra.bootstrap import admin_keys as find_admin_keys
from telemetra.config import Settings
from telemetra.core import Core
from telemetra.endpoints import http_url
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent
from telemetra.ingest.normalize import Limits
from telemetra.ingest.queue import IngestQueue
from telemetra.ingest.service import IngestService
from telemetra.metrics import Metrics
from telemetra.mqtt.connection import parse_broker_url
from telemetra.mqtt.downlink import CommandService
from telemetra.mqtt.embedded import BrokerPortInUse
from telemetra.mqtt.shapes import DownlinkPlan
from telemetra.mqtt_runtime import MqttCapability, route_table
from telemetra.ota.capability import Ota
from telemetra.ota.signing import Signer
from telemetra.retention import Retention
from telemetra.services import Services
from telemetra.startup import (
    EXIT_MQTT_PORT,
    StartupError,
    find_startup_error,
    mqtt_port_in_use_message,
    wait_for_broker,
    wait_for_database,
)
from telemetra.storage.budget_alerts import BudgetAlertRepository
from telemetra.storage.commands import AlertRepository, CommandRepository
from telemetra.storage.database import create_engine, database_location, migrate
from telemetra.storage.devices import DeviceRepository
from telemetra.storage.directory import DeviceDirectory
from telemetra.storage.event_bridge import PgEventBridge, SqliteRegistryFollower
from telemetra.storage.faults import DatabaseState
from telemetra.storage.queries import TelemetryQueries
from telemetra.storage.retention import Days
from telemetra.storage.rules import RuleRepository
from telemetra.storage.webhooks import WebhookRepository
from telemetra.supervise import Failures
from telemetra.webhooks import Webhooks

log = logging.getLogger(__name__)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_keys=settings.max_keys_per_message,
        max_key_length=settings.max_key_length,
        max_depth=settings.max_depth,
        max_text_length=settings.max_text_length,
        max_batch_messages=settings.max_batch_messages,
        max_future_skew_ms=settings.max_future_skew_s * 1000,
        max_past_age_ms=settings.max_past_age_days * 86_400_000,
        max_document_text=settings.max_payload_bytes,
    )


def build_services(
    settings: Settings, metrics: Metrics, database: DatabaseState, admin_keys: list[str], failures: Failures
) -> Services:
    engine = create_engine(settings)
    hub = EventHub()
    bridge: PgEventBridge | SqliteRegistryFollower
    if engine.dialect.name == "postgresql":
        dsn = settings.effective_database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        bridge = PgEventBridge(dsn, engine, hub)
    else:
        bridge = SqliteRegistryFollower(engine, hub)
    directory = DeviceDirectory(engine, state=database)
    queue = IngestQueue(
        engine,
        metrics=metrics,
        state=database,
        max_points=settings.ingest_queue_max_points,
        batch_max_points=settings.ingest_batch_max_points,
        linger_ms=settings.ingest_batch_linger_ms,
        retry_after_s=settings.ingest_retry_after_s,
        # SQLite has one writer at a time; a second transaction would only wait for the lock.
        commits_in_flight=1 if engine.dialect.name == "sqlite" else settings.ingest_commits_in_flight,
        hub=hub,
        announcer=bridge if isinstance(bridge, PgEventBridge) else None,
        rollups=settings.rollups,
    )
    devices = DeviceRepository(engine)
    mqtt_on = bool(settings.mqtt_url) or settings.mqtt_port != 0
    # Each enabled preset's own command and config topics and shapes (mqtt.presets); none without MQTT.
    downlinks = route_table(settings).downlinks if mqtt_on else []

    async def online(device_id: str) -> bool:
        device = await devices.find(device_id)
        return bool(device and device.online)

    async def emit(events: Sequence[ChangeEvent]) -> None:
        """Changes committed outside the ingest queue: to this process's hub, and to the others."""
        hub.publish(events)
        bridge.send_later(events)

    commands = CommandService(
        CommandRepository(engine), plan=DownlinkPlan(downlinks), is_online=online, emit=emit, database=database
    )
    ota = ota_from(settings, engine, commands, metrics, hub, bridge.send_later, database)
    return Services(
        settings=settings,
        engine=engine,
        metrics=metrics,
        database=database,
        hub=hub,
        bridge=bridge,
        failures=failures,
        queue=queue,
        directory=directory,
        ingest=IngestService(directory, limits_from(settings), gateway_auto_register=settings.gateway_auto_register),
        devices=devices,
        queries=TelemetryQueries(engine, rollups=settings.rollups),
        admin_keys=admin_keys,
        commands=commands,
        alerts=AlertRepository(engine),
        ota=ota,
    )


def ota_from(
    settings: Settings,
    engine: AsyncEngine,
    commands: CommandService,
    metrics: Metrics,
    hub: EventHub,
    announce: Callable[[Sequence[ChangeEvent]], None],
    database: DatabaseState | None = None,
) -> Ota:
    """OTA (issue 8) from plain values; devices are notified through their command channel."""

    async def notify(device_id: str, params: dict[str, Any], ttl_s: int) -> str:
        return (await commands.create(device_id, "ota", params, ttl_s=ttl_s)).id

    return Ota(
        engine,
        firmware_dir=settings.firmware_dir,
        max_firmware_bytes=settings.ota_max_firmware_bytes,
        signer=load_signer(settings.ota_signing_key, settings.ota_signing_key_file),
        notify=notify,
        metrics=metrics,
        hub=hub,
        announce=announce,
        lease_s=settings.ota_gateway_lease_s,
        step_s=settings.ota_step_s,
        require_key=settings.ota_require_key,
        base_url=settings.ota_base_url,
        database=database,
    )


def rules_from(services: Services) -> RulesEngine:
    """The rules engine (issue 10), from plain values; entered as a capability, it owns its tasks."""
    settings = services.settings
    engine = RulesEngine(
        RuleRepository(services.engine),
        services.engine,
        hub=services.hub,
        emit=services.emit,
        metrics=services.metrics,
        failures=services.failures,
        offline_after_s=settings.offline_after_s,
        sweep_s=settings.presence_sweep_s,
        offline_alerts=settings.offline_alerts,
        rules_file=settings.rules_file,
        database=services.database,
    )
    services.rules = engine
    return engine


def retention_from(services: Services) -> Retention:
    """Retention (issue 10); ``/aggregate`` asks it how far back each tier still holds a device's data.
    Its passes also settle the ``storage_budget`` alert, announced as the rules engine announces alerts."""
    settings = services.settings
    rules = services.rules
    budget_alerts = (
        BudgetAlerts(BudgetAlertRepository(services.engine), announce=rules.announce) if rules is not None else None
    )
    services.budget_alerts = budget_alerts
    retention = Retention(
        services.engine,
        defaults=Days(settings.retention_raw_days, settings.retention_1m_days, settings.retention_1h_days),
        metrics=services.metrics,
        failures=services.failures,
        interval_s=settings.retention_interval_s,
        chunk=settings.retention_chunk_rows,
        budget_bytes=settings.storage_budget_bytes,
        warn_days=settings.storage_warn_days,
        warn_fraction=settings.storage_warn_fraction,
        clear_margin=settings.storage_clear_margin,
        on_budget=budget_alerts.check if budget_alerts is not None else None,
        database=services.database,
    )
    services.retention = retention
    services.queries.kept_since = retention.kept_since
    return retention


def webhooks_from(services: Services) -> Webhooks:
    """Webhooks (issue 10): committed events as signed POSTs, with retries and a delivery log."""
    settings = services.settings
    capability = Webhooks(
        WebhookRepository(services.engine),
        hub=services.hub,
        metrics=services.metrics,
        failures=services.failures,
        timeout_s=settings.webhook_timeout_s,
        max_attempts=settings.webhook_max_attempts,
        retry_base_s=settings.webhook_retry_base_s,
        retry_max_s=settings.webhook_retry_max_s,
        concurrency=settings.webhook_concurrency,
        log_days=settings.webhook_log_days,
        database=services.database,
    )
    services.webhooks = capability
    return capability


def load_signer(key: SecretStr | None, path: Path | None) -> Signer | None:
    if path is not None:
        return Signer.from_text(path.read_text())
    return Signer.from_text(key.get_secret_value()) if key is not None else None


@asynccontextmanager
async def _started(app: FastAPI, settings: Settings, metrics: Metrics, database: DatabaseState) -> AsyncIterator[None]:
    keys = find_admin_keys(settings)
    await wait_for_database(settings.effective_database_url, settings.startup_wait_s)
    if settings.mqtt_url:
        broker = parse_broker_url(settings.mqtt_url)
        await wait_for_broker(broker.host, broker.port, settings.startup_wait_s)
    services = build_services(settings, metrics, database, keys.keys, Failures())
    app.state.services = services
    warn_open_access(settings)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(services.engine.dispose)
        await migrate(services.engine)
        capabilities: list[Any] = [
            Core(services),
            MqttCapability(services),
            services.streams,
            rules_from(services),
            retention_from(services),
            webhooks_from(services),
        ]
        if services.ota is not None:  # after MQTT, so the first notifications can go out
            capabilities.append(services.ota)
        capabilities.extend(start(services) for start in app.state.capabilities)
        for capability in capabilities:
            try:
                await stack.enter_async_context(capability)
            except BrokerPortInUse as exc:
                raise StartupError(mqtt_port_in_use_message(exc.host, exc.port), EXIT_MQTT_PORT) from None
            services.components.append(capability)  # what /health asks
        if keys.keep():
            print(
                # Not the key itself: this output is the server's log (issue 6).
                f"\n  Generated an admin key (mode 0600, never printed): cat {keys.path}\n",
                flush=True,
            )
        base = http_url(settings)
        log.info(
            "telemetra %s ready on %s: dashboard %s/ and API docs %s%s",
            __version__,
            services.engine.dialect.name,
            base,
            base,
            web.DOCS,
            extra={"dashboard_url": f"{base}/", "docs_url": f"{base}{web.DOCS}"},
        )
        yield


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics()
    database = DatabaseState(database_location(settings.effective_database_url))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with _started(app, settings, metrics, database):
                yield
        except BaseException as exc:
            error = find_startup_error(exc)
            if error is None:
                raise
            app.state.startup_error = error  # what `telemetra serve` prints, alone, before exiting with its code
            raise error from None

    otel = settings.opentelemetry
    app = FastAPI(
        title="Telemetra",
        version=__version__,
        lifespan=lifespan,
        description="Self-hosted IoT telemetry backend: ingest, time series, commands, OTA.",
        # FastAPI's native OpenTelemetry asks the global providers on every request whether it is wanted
        # (~5 % of a single-reading post); it is off unless asked for. Prometheus metrics are always on.
        telemetry={"tracing": otel, "metrics": otel, "logs": otel},
        # Served by telemetra.web from the package: FastAPI's own pages load Swagger UI from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    # Capabilities added by the API modules that need one (realtime), built from the services at start.
    app.state.capabilities = []
    install_error_handlers(app, database)
    document_errors(app)
    # Then the seeds' own paths in the seeds' own shapes (CLIENTS.md).
    own = (ingest, devices, telemetry, commands, alerts, rules, webhooks, storage, health, firmware, ota, realtime, me)
    for module in (*own, compat_iotmesh, compat_heatpump, compat_telemetry_app, compat_paku_ota):
        app.include_router(module.router)
    web.install(app)
    # Added first, so it sits inside the metrics middleware.
    app.add_middleware(FastPath, owner=app, router=ingest.router, paths=ingest.FAST_PATHS)
    app.add_middleware(RequestMetrics, metrics=metrics)
    if settings.tls_cert:
        app.add_middleware(SecureHeaders)
    if settings.cors_origins:
        # Outermost: a browser's preflight is answered before anything else looks at the request. Keys
        # travel in headers, never cookies, so credentials stay off.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            max_age=600,
        )
    return app
