"""telemetry_app's clients against Telemetra (CLIENTS.md §2.1, §2.3): the ESP32 sample's ingest, which
counts only a 201, and the Flutter app under ``/compat/telemetry-app/api/v1`` — envelopes, its strict Dart
models (string ``id`` apart from ``device_id``, integer ``reading_count``, one zone designator per
timestamp), readings oldest first. The app sends no key: its network is trusted as a viewer here."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from telemetra.domain.timeutil import now_ms
from tests.api.shared_app import shared_app_fixture, unique
from tests.conftest import ADMIN, Running

shared = shared_app_fixture(trusted_networks=["127.0.0.1/32"], trusted_role="viewer")
pytestmark = pytest.mark.asyncio(loop_scope="module")

BASE = "/compat/telemetry-app/api/v1"
APP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}  # on every request, GETs too
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def dart_date(text: Any) -> datetime:
    """``DateTime.parse``: one zone designator (``…+00:00Z`` throws)."""
    assert isinstance(text, str) and ISO_Z.match(text), text
    return datetime.fromisoformat(text)


def every_timestamp(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in ([v] if _is_time_key(k, v) else every_timestamp(v))]
    if isinstance(obj, list):
        return [t for v in obj for t in every_timestamp(v)]
    return []


def _is_time_key(key: str, value: Any) -> bool:
    return isinstance(value, str) and (key.endswith(("_at", "timestamp", "_reading")) or key in ("start", "end"))


async def app_get(shared: Running, path: str) -> Any:
    """The app's ApiClient: any 2xx; an object answer is an envelope whose ``data`` is the payload."""
    r = await shared.client.get(f"{BASE}{path}", headers=APP_HEADERS)
    assert 200 <= r.status_code < 300, f"{path}: {r.status_code} {r.text}"
    body = r.json()
    assert isinstance(body, dict) and body["success"] is True, body
    for stamp in every_timestamp(body):
        dart_date(stamp)
    return body["data"]


def check_reading(reading: dict[str, Any], device_id: str) -> None:
    assert isinstance(reading["id"], str) and reading["device_id"] == device_id
    dart_date(reading["timestamp"])
    assert isinstance(reading["metrics"], dict)


