"""smart-heat-pump's dashboard paths in its own shapes (CLIENTS.md §3.3, §3.4): bare arrays of devices,
readings and alerts, and flat objects whose fields are the firmware's nested values under flat names."""

from __future__ import annotations

import time
import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.api.answers import FleetStats
from telemetra.api.deps import Caller, ServicesDep, Viewer, check_reads
from telemetra.api.fields import DeviceIdPath, DeviceIdQuery
from telemetra.api.health import fleet_stats
from telemetra.api.openapi import answers
from telemetra.api.present import is_online
from telemetra.domain.errors import NotFound
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.storage.readings import ReadingQueries, number
from telemetra.storage.schema import AlertRow, Device

router = APIRouter(prefix="/api", tags=["smart-heat-pump compatibility"])

# The dashboard's flat names → the keys the firmware's nested payload is stored under.
FLAT_FIELDS = {
    "temp_inlet": "temperature.inlet",
    "temp_outlet": "temperature.outlet",
    "temp_ambient": "temperature.ambient",
    "temp_compressor": "temperature.compressor",
    "voltage": "electrical.voltage",
    "current": "electrical.current",
    "power": "electrical.power",
    "pressure_high": "pressure.high",
    "pressure_low": "pressure.low",
}
COMPRESSOR = "status.compressor"
KEYS = (*FLAT_FIELDS.values(), COMPRESSOR)
HOUR_MS = 3_600_000
STATUS_WINDOW_MS = 24 * HOUR_MS  # its server answers 404 for a device without data in 24 h
STATS_WINDOW_MS = 30 * 24 * HOUR_MS
STORED_POINTS_TTL_S = 10.0  # the dashboard asks every 2 s; counting is the dearest part of the answer
_points_cache: weakref.WeakKeyDictionary[AsyncEngine, tuple[float, int]] = weakref.WeakKeyDictionary()


# smart-heat-pump's shapes, for the OpenAPI document (each answer is built as a dict; see
# ``api.openapi.answers``).
class HeatpumpStats(FleetStats):
    devices_online: int
    total_readings: int = Field(description="stored points (one per metric value)")
    total_alerts: int = Field(description="alerts in the last 30 days")
    oldest_reading: str | None
    newest_reading: str | None


class HeatpumpDevice(BaseModel):
    device_id: str
    is_online: bool
    last_seen: str | None
    name: str | None
    location: str | None


class HeatpumpValues(BaseModel):
    temp_inlet: float | None
    temp_outlet: float | None
    temp_ambient: float | None
    temp_compressor: float | None
    voltage: float | None
    current: float | None
    power: float | None
    pressure_high: float | None
    pressure_low: float | None
    compressor_running: bool | None


class HeatpumpStatus(HeatpumpDevice, HeatpumpValues):
    time: str = Field(description="the newest value's time")


class HeatpumpReading(HeatpumpValues):
    time: str
    device_id: str


class HeatpumpAlert(BaseModel):
    time: str
    device_id: str
    alert_type: str
    alert_level: str
    value: float | None
    message: str | None
    id: int
    status: str
    count: int
    created_at: str


