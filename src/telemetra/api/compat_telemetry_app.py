"""telemetry_app's Flutter app (CLIENTS.md §2.1), mounted at ``/compat/telemetry-app/api/v1``: the app
reads every object answer under its base URL as an envelope ``{"success": true, "data": …}``, which
Telemetra's own ``/api/v1`` is not; its users point ``apiBaseUrl`` here. Its models are strict Dart casts:
``id`` a string distinct from ``device_id``, ``reading_count`` an integer, timestamps with one zone
designator. (Its two WebSocket paths belong to the realtime capability.)"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from telemetra.api.answers import HealthReport
from telemetra.api.deps import Admin, Caller, Services, ServicesDep, Viewer, check_reads
from telemetra.api.fields import DeviceIdPath, TextQuery
from telemetra.api.health import health_report
from telemetra.api.openapi import answers
from telemetra.api.params import time_range
from telemetra.api.present import is_online, reading_id
from telemetra.domain.errors import NotFound
from telemetra.domain.ids import DEVICE_ID_PATTERN
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.storage.queries import PointOut
from telemetra.storage.readings import MAX_READINGS, ReadingQueries
from telemetra.storage.schema import Device

router = APIRouter(prefix="/compat/telemetry-app/api/v1", tags=["telemetry_app compatibility"])

# The app's string ``id`` of a device: stable, distinct from ``device_id`` (its server used a UUID).
_DEVICE_NAMESPACE = uuid.UUID("6f1c2a4e-93b7-4d1e-9a57-0c3e5b8f7d21")
STAT_METRICS = {"temperature": "°C", "humidity": "%", "voltage": "V"}
DAY_MS = 86_400_000
MAX_LISTED = 1000


class DeviceCreate(BaseModel):
    model_config = ConfigDict(
        extra="ignore", json_schema_extra={"examples": [{"device_id": "esp32_01", "name": "Living room"}]}
    )
    device_id: str = Field(..., pattern=DEVICE_ID_PATTERN)
    name: str | None = Field(None, max_length=128)


# The app's shapes, for the OpenAPI document (each answer is built as a dict; see ``api.openapi.answers``).
class AppReading(BaseModel):
    id: str
    device_id: str
    timestamp: str
    metrics: dict[str, Any]


class AppDevice(BaseModel):
    id: str = Field(description="the app's stable id of the device (a UUID)")
    device_id: str
    name: str | None
    is_active: bool
    created_at: str
    last_seen_at: str | None
    online: bool
    model: str | None
    fw_version: str | None


class AppDeviceSummary(AppDevice):
    reading_count: int = Field(description="readings in the last 24 hours")
    latest_reading: AppReading | None


class AppDeviceCreated(AppDevice):
    api_key: str = Field(description="shown once")
    message: str


class AppTimeRange(BaseModel):
    start: str
    end: str


class AppDeviceStats(BaseModel):
    device_id: str
    time_range: AppTimeRange
    reading_count: int
    first_reading: str | None
    last_reading: str | None
    temperature: dict[str, Any] | None = Field(description="min, max, avg and unit; null when not sent")
    humidity: dict[str, Any] | None
    voltage: dict[str, Any] | None


class AppDashboardStats(BaseModel):
    total_devices: int
    online_devices: int
    offline_devices: int
    total_readings_today: int
    avg_temperature: float
    avg_humidity: float
    avg_voltage: float
    last_updated: str


class AppHealth(HealthReport):
    database_connected: bool
    websocket_healthy: bool
    websocket_connections: int
    active_connections: int
    cpu_usage: float
    memory_usage: float
    checked_at: str


T = TypeVar("T")


class Envelope(BaseModel, Generic[T]):
    success: bool
    data: T
    timestamp: str


def envelope(data: Any, status_code: int = 200) -> JSONResponse:
    return JSONResponse({"success": True, "data": data, "timestamp": ms_to_iso(now_ms())}, status_code=status_code)


def app_device_id(device_id: str) -> str:
    return str(uuid.uuid5(_DEVICE_NAMESPACE, device_id))


def reading_out(device_id: str, ts: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"id": reading_id(device_id, ts), "device_id": device_id, "timestamp": ms_to_iso(ts), "metrics": metrics}


def latest_reading(device_id: str, points: list[PointOut]) -> dict[str, Any] | None:
    """The device's latest values as one Reading, timed by the newest of them."""
    if not points:
        return None
    return reading_out(device_id, max(p.ts for p in points), {p.key: p.value for p in points})