async def esp32(shared: Running, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """docs/ESP32_PROTOCOL.md: flat body, X-API-Key, success is exactly 201."""
    r = await shared.client.post(
        "/api/v1/ingest", json=body, headers={"Content-Type": "application/json", "X-API-Key": key}
    )
    assert r.status_code == 201, r.text
    answer: dict[str, Any] = r.json()
    return answer


async def test_esp32_sample_gets_201_with_its_documented_body(shared: Running) -> None:
    device_id = unique("esp32")
    key = await shared.create_device(device_id)
    answer = await esp32(shared, key, {"device_id": device_id, "temperature": 31.4, "humidity": 62.1, "voltage": 3.91})
    assert answer["accepted"] is True and answer["device_id"] == device_id and isinstance(answer["id"], str)
    assert abs(dart_date(answer["timestamp"]).timestamp() * 1000 - now_ms()) < 60_000  # stamped on arrival
    assert answer["points"] == 3  # Telemetra's own fields beside them
    # With its optional ISO timestamp, that is the reading's time.
    answer = await esp32(
        shared, key, {"device_id": device_id, "temperature": 30.0, "timestamp": "2026-11-23T10:00:00Z"}
    )
    assert answer["timestamp"] == "2026-11-23T10:00:00.000Z"
    # The nested form its server wanted, and the promised batch: 201 too.
    assert (await esp32(shared, key, {"device_id": device_id, "metrics": {"temperature": 29.0}}))["accepted"]
    r = await shared.client.post(
        "/api/v1/ingest/batch", json=[{"temperature": 1.0}, {"humidity": 2.0}], headers={"X-API-Key": key}
    )
    assert r.status_code == 201 and r.json()["accepted"] is True and len(r.json()["ids"]) == 2
    # Refusals are 4xx, never a 201 saying success:false.
    r = await shared.client.post("/api/v1/ingest", json={"temperature": 1.0}, headers={"X-API-Key": "nope"})
    assert r.status_code == 401 and "success" not in r.json()
    r = await shared.client.post("/api/v1/ingest", json={"temperature": "x" * 5000}, headers={"X-API-Key": key})
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


async def test_landing_screen_health_and_system_health(shared: Running) -> None:
    data = await app_get(shared, "/health")
    assert data["status"] == "healthy" and isinstance(data, dict)
    assert data["database_connected"] is True and isinstance(data["websocket_healthy"], bool)
    assert isinstance(data["active_connections"], int) and isinstance(data["websocket_connections"], int)
    assert isinstance(data["cpu_usage"], float) and isinstance(data["memory_usage"], float)
    dart_date(data["checked_at"])


async def test_device_list_detail_stats_history_latest(shared: Running) -> None:
    device_id = unique("esp32")
    key = await shared.create_device(device_id, name="Greenhouse")
    empty = unique("empty")
    await shared.create_device(empty)
    base = now_ms() - 3_600_000
    for i in range(4):
        body = {"ts": base + i * 60_000, "temperature": 20.0 + i, "humidity": 50.0, "voltage": 3.9}
        await esp32(shared, key, body)

    summaries = await app_get(shared, "/devices")
    assert isinstance(summaries, list)
    by_id = {s["device_id"]: s for s in summaries}
    summary = by_id[device_id]
    assert isinstance(summary["id"], str) and summary["id"] != device_id
    assert summary["name"] == "Greenhouse" and summary["is_active"] is True
    assert summary["reading_count"] == 4 and isinstance(summary["reading_count"], int)
    dart_date(summary["created_at"])
    dart_date(summary["last_seen_at"])
    check_reading(summary["latest_reading"], device_id)
    assert summary["latest_reading"]["metrics"] == {"temperature": 23.0, "humidity": 50.0, "voltage": 3.9}
    assert by_id[empty]["latest_reading"] is None and by_id[empty]["reading_count"] == 0

    device = await app_get(shared, f"/devices/{device_id}")
    assert device["id"] == summary["id"] and device["device_id"] == device_id

    stats = await app_get(shared, f"/devices/{device_id}/stats?range=24h")
    assert stats["device_id"] == device_id and stats["reading_count"] == 4
    assert dart_date(stats["time_range"]["start"]) < dart_date(stats["time_range"]["end"])
    assert dart_date(stats["first_reading"]) < dart_date(stats["last_reading"])
    assert stats["temperature"] == {"min": 20.0, "max": 23.0, "avg": 21.5, "unit": "°C"}
    assert stats["humidity"]["unit"] == "%" and stats["voltage"]["unit"] == "V"
    empty_stats = await app_get(shared, f"/devices/{empty}/stats?range=24h")
    assert empty_stats["reading_count"] == 0 and empty_stats["temperature"] is None
    assert empty_stats["first_reading"] is None

    history = await app_get(shared, f"/devices/{device_id}/history?range=24h&limit=1000")
    assert [r["metrics"]["temperature"] for r in history] == [20.0, 21.0, 22.0, 23.0]  # oldest first
    for reading in history:
        check_reading(reading, device_id)
    newest_two = await app_get(shared, f"/devices/{device_id}/history?range=24h&limit=2")
    assert [r["metrics"]["temperature"] for r in newest_two] == [22.0, 23.0]

    latest = await app_get(shared, f"/devices/{device_id}/latest")
    check_reading(latest, device_id)
    assert latest["id"] == history[-1]["id"]
    assert await app_get(shared, f"/devices/{empty}/latest") is None


async def test_dashboard_stats_has_every_field_typed(shared: Running) -> None:
    data = await app_get(shared, "/dashboard/stats")
    for name in ("total_devices", "online_devices", "offline_devices", "total_readings_today"):
        assert isinstance(data[name], int), name
    for name in ("avg_temperature", "avg_humidity", "avg_voltage"):
        assert isinstance(data[name], int | float) and not isinstance(data[name], bool), name
    dart_date(data["last_updated"])


async def test_errors_carry_a_string_detail(shared: Running) -> None:
    """The app takes an error's message from ``error`` or else ``detail``, which must be a string."""
    r = await shared.client.get(f"{BASE}/devices/{unique('ghost')}", headers=APP_HEADERS)
    assert r.status_code == 404 and isinstance(r.json()["detail"], str)
    r = await shared.client.get(f"{BASE}/devices/x/history?range=forever", headers=APP_HEADERS)
    assert r.status_code in (403, 404, 422) and isinstance(r.json()["detail"], str)


async def test_provisioning_page_post_devices(shared: Running) -> None:
    """The legacy page posts ``{device_id, name}`` without a key and tolerates a failure; behind a proxy
    that adds an admin key it creates the device and shows its key once."""
    device_id = unique("prov")
    body = {"device_id": device_id, "name": device_id}
    r = await shared.client.post(f"{BASE}/devices", json=body, headers=APP_HEADERS)
    assert r.status_code == 403 and isinstance(r.json()["detail"], str)  # a viewer network does not issue keys
    r = await shared.client.post(f"{BASE}/devices", json=body, headers={**APP_HEADERS, **ADMIN})
    assert r.status_code == 201
    created = r.json()
    assert created["success"] is True and created["data"]["device_id"] == device_id
    key = created["data"]["api_key"]
    assert (await esp32(shared, key, {"temperature": 1.0}))["device_id"] == device_id  # the key works at once
    r = await shared.client.post(f"{BASE}/devices", json=body, headers={**APP_HEADERS, **ADMIN})
    assert r.status_code == 409