def _flat(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {name: number(values.get(key)) for name, key in FLAT_FIELDS.items()}
    running = values.get(COMPRESSOR)
    out["compressor_running"] = running if isinstance(running, bool) else None
    return out


async def _stored_points(engine: AsyncEngine) -> int:
    cached = _points_cache.get(engine)
    if cached is not None and time.monotonic() - cached[0] < STORED_POINTS_TTL_S:
        return cached[1]
    count = await ReadingQueries(engine).stored_points()
    _points_cache[engine] = (time.monotonic(), count)
    return count


@router.get("/stats", **answers(HeatpumpStats))
async def stats(services: ServicesDep, _: Viewer) -> dict[str, Any]:
    """``{devices_online, total_readings, total_alerts, …}`` beside Telemetra's own fleet figures.
    ``total_readings`` counts stored points (one per metric value)."""
    own = await fleet_stats(services)
    alerts = await ReadingQueries(services.engine).alert_count(since=now_ms() - STATS_WINDOW_MS)
    return {
        "devices_online": own["devices"]["online"],
        "total_readings": await _stored_points(services.engine),
        "total_alerts": alerts,
        "oldest_reading": None,
        "newest_reading": None,
        **own,
    }


def _device_out(device: Device, *, now: int, offline_after_s: int) -> dict[str, Any]:
    meta = device.meta or {}
    location = meta.get("location")
    return {
        "device_id": device.id,
        "is_online": is_online(device, now=now, offline_after_s=offline_after_s),
        "last_seen": ms_to_iso(device.last_seen_at) if device.last_seen_at is not None else None,
        "name": device.name,
        "location": location if isinstance(location, str) else None,
    }


@router.get("/devices", **answers(list[HeatpumpDevice]))
async def devices(
    services: ServicesDep, _: Viewer, limit: Annotated[int, Query(ge=1, le=10_000)] = 1000
) -> list[dict[str, Any]]:
    """Bare array of ``{device_id, is_online, last_seen, name, location}``, most recently heard from first."""
    now = now_ms()
    page = await services.devices.list(limit=limit, now_ms=now, recent_first=True)
    offline_after = services.settings.offline_after_s
    return [_device_out(d, now=now, offline_after_s=offline_after) for d in page.devices]


async def _status(services: Any, device_id: str) -> dict[str, Any]:
    device: Device | None = await services.devices.find(device_id)
    if device is None:
        raise NotFound(f"device {device_id!r} not found", field="device_id")
    now = now_ms()
    latest = (await ReadingQueries(services.engine).latest_many([device_id], KEYS)).get(device_id, [])
    if not latest or max(p.ts for p in latest) < now - STATUS_WINDOW_MS:
        raise NotFound(f"no data from device {device_id!r} in the last 24 hours", field="device_id")
    newest = max(p.ts for p in latest)
    return {
        **_device_out(device, now=now, offline_after_s=services.settings.offline_after_s),
        "time": ms_to_iso(newest),
        **_flat({p.key: p.value for p in latest}),
    }


@router.get("/devices/{device_id}/status", **answers(HeatpumpStatus))
async def status(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    """Flat ``{device_id, is_online, last_seen, temp_inlet, …, compressor_running}`` (latest values);
    404 without data in 24 h."""
    check_reads(principal, device_id)
    return await _status(services, device_id)


@router.get("/devices/{device_id}/readings/latest", **answers(HeatpumpStatus))
async def readings_latest(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    check_reads(principal, device_id)
    return await _status(services, device_id)


@router.get("/devices/{device_id}/readings", **answers(list[HeatpumpReading]))
async def readings(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    hours: Annotated[int, Query(ge=1, le=168)] = 24,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Bare array of flat readings ``{time, device_id, temp_inlet, …}``, newest first."""
    check_reads(principal, device_id)
    if await services.directory.get(device_id) is None:
        raise NotFound(f"device {device_id!r} not found", field="device_id")
    end = now_ms() + 1
    rows = await ReadingQueries(services.engine).readings(
        device_id, keys=KEYS, start=end - hours * HOUR_MS, end=end, limit=limit, newest_first=True
    )
    return [{"time": ms_to_iso(r.ts), "device_id": device_id, **_flat(r.values)} for r in rows]


def _alert_out(a: AlertRow) -> dict[str, Any]:
    return {
        "time": ms_to_iso(a.updated_at),
        "device_id": a.device_id,
        "alert_type": a.type,
        "alert_level": a.severity,
        "value": a.value,
        "message": a.message,
        "id": a.id,
        "status": a.status,
        "count": a.count,
        "created_at": ms_to_iso(a.created_at),
    }


@router.get("/alerts", **answers(list[HeatpumpAlert]))
async def alerts(
    services: ServicesDep,
    _: Viewer,
    device_id: DeviceIdQuery = None,
    hours: Annotated[int, Query(ge=1, le=24 * 365)] = 24,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Bare array of ``{time, device_id, alert_type, alert_level, value, message}``, newest first."""
    rows = await services.alerts.list(status=None, device_id=device_id, limit=limit, since=now_ms() - hours * HOUR_MS)
    return [_alert_out(a) for a in rows]