def device_out(device: Device, *, now: int, offline_after_s: int) -> dict[str, Any]:
    return {
        "id": app_device_id(device.id),
        "device_id": device.id,
        "name": device.name,
        "is_active": not device.disabled,
        "created_at": ms_to_iso(device.created_at),
        "last_seen_at": ms_to_iso(device.last_seen_at) if device.last_seen_at is not None else None,
        "online": is_online(device, now=now, offline_after_s=offline_after_s),
        "model": device.model,
        "fw_version": device.fw_version,
    }


async def _device(services: Services, device_id: str) -> Device:
    device = await services.devices.find(device_id)
    if device is None:
        raise NotFound(f"Device not found: {device_id}", field="device_id")
    return device


def _system_load() -> tuple[float, float]:
    """(CPU, memory) in percent of the machine, from the load average and /proc/meminfo; 0 where unknown."""
    try:
        cpu = min(100.0, 100.0 * os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        cpu = 0.0
    memory = 0.0
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            fields = {line.split(":")[0]: int(line.split()[1]) for line in info if line.split()[1:]}
        if fields.get("MemTotal"):
            memory = 100.0 * (1 - fields.get("MemAvailable", 0) / fields["MemTotal"])
    except (OSError, ValueError):
        pass
    return round(cpu, 1), round(memory, 1)


@router.get("/health", **answers(Envelope[AppHealth], unhealthy="the database is down: the same report"))
async def health(services: ServicesDep) -> JSONResponse:
    """The app's health and SystemHealth shapes in one; 503 only when the database is down (MQTT being
    down does not stop the app from reading)."""
    report = await health_report(services)
    checks = report["checks"]
    database = checks["database"]["status"] == "ok"
    websocket = checks.get("websocket", {})
    connections = int(websocket.get("connections", 0) or 0)
    cpu, memory = _system_load()
    data = {
        **report,
        "database_connected": database,
        "websocket_healthy": websocket.get("status") == "ok",
        "websocket_connections": connections,
        "active_connections": connections,
        "cpu_usage": cpu,
        "memory_usage": memory,
        "checked_at": report["timestamp"],
    }
    return envelope(data, 200 if database else 503)


@router.get("/devices", **answers(Envelope[list[AppDeviceSummary]]))
async def list_devices(
    services: ServicesDep, _: Viewer, limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = MAX_LISTED
) -> JSONResponse:
    """Active devices as DeviceSummary: ``reading_count`` counts the last 24 hours' readings."""
    now = now_ms()
    page = await services.devices.list(limit=limit, now_ms=now, recent_first=True)
    active = [d for d in page.devices if not d.disabled]
    ids = [d.id for d in active]
    queries = ReadingQueries(services.engine)
    counts = await queries.reading_counts(ids, since=now - DAY_MS)
    latest = await queries.latest_many(ids)
    offline_after = services.settings.offline_after_s
    return envelope(
        [
            {
                **device_out(d, now=now, offline_after_s=offline_after),
                "reading_count": counts.get(d.id, 0),
                "latest_reading": latest_reading(d.id, latest.get(d.id, [])),
            }
            for d in active
        ]
    )


@router.post("/devices", status_code=201, **answers(Envelope[AppDeviceCreated], 201))
async def create_device(body: DeviceCreate, services: ServicesDep, _: Admin) -> JSONResponse:
    """Its legacy provisioning page: ``{device_id, name}`` → the device with its key, shown once."""
    now = now_ms()
    device, secret = await services.devices.create(body.device_id, now_ms=now, name=body.name)
    await services.registry_changed(device.id, "created", secret=secret)
    data = {
        **device_out(device, now=now, offline_after_s=services.settings.offline_after_s),
        "api_key": secret,
        "message": "Device created; keep the api_key, it is not shown again",
    }
    return envelope(data, 201)


@router.get("/devices/{device_id}", **answers(Envelope[AppDevice]))
async def get_device(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> JSONResponse:
    check_reads(principal, device_id)
    device = await _device(services, device_id)
    return envelope(device_out(device, now=now_ms(), offline_after_s=services.settings.offline_after_s))


@router.get("/devices/{device_id}/latest", **answers(Envelope[AppReading | None]))
async def latest(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> JSONResponse:
    """The latest Reading, or ``data: null`` when the device sent nothing yet."""
    check_reads(principal, device_id)
    await _device(services, device_id)
    points = (await ReadingQueries(services.engine).latest_many([device_id])).get(device_id, [])
    return envelope(latest_reading(device_id, points))


@router.get("/devices/{device_id}/history", **answers(Envelope[list[AppReading]]))
async def history(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    range_: Annotated[str | None, Query(alias="range")] = None,
    start: TextQuery = None,
    end: TextQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_READINGS)] = 1000,
) -> JSONResponse:
    """Readings oldest first (the app plots in array order): the newest ``limit`` of the range."""
    check_reads(principal, device_id)
    await _device(services, device_id)
    span = time_range(start, end, range_ if range_ or start else "24h")
    rows = await ReadingQueries(services.engine).readings(
        device_id, keys=None, start=span.start, end=span.end, limit=limit, newest_first=False
    )
    return envelope([reading_out(device_id, r.ts, r.values) for r in rows])


@router.get("/devices/{device_id}/stats", **answers(Envelope[AppDeviceStats]))
async def stats(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    range_: Annotated[str | None, Query(alias="range")] = "24h",
) -> JSONResponse:
    """DeviceStats: readings in the range, first and last, and min/max/avg of temperature, humidity and
    voltage with their units (null for a metric the device does not send)."""
    check_reads(principal, device_id)
    await _device(services, device_id)
    span = time_range(None, None, range_ or "24h")
    queries = ReadingQueries(services.engine)
    counted = await queries.span(device_id, start=span.start, end=span.end)
    buckets = await services.queries.aggregate(
        device_id,
        keys=list(STAT_METRICS),
        start=span.start,
        end=span.end,
        interval_ms=None,
        functions=["min", "max", "avg"],
    )
    found = {b.key: b.values for b in buckets}
    data: dict[str, Any] = {
        "device_id": device_id,
        "time_range": {"start": ms_to_iso(span.start), "end": ms_to_iso(span.end)},
        "reading_count": counted.readings,
        "first_reading": ms_to_iso(counted.first) if counted.first is not None else None,
        "last_reading": ms_to_iso(counted.last) if counted.last is not None else None,
    }
    for metric, unit in STAT_METRICS.items():
        values = found.get(metric)
        data[metric] = None if values is None else {**values, "unit": unit}
    return envelope(data)


@router.get("/dashboard/stats", **answers(Envelope[AppDashboardStats]))
async def dashboard_stats(services: ServicesDep, _: Viewer) -> JSONResponse:
    """Its (unrouted) dashboard page: every field present and typed as it casts them. Averages are over
    the devices' latest values; readings today counts from UTC midnight (for up to 1,000 devices)."""
    now = now_ms()
    page = await services.devices.list(limit=MAX_LISTED, now_ms=now)
    offline_after = services.settings.offline_after_s
    online = sum(1 for d in page.devices if is_online(d, now=now, offline_after_s=offline_after))
    midnight = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    ids = [d.id for d in page.devices]
    queries = ReadingQueries(services.engine)
    today = await queries.reading_counts(ids, since=midnight)
    latest = await queries.latest_many(ids, list(STAT_METRICS))
    averages: dict[str, float] = {}
    for metric in STAT_METRICS:
        values = [
            p.value
            for points in latest.values()
            for p in points
            if p.key == metric and isinstance(p.value, float | int) and not isinstance(p.value, bool)
        ]
        averages[metric] = round(sum(values) / len(values), 3) if values else 0.0
    return envelope(
        {
            "total_devices": page.total,
            "online_devices": online,
            "offline_devices": page.total - online,
            "total_readings_today": sum(today.values()),
            "avg_temperature": averages["temperature"],
            "avg_humidity": averages["humidity"],
            "avg_voltage": averages["voltage"],
            "last_updated": ms_to_iso(now),
        }
    )
