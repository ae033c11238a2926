"""paku-iot's edge devices in a rollout made through paku's OTA API, over a real broker with the
``paku-iot`` preset (CLIENTS.md §4.4): the notification on ``paku/edge/{id}/cmd/ota`` carries paku's
``{url, version, checksum}``, and the device's ``ota/status``, ``ota/progress`` and ``ota/result`` move its
state in the rollout, read back through paku's ``/api/admin/update-status``."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ADMIN
from tests.mqtt.conftest import MqttApp, eventually, start_mqtt_app
from tests.ota.conftest import image


@pytest.fixture(params=[("embedded", "sqlite"), ("mosquitto", "postgres")], ids=["embedded-sqlite", "mosquitto-pg"])
async def broker_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MqttApp]:
    mode, db = request.param
    async with start_mqtt_app(mode, tmp_path, db=db, ota_step_s=0.05, mqtt_presets=["paku-iot"]) as app:
        yield app


async def test_paku_edge_device_reports_over_mqtt(broker_app: MqttApp) -> None:
    app = broker_app
    model, version, device_id = "esp32-heater", "1.5.0", "ESP32-0A1B2C3D"
    secret = await app.create_device(device_id, model=model)
    data = image(8192, 4)
    r = await app.client.post(
        "/api/admin/firmware/upload",
        params={"version": version, "device_model": model, "is_signed": "false"},
        files={"file": ("firmware.bin", data, "application/octet-stream")},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    r = await app.client.post(
        "/api/admin/rollout/create",
        json={"name": f"{model}-{version}-full", "firmware_version": version, "device_model": model},
        headers=ADMIN,
    )
    assert r.status_code == 200 and r.json()["devices"] == 1, r.text

    device = await app.connect_device(device_id, secret)
    await device.subscribe(f"paku/edge/{device_id}/cmd/ota")
    status = {"state": "online", "device_id": device_id, "firmware_version": "1.4.0", "device_model": model}
    await device.publish(f"paku/edge/{device_id}/status", orjson.dumps(status), retain=True)
    command = orjson.loads((await device.next_message()).payload)
    assert command["version"] == version and command["checksum"] == hashlib.sha256(data).hexdigest()
    got = await app.client.get(command["url"].removeprefix("http://testserver"))
    assert got.status_code == 200 and got.content == data

    async def update_is(word: str, **fields: Any) -> dict[str, Any] | None:
        r = await app.client.get(f"/api/admin/update-status?device_id={device_id}", headers=ADMIN)
        updates = r.json()["updates"]
        if updates and updates[0]["status"] == word and all(updates[0][k] == v for k, v in fields.items()):
            return dict(updates[0])
        return None

    topic = f"paku/edge/{device_id}/ota"
    await device.publish(f"{topic}/status", orjson.dumps({"target_version": version}))
    await eventually(lambda: update_is("downloading"), what="update started")
    await device.publish(f"{topic}/progress", orjson.dumps({"state": "downloading", "percent": 55}))
    await eventually(lambda: update_is("downloading", progress_percent=55), what="downloading at 55 %")
    await device.publish(f"{topic}/progress", orjson.dumps({"state": "verifying", "percent": 100}))
    await eventually(lambda: update_is("installing", progress_percent=100), what="verifying")
    await device.publish(f"{topic}/result", orjson.dumps({"success": True, "message": "ok"}))
    done = await eventually(lambda: update_is("success"), what="success")
    assert done["completed_at"] is not None and done["firmware_version"] == version

    # A result without its boolean is kept as a refused report, not dropped.
    await device.publish(f"{topic}/result", orjson.dumps({"message": "?"}))

    async def refused() -> list[str]:
        r = await app.client.get("/api/v1/rejected", headers=ADMIN)
        return [m["reason"] for m in r.json()["rejected"] if "(success)" in m["reason"]]

    await eventually(refused, what="the refused ota/result")
