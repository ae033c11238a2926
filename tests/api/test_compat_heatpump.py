"""smart-heat-pump's web dashboard against Telemetra (CLIENTS.md §3.3, §3.4): the calls it makes, with no
key (the nginx that serves it adds a viewer key), and what it reads of the answers. The readings arrive as
its simulator's payload (epoch-ms ``timestamp``); the firmware over MQTT is tests/mqtt/test_compat_mqtt.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from telemetra.domain.records import AlertRaise, Batch
from telemetra.domain.timeutil import now_ms
from tests.api.shared_app import shared_app_fixture, unique
from tests.conftest import ADMIN, Running

VIEWER_KEY = "viewer-key-the-dashboards-nginx-adds-0123456789"
shared = shared_app_fixture(viewer_keys=[VIEWER_KEY])
pytestmark = pytest.mark.asyncio(loop_scope="module")
PROXY = {"X-API-Key": VIEWER_KEY}  # `proxy_set_header X-API-Key …;` in front of the dashboard
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FLAT = ("temp_inlet", "temp_outlet", "temp_ambient", "temp_compressor", "voltage", "current", "pressure_high")


def simulator_payload(device: str, ts: int, inlet: float, *, compressor: bool = True) -> dict[str, Any]:
    """server/scripts/simulate_device.py's message: nested, epoch-ms timestamp, no version/valid."""
    return {
        "device": device,
        "timestamp": ts,
        "temperature": {"inlet": inlet, "outlet": 50.2, "ambient": 25.0, "compressor": 70.3},
        "electrical": {"voltage": 230.1, "current": 8.4, "power": 1932.0},
        "pressure": {"high": 280.0, "low": 70.1},
        "status": {"compressor": compressor, "fan": False, "defrost": False},
        "alerts": {"voltage": 0, "compressor_temp": 0, "pressure_high": 0, "pressure_low": 0, "current": 0},
    }


async def device_with_readings(shared: Running, count: int = 3) -> tuple[str, int]:
    device_id = unique("site")
    key = await shared.create_device(device_id, name="Site 1", metadata={"location": "Plant room"})
    base = now_ms() - 60_000
    readings = [simulator_payload(device_id, base + i * 10_000, 45.0 + i) for i in range(count)]
    r = await shared.client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": key})
    assert r.status_code == 201, r.text
    return device_id, base


async def test_stats_polled_every_two_seconds(shared: Running) -> None:
    await device_with_readings(shared)
    r = await shared.client.get("/api/stats", headers=PROXY)
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body["devices_online"], int) and body["devices_online"] >= 1
    assert isinstance(body["total_readings"], int) and body["total_readings"] >= 30  # stored points
    assert isinstance(body["total_alerts"], int)


async def test_device_list_is_a_bare_array(shared: Running) -> None:
    device_id, _ = await device_with_readings(shared)
    silent = unique("silent")
    await shared.create_device(silent)
    r = await shared.client.get("/api/devices", headers=PROXY)
    assert r.status_code == 200
    devices = r.json()
    assert isinstance(devices, list)
    by_id = {d["device_id"]: d for d in devices}
    mine = by_id[device_id]
    assert mine["is_online"] is True and ISO_Z.match(mine["last_seen"])
    assert mine["name"] == "Site 1" and mine["location"] == "Plant room"
    assert by_id[silent]["is_online"] is False and by_id[silent]["last_seen"] is None


