"""The dashboard in a real browser (issue 12): sign-in, fleet, live chart, commands acked by a simulated
device, alerts, OTA upload and rollout, the viewer's read-only view, screenshots of every page."""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from playwright.sync_api import expect

from tests.conftest import ADMIN
from tests.web.conftest import DESKTOP, OPERATOR_KEY, PHONE, VIEWER_KEY, Browsing, Server, eventually


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_sign_in_refuses_a_wrong_key_then_shows_a_device_created_through_the_api(browsing: Browsing) -> None:
    browsing.watch.allow(r"status of 401")  # the refused key's answer, which the page reports
    page = browsing.page()
    page.goto("/")
    page.get_by_label("API key").fill("not-a-key-anybody-issued")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("refused")
    assert page.evaluate("sessionStorage.length") == 0

    page = browsing.signed_in()
    assert page.evaluate("Object.keys(sessionStorage).sort()") == ["telemetra.apiKey", "telemetra.me"]
    expect(page.locator("#role")).to_have_text("admin")
    device_id = unique("fleet")
    browsing.server.create_device(device_id, model="env-v1", name="Boiler room")
    page.get_by_label("Search").fill(device_id)
    row = page.locator(f'tr[data-device="{device_id}"]')
    expect(row).to_contain_text("Boiler room")
    expect(row).to_contain_text("env-v1")
    expect(row).to_contain_text("never")  # not heard from yet
    row.get_by_role("link", name=device_id).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(device_id)


def test_the_chart_follows_an_ingest_without_a_reload(browsing: Browsing) -> None:
    server = browsing.server
    device_id = unique("chart")
    secret = server.create_device(device_id, model="env-v1")
    # Two hours of readings every 5 min, then four hours of silence: the chart breaks its line there.
    now_ms = int(time.time() * 1000)
    early = [{"ts": now_ms - 6 * 3600_000 + i * 300_000, "temperature": 18 + i % 3} for i in range(24)]
    r = server.http.post("/api/v1/ingest/batch", json=early, headers={"X-API-Key": secret})
    assert r.status_code in (200, 201, 202), r.text
    server.ingest(secret, {"temperature": 20.5, "humidity": 40})
    page = browsing.signed_in()
    page.goto(f"/#/devices/{device_id}")
    card = page.locator('.card[data-key="temperature"] [data-value]')
    expect(card).to_have_text("20.5")
    chart = page.locator("#chart")
    expect(chart.locator("canvas")).to_have_count(1)
    before = int(chart.get_attribute("data-points") or 0)
    assert before >= 25
    # 24 h on 1280 px: 2-min buckets from bucket edge to bucket edge, so the 1-min rollup answers them.
    assert (chart.get_attribute("data-interval"), chart.get_attribute("data-resolution")) == ("120", "1m")
    assert chart.get_attribute("data-gaps") == "1"  # the silence, and not between readings 5 min apart
    # Over the WebSocket (the page falls back to polling only while the stream is down).
    expect(page.locator("#live-status")).to_have_text("live")
    server.ingest(secret, {"temperature": 23.25})
    expect(card).to_have_text("23.25")  # the same page: no reload
    eventually(lambda: int(chart.get_attribute("data-points") or 0) > before, what="the chart to gain a point")
    assert chart.get_attribute("data-gaps") == "1"  # a reading seconds later continues the line
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1


def test_a_command_is_seen_queued_then_acked_by_a_simulated_device(browsing: Browsing) -> None:
    server = browsing.server
    device_id = unique("cmd")
    secret = server.create_device(device_id)
    page = browsing.signed_in()
    page.goto(f"/#/devices/{device_id}")
    page.get_by_label("Command", exact=True).fill("reboot")
    page.get_by_label("Parameters (JSON)").fill('{"delay_s": 1}')
    page.get_by_role("button", name="Send command").click()
    row = page.locator("#commands tr[data-command]").first
    expect(row.locator("[data-status]")).to_have_text("queued")
    # The device, over HTTP: poll its commands, then answer.
    device = {"X-API-Key": secret}
    polled = server.http.get("/api/v1/device/commands", headers=device).json()["commands"]
    assert [c["name"] for c in polled] == ["reboot"]
    r = server.http.post(
        f"/api/v1/device/commands/{polled[0]['id']}/ack",
        json={"status": "ok", "result": {"uptime_s": 3}},
        headers=device,
    )
    assert r.status_code == 200, r.text
    expect(row.locator("[data-status]")).to_have_text("acked")
    expect(row).to_contain_text("uptime_s")


