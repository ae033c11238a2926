"""Rollouts over a real broker (the embedded one and Mosquitto with dynamic security): the device gets
``{"name":"ota","params":{…}}`` on its ``cmd`` topic, reports on ``event/ota``, and is completed by the
target ``fwVersion`` in its state; a report that cannot be taken is kept as a rejected message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ADMIN
from tests.mqtt.conftest import MqttApp, eventually, start_mqtt_app
from tests.ota.conftest import image, job, upload


@pytest.fixture(params=["embedded", "mosquitto"])
async def broker_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MqttApp]:
    async with start_mqtt_app(request.param, tmp_path, ota_step_s=0.05) as app:
        yield app


async def test_notify_report_and_complete_over_mqtt(broker_app: MqttApp) -> None:
    app = broker_app
    secrets = {d: await app.create_device(d, model="env") for d in ("env-1", "env-2")}
    fw = await upload(app.client, image(4096, 2), model="env", version="2.1.0")
    r = await app.client.post(
        "/api/v1/ota/updates",
        json={"firmware_id": fw["id"], "target_device_ids": ["env-1"], "rate_per_minute": 60_000},
        headers=ADMIN,
    )
    assert r.status_code == 200, r.text
    uid = r.json()["id"]

    device = await app.connect_device("env-1", secrets["env-1"])
    await device.subscribe("telemetra/env-1/cmd")
    await device.publish("telemetra/env-1/state", b'{"online":true,"fwVersion":"2.0.0"}', retain=True)
    message = await device.next_message()  # queued while offline, sent once it is online
    command = orjson.loads(message.payload)
    assert command["name"] == "ota"
    params = command["params"]
    assert (params["update_id"], params["version"], params["sha256"], params["md5"], params["size"]) == (
        uid, "2.1.0", fw["sha256"], fw["md5"], 4096,
    )  # fmt: skip
    assert params["url"].endswith(f"/api/v1/firmware/{fw['id']}/download")

    async def node_is(status: str, **fields: Any) -> bool:
        n = (await job(app.client, uid))["nodes"][0]
        return n["status"] == status and all(n[k] == v for k, v in fields.items())

    await device.publish(
        "telemetra/env-1/event/ota", orjson.dumps({"update_id": uid, "status": "downloading", "progress": 30})
    )
    await eventually(lambda: node_is("downloading", progress=30), what="downloading at 30 %")
    await device.publish("telemetra/env-1/event/ota", b'{"status":"installing"}')  # no update_id: its running one
    await eventually(lambda: node_is("installing"), what="installing")
    await device.publish("telemetra/env-1/state", b'{"online":true,"fwVersion":"2.1.0"}', retain=True)
    await eventually(lambda: node_is("completed", progress=100), what="completed by fwVersion")
    detail = await eventually(lambda: _job_status(app, uid, "completed"), what="the rollout to complete")
    assert detail["progress"]["completed"] == 1

    # Reports that cannot be taken are kept with their reason.
    await device.publish("telemetra/env-1/event/ota", orjson.dumps({"update_id": uid, "status": "exploded"}))
    other = await app.connect_device("env-2", secrets["env-2"])
    await other.publish("telemetra/env-2/event/ota", orjson.dumps({"update_id": uid, "status": "downloading"}))

    async def rejected() -> list[str]:
        r = await app.client.get("/api/v1/rejected", headers=ADMIN)
        reasons = [m["reason"] for m in r.json()["rejected"] if m["reason"].startswith("ota report refused")]
        return reasons if len(reasons) >= 2 else []

    reasons = await eventually(rejected, what="two refused OTA reports")
    assert any("(status)" in r for r in reasons) and any("not in update" in r and "(node_id)" in r for r in reasons)


async def _job_status(app: MqttApp, uid: int, status: str) -> dict[str, Any] | None:
    detail = await job(app.client, uid)
    return detail if detail["status"] == status else None
