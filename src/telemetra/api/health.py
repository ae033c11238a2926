"""Health (all seeds' paths), Prometheus metrics and fleet statistics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select, text
from starlette.responses import JSONResponse, Response

from telemetra import __version__
from telemetra.api.answers import FleetStats, HealthReport, HeatpumpHealth
from telemetra.api.deps import ServicesDep, Viewer
from telemetra.api.openapi import answers
from telemetra.domain import presence
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.services import Services
from telemetra.storage.schema import Device, LatestRow

router = APIRouter(tags=["operations"])
UNHEALTHY = "a dependency is down: the same report, with `status: degraded`"


async def health_report(services: Services) -> dict[str, Any]:
    """Status of the database, each capability (ingest, MQTT, OTA, realtime) and any background task that
    died (shared by every health path). Anything not ok — down, failing, stalled, stopped — is 503."""
    checks: dict[str, Any] = {}
    try:
        async with services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        checks["database"] = {"status": "ok", "dialect": services.engine.dialect.name}
    except Exception as exc:  # a health check reports a failure, it does not raise it
        services.database.failed(exc)
        checks["database"] = {"status": "down", "error": type(exc).__name__, "where": services.database.location.where}
    for component in services.components:
        try:
            checks[component.name] = component.health()
        except Exception as exc:  # a probe that fails says so; it does not fail the whole report
            checks[component.name] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
    checks.setdefault("mqtt", {"status": "off"})
    checks.setdefault("websocket", {"status": "off", "detail": "realtime streaming is not running"})
    if services.failures:
        checks["tasks"] = {"status": "failed", "failed": services.failures.snapshot()}
    healthy = all(c.get("status") in ("ok", "off") for c in checks.values())
    # "healthy": the word iotmesh's test suite, paku's OTA tooling and telemetry_app's ESP32 document read.
    return {
        "status": "healthy" if healthy else "degraded",
        "version": __version__,
        "timestamp": ms_to_iso(now_ms()),
        "checks": checks,
    }


@router.get("/health", **answers(HealthReport, unhealthy=UNHEALTHY))
@router.get("/api/v1/health", **answers(HealthReport, unhealthy=UNHEALTHY))
async def health(services: ServicesDep) -> JSONResponse:
    """Status of the database, MQTT, the ingest queue and WebSockets; 503 when a dependency is down."""
    body = await health_report(services)
    return JSONResponse(body, status_code=200 if body["status"] == "healthy" else 503)


@router.get("/api/health", **answers(HeatpumpHealth, unhealthy=UNHEALTHY))
async def heatpump_health(services: ServicesDep) -> JSONResponse:
    """The same, with smart-heat-pump's flat fields beside it (``influxdb_connected`` is its name for the
    database)."""
    body = await health_report(services)
    database = body["checks"]["database"]["status"] == "ok"
    mqtt = body["checks"].get("mqtt", {}).get("status") == "ok"
    flat = {"influxdb_connected": database, "database_connected": database, "mqtt_connected": mqtt}
    return JSONResponse({**body, **flat}, status_code=200 if body["status"] == "healthy" else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/stats", **answers(FleetStats))
async def stats(services: ServicesDep, _: Viewer) -> dict[str, Any]:
    """Fleet figures for dashboards (smart-heat-pump's shape is at ``/api/stats``)."""
    return await fleet_stats(services)


async def fleet_stats(services: Services) -> dict[str, Any]:
    now = now_ms()
    fresh = presence.offline_cutoff(now, services.settings.offline_after_s)
    async with services.engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(Device))).scalar_one()
        online = (
            await conn.execute(
                select(func.count()).select_from(Device).where(Device.online.is_(True), Device.last_seen_at > fresh)
            )
        ).scalar_one()
        series = (await conn.execute(select(func.count()).select_from(LatestRow))).scalar_one()
    return {
        "devices": {"total": int(total), "online": int(online), "offline": int(total) - int(online)},
        "series": int(series),
        "ingest": {"queue_depth": services.queue.depth},
        "timestamp": ms_to_iso(now),
    }