def _raise_alert(server: Server, device_id: str, secret: str) -> None:
    """The device raises it the way devices do: MQTT ``event/alert`` to the embedded broker."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
    client.username_pw_set(device_id, secret)
    client.connect("127.0.0.1", server.mqtt_port)
    client.loop_start()
    try:
        payload = json.dumps({"type": "overheat", "severity": "critical", "message": "inlet 95 °C", "value": 95})
        client.publish(f"telemetra/{device_id}/event/alert", payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()

    def raised() -> Any:
        r = server.http.get("/api/v1/alerts", params={"device_id": device_id}, headers=ADMIN)
        return r.json()["alerts"]

    eventually(raised, what="the alert to be stored")


def test_a_rule_made_in_the_browser_raises_an_alert_acknowledged_then_cleared_then_the_rule_goes(
    browsing: Browsing,
) -> None:
    server = browsing.server
    device_id = unique("alert")
    secret = server.create_device(device_id)
    page = browsing.signed_in(OPERATOR_KEY)  # rules and alerts are an operator's
    page.get_by_role("link", name="Rules", exact=True).click()
    name = unique("too-hot")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Key", exact=True).fill("temperature")
    page.get_by_label("Operator").select_option(">")
    page.get_by_label("Value", exact=True).fill("30")
    page.get_by_label("Severity").select_option("critical")
    page.get_by_label("Applies to").select_option("devices")  # this device only: the server is shared
    page.get_by_label("Models or devices").fill(device_id)
    expect(page.get_by_label("Device kind")).to_be_hidden()  # devices names them: no kind besides
    page.get_by_role("button", name="Create rule").click()
    rule = page.locator("#rules tr", has_text=name)
    expect(rule).to_contain_text("temperature > 30")
    expect(rule).to_contain_text(f"devices: {device_id}")
    server.ingest(secret, {"temperature": 35.5})

    def raised() -> Any:
        r = server.http.get("/api/v1/alerts", params={"device_id": device_id}, headers=ADMIN)
        return r.json()["alerts"]

    eventually(raised, what="the rule's alert")
    page.get_by_role("link", name="Alerts", exact=True).click()
    row = page.locator("#alerts tr", has_text=device_id)
    expect(row).to_contain_text("threshold")
    row.get_by_role("button", name="Acknowledge").click()
    expect(row).to_have_count(0)  # gone from the active list
    page.get_by_label("Show").select_option("acknowledged")
    row = page.locator("#alerts tr", has_text=device_id)
    expect(row.locator("[data-status]")).to_have_text("acknowledged")
    row.get_by_role("button", name="Clear").click()
    page.get_by_label("Show").select_option("cleared")
    expect(page.locator("#alerts tr", has_text=device_id).locator("[data-status]")).to_have_text("cleared")

    page.get_by_role("link", name="Rules", exact=True).click()
    rule = page.locator("#rules tr", has_text=name)
    rule.get_by_role("button", name="Edit").click()
    expect(page.get_by_label("Models or devices")).to_have_value(device_id)
    page.get_by_label("Value", exact=True).fill("40")
    page.get_by_label("Clears at (optional)").fill("35")
    page.get_by_label("Applies to").select_option("models")
    page.get_by_label("Models or devices").fill("hub-v2")
    page.get_by_label("Device kind").select_option("gateway")
    page.get_by_role("button", name="Save rule").click()
    expect(rule).to_contain_text("temperature > 40; clears at 35")
    expect(rule).to_contain_text("models: hub-v2; kinds: gateway")
    rule.get_by_role("button", name="Disable").click()
    expect(rule.locator("[data-enabled]")).to_have_text("disabled")
    stored = server.http.get("/api/v1/rules", headers=ADMIN).json()["rules"]
    assert [(r["value"], r["clear_value"], r["enabled"], r["kinds"]) for r in stored if r["name"] == name] == [
        (40, 35, False, ["gateway"])
    ]
    page.once("dialog", lambda dialog: dialog.accept())
    rule.get_by_role("button", name="Delete").click()
    expect(rule).to_have_count(0)
    assert name not in server.http.get("/api/v1/rules", headers=ADMIN).text


def test_firmware_upload_and_a_rollout_paused_resumed_cancelled(browsing: Browsing) -> None:
    server = browsing.server
    model = unique("ota-model")
    for i in range(3):
        server.create_device(unique(f"ota{i}"), model=model)
    page = browsing.signed_in()
    page.get_by_role("link", name="OTA", exact=True).click()
    page.get_by_label("Image", exact=True).set_input_files(
        {"name": "fw.bin", "mimeType": "application/octet-stream", "buffer": b"\x7fELF" * 4096}
    )
    page.get_by_label("Model", exact=True).fill(model)
    page.get_by_label("Version").fill("2.0.0")
    page.get_by_role("button", name="Upload firmware").click()
    expect(page.get_by_role("status").filter(has_text="Uploaded")).to_contain_text("16,384 bytes")
    expect(page.locator("#fw-progress")).to_have_attribute("value", "1")
    expect(page.locator("#firmware")).to_contain_text(model)
    page.locator("#ro-firmware").select_option(label=f"{model} 2.0.0")
    expect(page.locator("#ro-model")).to_have_value(model)
    page.get_by_label("Waves (cumulative %)").fill("34, 100")
    page.get_by_label("Devices per minute").fill("1")  # slow enough to pause before it ends
    page.get_by_role("button", name="Start rollout").click()
    expect(page.get_by_role("status").filter(has_text="Rollout #")).to_contain_text("3 devices")
    rollout = page.locator("article[data-rollout]").first
    expect(rollout.locator("h3 + [data-status]")).to_have_text("distributing")
    rollout.get_by_role("button", name="Pause").click()
    expect(rollout.locator("h3 + [data-status]")).to_have_text("paused")
    rollout.get_by_role("button", name="Resume").click()
    expect(rollout.locator("h3 + [data-status]")).to_have_text("distributing")
    rollout.locator("summary").click()
    expect(rollout.locator("details tbody tr")).to_have_count(3)
    rollout.get_by_role("button", name="Cancel").click()
    expect(rollout.locator("h3 + [data-status]")).to_have_text("cancelled")
    expect(rollout.get_by_role("button", name="Cancel")).to_have_count(0)


def test_provisioning_shows_credentials_once_with_lines_to_paste(browsing: Browsing) -> None:
    page = browsing.signed_in()
    page.get_by_role("link", name="Provision", exact=True).click()
    device_id = unique("prov")
    page.get_by_label("Device id").fill(device_id)
    page.get_by_role("button", name="Create device").click()
    box = page.locator(f'[data-credentials="{device_id}"]')
    secret = box.locator("[data-secret]").inner_text()
    assert len(secret) >= 22
    expect(box).to_contain_text(f"curl -X POST {browsing.server.base_url}/api/v1/ingest -H 'X-API-Key: {secret}'")
    expect(box).to_contain_text(f"mosquitto_pub -h 127.0.0.1 -p 1883 -u '{device_id}' -P '{secret}'")
    # The secret works.
    browsing.server.ingest(secret, {"t": 1})
    page.get_by_label("How many").fill("3")
    page.get_by_role("button", name="Create claim codes").click()
    expect(page.locator("#provision-result tbody tr")).to_have_count(3)
    code = page.locator("#provision-result tbody tr td.mono").first.inner_text()
    r = browsing.server.http.post("/api/v1/provision/claim", json={"claim_code": code})
    assert r.status_code == 200, r.text


def test_the_test_console_posts_and_shows_what_arrived(browsing: Browsing) -> None:
    device_id = unique("console")
    browsing.server.create_device(device_id)
    page = browsing.page()
    page.goto("/test")  # redirects into the dashboard, which asks for a key first
    page.get_by_label("API key").fill(ADMIN["X-API-Key"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Test telemetry")
    page.get_by_label("Device id").fill(device_id)
    page.get_by_label("Message (JSON, any shape Telemetra accepts)").fill('{"pressure": 1013.5}')
    page.get_by_role("button", name="Send test message").click()
    expect(page.locator("#test-result")).to_contain_text("Accepted: 1 point")
    expect(page.locator("#arrived")).to_contain_text("pressure=1013.5")


WRITE_LABELS = re.compile(
    r"Send command|Acknowledge|Clear|Rotate credentials|Create device|Create claim codes|Upload firmware|"
    r"Start rollout|Pause|Resume|Cancel|Save desired configuration|Send test message|Create rule|Save rule|Edit|"
    r"Enable|Disable|Delete|Create webhook|Send test|Retry|Rotate secret|Save changes"
)


def _pages(server: Server) -> list[tuple[str, str]]:
    device_id = unique("pages")
    secret = server.create_device(device_id, model="env-v1", name="Screenshot device")
    now_ms = int(time.time() * 1000)
    history = [
        {"ts": now_ms - (200 - i) * 420_000, "temperature": 20 + 3 * math.sin(i / 15), "humidity": 40 + (i % 7)}
        for i in range(200)
        if not 120 <= i < 150  # three and a half hours of silence: a gap in the chart
    ]
    r = server.http.post("/api/v1/ingest/batch", json=history, headers={"X-API-Key": secret})
    assert r.status_code in (200, 201, 202), r.text
    server.ingest(secret, {"temperature": 21.5, "humidity": 41, "status": "ok"})
    server.http.post(f"/api/v1/devices/{device_id}/commands", json={"name": "reboot"}, headers=ADMIN)
    server.http.put(f"/api/v1/devices/{device_id}/config", json={"interval_s": 60}, headers=ADMIN)
    _raise_alert(server, device_id, secret)
    rule = {"name": unique("pages-hot"), "key": "temperature", "op": ">", "value": 30, "devices": [device_id]}
    assert server.http.post("/api/v1/rules", json=rule, headers=ADMIN).status_code == 201
    # Subscribed to nothing that happens by itself, and never tested here: a page with no deliveries.
    hook = {"name": unique("pages-hook"), "url": "http://127.0.0.1:9/hook", "events": ["webhook.test"]}
    assert server.http.post("/api/v1/webhooks", json=hook, headers=ADMIN).status_code == 201
    return [
        ("fleet", "/#/"),
        ("device", f"/#/devices/{device_id}"),
        ("alerts", "/#/alerts"),
        ("rules", "/#/rules"),
        ("webhooks", "/#/webhooks"),
        ("provision", "/#/provision"),
        ("ota", "/#/ota"),
        ("test", "/#/test"),
    ]


def test_a_viewer_sees_no_write_controls(browsing: Browsing) -> None:
    pages = _pages(browsing.server)
    admin = browsing.signed_in()
    viewer = browsing.signed_in(VIEWER_KEY)
    expect(viewer.locator("#role")).to_have_text("viewer")
    # No links to the admin-only pages for a viewer; the admin has them.
    expect(viewer.get_by_role("link", name="Provision", exact=True)).to_have_count(0)
    expect(viewer.get_by_role("link", name="OTA", exact=True)).to_have_count(0)
    expect(admin.get_by_role("link", name="OTA", exact=True)).to_have_count(1)
    for name, path in pages:
        for page in (admin, viewer):
            page.goto(path)
            page.locator(f'main[data-page="{name}"][data-ready]').wait_for()
        if name in ("device", "alerts", "rules", "webhooks", "provision", "ota"):
            assert admin.locator("[data-write]").count() > 0, name  # the positive control
        assert viewer.locator("[data-write]").count() == 0, name
        assert viewer.get_by_role("button", name=WRITE_LABELS).count() == 0, name


def test_screenshots_of_every_page_light_and_dark_desktop_and_phone(browsing: Browsing, artifacts: Path) -> None:
    pages = _pages(browsing.server)
    for scheme in ("light", "dark"):
        for size_name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            signin = browsing.page(viewport=viewport, color_scheme=scheme)
            signin.goto("/")
            signin.get_by_label("API key").wait_for()
            signin.screenshot(path=artifacts / f"signin-{scheme}-{size_name}.png", full_page=True)
            page = browsing.signed_in(viewport=viewport, color_scheme=scheme)
            for name, path in [*pages, ("docs", "/docs")]:
                page.goto(path)
                if name == "docs":
                    page.locator(".swagger-ui .info .title").wait_for()
                else:
                    page.locator(f'main[data-page="{name}"][data-ready]').wait_for()
                if name == "device":
                    page.locator("#chart canvas").wait_for()
                page.screenshot(path=artifacts / f"{name}-{scheme}-{size_name}.png", full_page=True)
    assert len(list(artifacts.glob("*.png"))) >= 4 * 9


def test_an_unreachable_server_is_said_plainly(browsing: Browsing) -> None:
    browsing.watch.allow(r"ERR_FAILED|Failed to fetch|ERR_CONNECTION")
    page = browsing.signed_in()
    page.route("**/api/v1/**", lambda route: route.abort())
    page.get_by_label("Search").fill("anything")
    expect(page.locator("#banner")).to_contain_text("Cannot reach the Telemetra server")
    page.unroute("**/api/v1/**")
    page.get_by_label("Search").fill("")
    expect(page.locator("#banner")).to_be_hidden()


def test_a_dropped_stream_resumes_from_the_last_event_it_saw(browsing: Browsing) -> None:
    server = browsing.server
    device_id = unique("resume")
    secret = server.create_device(device_id)
    server.ingest(secret, {"temperature": 19.0})
    page = browsing.signed_in()
    urls: list[str] = []
    seen: list[int] = []

    def stream(ws: Any) -> None:
        urls.append(ws.url)
        upstream = ws.connect_to_server()
        first = len(urls) == 1

        def forward(message: str | bytes) -> None:
            ws.send(message)
            data = json.loads(message)
            if data.get("type") == "telemetry":
                seen.append(data["id"])
                if first:
                    ws.close(code=1011, reason="dropped by the test")  # the network goes away

        upstream.on_message(forward)

    page.route_web_socket(re.compile(r".*/api/v1/realtime.*"), stream)
    page.goto(f"/#/devices/{device_id}")
    card = page.locator('.card[data-key="temperature"] [data-value]')
    expect(page.locator("#live-status")).to_have_text("live")
    server.ingest(secret, {"temperature": 20.0})  # arrives on the first stream, which is then dropped
    expect(card).to_have_text("20")
    # Route handlers run while Playwright is called: poll through it (a deadline, not a fixed sleep).
    deadline = time.monotonic() + 15
    while len(urls) < 2 and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert "since=" not in urls[0]
    assert f"since={seen[0]}" in urls[1], urls
    expect(page.locator("#live-status")).to_have_text("live")
    server.ingest(secret, {"temperature": 21.0})  # and the resumed stream carries the next one
    expect(card).to_have_text("21")


def test_the_chart_asks_for_about_one_bucket_per_pixel_never_raw_points(browsing: Browsing) -> None:
    page = browsing.signed_in()
    picked = page.evaluate(
        """async () => {
            const app = document.querySelector("script[type=module]").src;
            const { RANGES, pickInterval } = await import(new URL("chart.js", app).href);
            const widths = [320, 1280, 2560];
            return RANGES.flatMap(([name, , span]) => widths.map((w) => [name, w, span, pickInterval(span, w)]));
        }"""
    )
    for name, width, span, interval in picked:
        buckets = span / interval
        assert buckets <= max(2000, width), (name, width, interval)  # the server allows 10,000
        assert interval >= 1
        if span >= 86400:
            assert buckets >= min(width, 2000) / 2.5, (name, width, interval)  # not coarser than the screen
    assert dict(((n, w), i) for n, w, _, i in picked)[("1y", 1280)] == 43200  # 730 buckets of 12 h