@pytest.mark.parametrize("path", ["status", "readings/latest"])
async def test_status_and_latest_are_flat(shared: Running, path: str) -> None:
    device_id, _ = await device_with_readings(shared)
    r = await shared.client.get(f"/api/devices/{device_id}/{path}", headers=PROXY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["device_id"] == device_id and body["is_online"] is True and ISO_Z.match(body["last_seen"])
    assert {k: body[k] for k in FLAT} == {
        "temp_inlet": 47.0,
        "temp_outlet": 50.2,
        "temp_ambient": 25.0,
        "temp_compressor": 70.3,
        "voltage": 230.1,
        "current": 8.4,
        "pressure_high": 280,
    }
    assert body["pressure_low"] == 70.1 and body["power"] == 1932 and body["compressor_running"] is True


async def test_status_of_a_device_without_recent_data_is_404(shared: Running) -> None:
    """The dashboard shows "Disconnected" on a non-2xx (its own server: 404 without data in 24 h)."""
    quiet = unique("quiet")
    key = await shared.create_device(quiet)
    for path in ("status", "readings/latest"):
        r = await shared.client.get(f"/api/devices/{quiet}/{path}", headers=PROXY)
        assert r.status_code == 404 and isinstance(r.json()["detail"], str)
    old = simulator_payload(quiet, now_ms() - 25 * 3_600_000, 40.0)
    assert (await shared.client.post("/api/v1/ingest", json=old, headers={"X-API-Key": key})).status_code == 201
    assert (await shared.client.get(f"/api/devices/{quiet}/status", headers=PROXY)).status_code == 404
    assert (await shared.client.get(f"/api/devices/{unique('ghost')}/status", headers=PROXY)).status_code == 404


async def test_readings_newest_first_with_hours_and_limit(shared: Running) -> None:
    device_id, _ = await device_with_readings(shared, count=5)
    r = await shared.client.get(f"/api/devices/{device_id}/readings?hours=1&limit=3", headers=PROXY)
    assert r.status_code == 200
    rows = r.json()
    assert isinstance(rows, list) and [row["temp_inlet"] for row in rows] == [49.0, 48.0, 47.0]
    assert all(row["device_id"] == device_id and ISO_Z.match(row["time"]) for row in rows)
    assert [row["time"] for row in rows] == sorted((row["time"] for row in rows), reverse=True)
    all_rows = (await shared.client.get(f"/api/devices/{device_id}/readings", headers=PROXY)).json()
    assert len(all_rows) == 5  # defaults: 24 h, 100 readings
    for query, field in (("hours=0", "hours"), ("hours=169", "hours"), ("limit=1001", "limit")):
        r = await shared.client.get(f"/api/devices/{device_id}/readings?{query}", headers=PROXY)
        assert r.status_code == 422 and r.json()["field"] == field


async def test_alerts_are_a_bare_array_of_its_fields(shared: Running) -> None:
    device_id, _ = await device_with_readings(shared)
    alert = AlertRaise(device_id, now_ms(), "high_temp", "warning", "Compressor hot", 82.5, {"type": "high_temp"})
    await shared.services.queue.submit(Batch(alerts=[alert]), transport="mqtt")
    r = await shared.client.get(f"/api/alerts?device_id={device_id}&hours=1&limit=10", headers=PROXY)
    assert r.status_code == 200
    rows = r.json()
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("device_id", "alert_type", "alert_level", "value", "message")} == {
        "device_id": device_id,
        "alert_type": "high_temp",
        "alert_level": "warning",
        "value": 82.5,
        "message": "Compressor hot",
    }
    assert ISO_Z.match(row["time"])
    r = await shared.client.get("/api/alerts", headers=PROXY)
    assert r.status_code == 200 and any(a["device_id"] == device_id for a in r.json())


async def test_health_behind_its_nginx(shared: Running) -> None:
    """nginx maps /health to /api/health: 200 with the flat fields beside Telemetra's checks."""
    r = await shared.client.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy" and ISO_Z.match(body["timestamp"])
    assert body["influxdb_connected"] is True and isinstance(body["mqtt_connected"], bool)


async def test_without_the_proxy_key_it_is_refused_not_empty(shared: Running) -> None:
    r = await shared.client.get("/api/devices")
    assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
    r = await shared.client.get("/api/devices", headers=ADMIN)  # an admin key works too
    assert r.status_code == 200 and isinstance(r.json(), list)
