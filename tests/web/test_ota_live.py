"""The OTA page follows a rollout live (issue 12): the devices' reports — one over the device HTTP API, one
over MQTT ``event/ota`` — reach the page as ``ota`` events on ``WS /api/v1/realtime?types=ota`` and move
its counts, per-device states and the rollout's own state, all on the page first loaded."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from playwright.sync_api import expect

from tests.conftest import ADMIN
from tests.web.conftest import Browsing, Server


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _publish(server: Server, device_id: str, secret: str, topic: str, payload: dict[str, Any]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
    client.username_pw_set(device_id, secret)
    client.connect("127.0.0.1", server.mqtt_port)
    client.loop_start()
    try:
        client.publish(topic, orjson.dumps(payload), qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_the_ota_page_follows_device_reports_over_the_stream_without_a_reload(
    browsing: Browsing, artifacts: Path
) -> None:
    server = browsing.server
    model = unique("live-model")
    devices = {unique(f"live{i}"): "" for i in range(2)}
    for device_id in devices:
        devices[device_id] = server.create_device(device_id, model=model)
    r = server.http.post(
        "/api/v1/firmware",
        data={"model": model, "version": "3.1.0"},
        files={"file": ("fw.bin", b"\x7fELF" * 1024, "application/octet-stream")},
        headers=ADMIN,
    )
    assert r.status_code in (200, 201), r.text

    page = browsing.signed_in()
    streamed: list[dict[str, Any]] = []

    def stream(ws: Any) -> None:
        upstream = ws.connect_to_server()

        def forward(message: str | bytes) -> None:
            ws.send(message)
            data = json.loads(message)
            if data.get("type") == "ota":
                streamed.append(data)

        upstream.on_message(forward)

    page.route_web_socket(re.compile(r".*/api/v1/realtime.*types=ota.*"), stream)
    page.get_by_role("link", name="OTA", exact=True).click()
    expect(page.locator("#live-status")).to_have_text("live")
    page.locator("#ro-firmware").select_option(label=f"{model} 3.1.0")
    page.get_by_label("Waves (cumulative %)").fill("100")
    page.get_by_role("button", name="Start rollout").click()
    started = page.get_by_role("status").filter(has_text="Rollout #")
    expect(started).to_contain_text("2 devices")
    found = re.search(r"Rollout #(\d+)", started.inner_text())
    assert found, started.inner_text()
    uid = int(found[1])  # the server is shared: earlier tests' rollouts are listed too
    rollout = page.locator(f'article[data-rollout="{uid}"]')
    rollout.locator("summary").click()
    expect(rollout.locator("details tbody tr")).to_have_count(2)
    counts = rollout.locator("[data-progress]")
    expect(counts.locator('[data-count="completed"]')).to_have_text("0 completed")

    first, second = devices
    # The first device, over the device HTTP API with its own key: downloading, 40 %.
    r = server.http.post(
        f"/api/v1/ota/updates/{uid}/node/{first}/progress",
        json={"status": "downloading", "progress": 40},
        headers={"X-API-Key": devices[first]},
    )
    assert r.status_code == 200, r.text
    row = rollout.locator(f'tr[data-node="{first}"]')
    expect(row.locator("[data-status]")).to_have_text("downloading")
    expect(row.locator("[data-node-progress]")).to_have_text("40 %")

    # The second, over MQTT event/ota: completed.
    _publish(
        server, second, devices[second], f"telemetra/{second}/event/ota", {"update_id": uid, "status": "completed"}
    )
    expect(counts.locator('[data-count="completed"]')).to_have_text("1 completed")
    expect(rollout.locator(f'tr[data-node="{second}"] [data-status]')).to_have_text("completed")
    page.screenshot(path=artifacts / "ota-live-light-desktop.png", full_page=True)  # a rollout half done

    # The first finishes too, and so does the rollout.
    r = server.http.post(
        f"/api/v1/ota/updates/{uid}/node/{first}/progress",
        json={"status": "completed"},
        headers={"X-API-Key": devices[first]},
    )
    assert r.status_code == 200, r.text
    expect(counts.locator('[data-count="completed"]')).to_have_text("2 completed")
    expect(rollout.locator("h3 + [data-status]")).to_have_text("completed")
    expect(rollout.get_by_role("button", name="Cancel")).to_have_count(0)

    # It was the stream that carried it (the page polls only while the stream is down), on one page load.
    streamed = [m for m in streamed if m["update_id"] == uid]  # the server is shared with other tests
    assert {"downloading", "completed"} <= {m["status"] for m in streamed if m["device_id"] == first}, streamed
    assert any(m["device_id"] is None and m["status"] == "completed" for m in streamed), streamed
    # A finished rollout deleted elsewhere leaves the page too.
    assert server.http.delete(f"/api/v1/ota/updates/{uid}", headers=ADMIN).status_code == 200
    expect(rollout).to_have_count(0)
    expect(page.locator("#live-status")).to_have_text("live")
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
