"""Commands and desired configuration down to real devices, through a real broker (embedded amqtt and
Mosquitto with dynamic security), plus the HTTP poll for devices without MQTT."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from tests.conftest import ADMIN
from tests.mqtt.conftest import Device, MqttApp, eventually

pytestmark = pytest.mark.mosquitto


async def command(app: MqttApp, device_id: str, command_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await app.get(f"/api/v1/devices/{device_id}/commands/{command_id}")
    return body


async def status_is(app: MqttApp, device_id: str, command_id: str, status: str) -> dict[str, Any] | None:
    body = await command(app, device_id, command_id)
    return body if body["status"] == status else None


async def online_device(app: MqttApp, device_id: str) -> Device:
    """A device that is registered, connected, subscribed to its commands and reported online."""
    secret = await app.create_device(device_id)
    device = await app.connect_device(device_id, secret)
    codes = await device.subscribe(f"telemetra/{device_id}/cmd")
    assert not codes[0].is_failure, codes
    await device.publish(f"telemetra/{device_id}/state", orjson.dumps({"online": True}), retain=True)

    async def online() -> bool:
        return bool((await app.get(f"/api/v1/devices/{device_id}"))["online"])

    await eventually(online, what=f"{device_id} online")
    return device


async def test_command_round_trip_with_ack(mqtt_app: MqttApp) -> None:
    device = await online_device(mqtt_app, "dev-cmd")
    r = await mqtt_app.client.post(
        "/api/v1/devices/dev-cmd/commands", json={"name": "reboot", "params": {"delay_s": 3}}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] in ("queued", "sent")

    message = await device.next_message()
    assert message.topic == "telemetra/dev-cmd/cmd"
    payload = orjson.loads(message.payload)
    assert set(payload) == {"id", "name", "params", "ts"}
    assert (payload["id"], payload["name"], payload["params"]) == (created["id"], "reboot", {"delay_s": 3})
    assert isinstance(payload["ts"], int)
    sent = await eventually(lambda: status_is(mqtt_app, "dev-cmd", created["id"], "sent"), what="status sent")
    assert sent["sent_at"] and sent["acked_at"] is None

    ack = {"id": payload["id"], "status": "ok", "result": {"uptime": 0, "rebooted": True}}
    await device.publish("telemetra/dev-cmd/event/ack", orjson.dumps(ack))
    acked = await eventually(lambda: status_is(mqtt_app, "dev-cmd", created["id"], "acked"), what="status acked")
    assert acked["result"] == {"uptime": 0, "rebooted": True} and acked["acked_at"]


async def test_command_with_wait_returns_the_devices_answer(mqtt_app: MqttApp) -> None:
    device = await online_device(mqtt_app, "dev-wait")

    async def respond() -> str:
        message = await device.next_message()
        payload = orjson.loads(message.payload)
        await asyncio.sleep(0.3)  # the device takes a moment: the POST really has to wait
        ack = {"id": payload["id"], "status": "ok", "result": {"temperature": 21.5}}
        await device.publish("telemetra/dev-wait/event/ack", orjson.dumps(ack))
        command_id: str = payload["id"]
        return command_id

    responder = asyncio.create_task(respond())
    started = time.monotonic()
    r = await mqtt_app.client.post(
        "/api/v1/devices/dev-wait/commands", params={"wait": 5}, json={"name": "read"}, headers=ADMIN
    )
    elapsed = time.monotonic() - started
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"] == await asyncio.wait_for(responder, 5)
    assert body["status"] == "acked", body
    assert body["result"] == {"temperature": 21.5}
    assert 0.3 <= elapsed < 5, elapsed


async def test_offline_device_gets_queued_command_on_reconnect(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-off")
    r = await mqtt_app.client.post(
        "/api/v1/devices/dev-off/commands", json={"name": "set_led", "params": {"on": True}}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "queued" and created["sent_at"] is None
    await asyncio.sleep(0.5)
    assert (await command(mqtt_app, "dev-off", created["id"]))["status"] == "queued"

    device = await mqtt_app.connect_device("dev-off", secret)
    await device.subscribe("telemetra/dev-off/cmd")
    await device.assert_no_message(0.3)  # nothing is pushed before the device says it is online
    await device.publish("telemetra/dev-off/state", orjson.dumps({"online": True}), retain=True)
    message = await device.next_message()
    payload = orjson.loads(message.payload)
    assert (payload["id"], payload["name"], payload["params"]) == (created["id"], "set_led", {"on": True})
    await eventually(lambda: status_is(mqtt_app, "dev-off", created["id"], "sent"), what="status sent")

    await device.publish("telemetra/dev-off/event/ack", orjson.dumps({"id": created["id"], "status": "ok"}))
    await eventually(lambda: status_is(mqtt_app, "dev-off", created["id"], "acked"), what="status acked")
    await device.assert_no_message(0.3)  # delivered once


class SlowLink:
    """The collector's publisher with a round-trip of ``delay`` seconds, as to a broker across a WAN."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    @property
    def connected(self) -> bool:
        return bool(self.inner.connected)

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        await asyncio.sleep(self.delay)
        await self.inner.publish(topic, payload, qos=qos, retain=retain)


async def test_queued_commands_are_delivered_once_when_device_reports_online_repeatedly(mqtt_app: MqttApp) -> None:
    services = mqtt_app.services
    services.commands.publisher = SlowLink(services.commands.publisher, 0.15)
    secret = await mqtt_app.create_device("dev-burst")
    names = ["first", "second", "third"]
    for name in names:
        r = await mqtt_app.client.post("/api/v1/devices/dev-burst/commands", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
    device = await mqtt_app.connect_device("dev-burst", secret)
    await device.subscribe("telemetra/dev-burst/cmd")
    # A birth message, then a state heartbeat (rssi update) a moment later, both saying online.
    await device.publish("telemetra/dev-burst/state", orjson.dumps({"online": True, "rssi": -50}), retain=True)
    await asyncio.sleep(0.1)
    await device.publish("telemetra/dev-burst/state", orjson.dumps({"online": True, "rssi": -52}), retain=True)
    received: list[str] = []
    while True:
        try:
            message = await asyncio.wait_for(device.messages.get(), 1.5)
        except TimeoutError:
            break
        received.append(orjson.loads(message.payload)["name"])
    assert sorted(set(received)) == sorted(names)  # all were delivered (control)
    assert sorted(received) == sorted(names), f"published more than once: {received}"


async def test_device_cannot_read_another_devices_commands(mqtt_app: MqttApp) -> None:
    b = await online_device(mqtt_app, "dev-b")
    secret_a = await mqtt_app.create_device("dev-a")
    a = await mqtt_app.connect_device("dev-a", secret_a)
    for topic_filter in ("telemetra/dev-b/cmd", "telemetra/+/cmd", "telemetra/#", "#"):
        codes = await a.subscribe(topic_filter)
        assert codes[0].is_failure, f"{topic_filter}: {codes}"
    assert not (await a.subscribe("telemetra/dev-a/cmd"))[0].is_failure  # its own is fine

    r = await mqtt_app.client.post("/api/v1/devices/dev-b/commands", json={"name": "secret-op"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    message = await b.next_message()  # control: B does receive its command
    assert orjson.loads(message.payload)["id"] == r.json()["id"]
    await a.assert_no_message(0.5)


async def test_desired_config_published_retained_and_reported(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-cfg")
    r = await mqtt_app.client.put("/api/v1/devices/dev-cfg/config", json={"interval_s": 60, "led": "on"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["published"] is True
    assert view["desired"] == {"interval_s": 60, "led": "on"} and view["desired_version"] == 1
    assert view["in_sync"] is False and view["delta"] == {"interval_s": 60, "led": "on"}

    # Subscribing after the PUT: the document is retained at the broker.
    device = await mqtt_app.connect_device("dev-cfg", secret)
    assert not (await device.subscribe("telemetra/dev-cfg/config"))[0].is_failure
    message = await device.next_message()
    assert message.topic == "telemetra/dev-cfg/config" and message.retain
    document = orjson.loads(message.payload)
    assert document == {"interval_s": 60, "led": "on", "version": 1}

    await device.publish("telemetra/dev-cfg/state", orjson.dumps({"online": True, "config": document}), retain=True)

    async def in_sync() -> dict[str, Any] | None:
        body: dict[str, Any] = await mqtt_app.get("/api/v1/devices/dev-cfg/config")
        return body if body["in_sync"] else None

    synced = await eventually(in_sync, what="the reported config in sync")
    assert synced["reported"] == {"interval_s": 60, "led": "on"}
    assert synced["reported_version"] == 1 and synced["delta"] == {}


async def test_http_only_device_polls_and_acks_a_command(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-http")
    device_key = {"X-API-Key": secret}

    async def queue_later() -> str:
        await asyncio.sleep(0.4)
        r = await mqtt_app.client.post(
            "/api/v1/devices/dev-http/commands", json={"name": "blink", "params": {"n": 2}}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        command_id: str = r.json()["id"]
        return command_id

    started = time.monotonic()
    poll, command_id = await asyncio.gather(
        mqtt_app.client.get("/api/v1/device/commands", params={"wait": 2}, headers=device_key), queue_later()
    )
    elapsed = time.monotonic() - started
    assert poll.status_code == 200, poll.text
    commands = poll.json()["commands"]
    assert [(c["id"], c["name"], c["params"]) for c in commands] == [(command_id, "blink", {"n": 2})]
    assert 0.4 <= elapsed < 2, elapsed  # answered when the command arrived, not at the end of the wait
    assert (await command(mqtt_app, "dev-http", command_id))["status"] == "sent"

    r = await mqtt_app.client.post(
        f"/api/v1/device/commands/{command_id}/ack", json={"status": "ok", "result": {"blinked": 2}}, headers=device_key
    )
    assert r.status_code == 200, r.text
    acked = await command(mqtt_app, "dev-http", command_id)
    assert acked["status"] == "acked" and acked["result"] == {"blinked": 2}
    # Nothing left to poll.
    again = await mqtt_app.client.get("/api/v1/device/commands", headers=device_key)
    assert again.status_code == 200 and again.json()["commands"] == []


async def test_http_device_marked_online_by_its_telemetry_still_gets_commands_by_poll(mqtt_app: MqttApp) -> None:
    """HTTP telemetry marks a device online, so a new command goes out over MQTT at once; the device does not
    listen there, and its next poll must hand the command over rather than wait out the resend window."""
    secret = await mqtt_app.create_device("dev-http-online")
    device_key = {"X-API-Key": secret}
    r = await mqtt_app.client.post("/api/v1/ingest", json={"temperature": 21.5}, headers=device_key)
    assert r.status_code == 201, r.text
    r = await mqtt_app.client.post("/api/v1/devices/dev-http-online/commands", json={"name": "reboot"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    command_id = r.json()["id"]
    assert r.json()["status"] == "sent"  # published over MQTT (control: the case this test is about)
    poll = await mqtt_app.client.get("/api/v1/device/commands", headers=device_key)
    assert poll.status_code == 200, poll.text
    assert [c["id"] for c in poll.json()["commands"]] == [command_id]
    # Taken by the poll: a second poll right away does not hand it out again.
    again = await mqtt_app.client.get("/api/v1/device/commands", headers=device_key)
    assert again.json()["commands"] == []


class FailingLink(SlowLink):
    """The collector's publisher, failing the next ``failures`` publishes."""

    def __init__(self, inner: Any, failures: int) -> None:
        super().__init__(inner, 0.0)
        self.failures = failures

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker went away (test)")
        await super().publish(topic, payload, qos=qos, retain=retain)


async def test_a_failed_publish_puts_the_commands_back_in_order(mqtt_app: MqttApp) -> None:
    device = await online_device(mqtt_app, "dev-flaky")
    link = FailingLink(mqtt_app.services.commands.publisher, failures=1)
    mqtt_app.services.commands.publisher = link
    created = []
    for name in ("first", "second"):
        r = await mqtt_app.client.post("/api/v1/devices/dev-flaky/commands", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        created.append(r.json())
    assert created[0]["status"] == "queued"  # its publish failed: claimed, then released
    assert created[1]["status"] == "sent"  # the next dispatch published what was queued, in order
    names = [orjson.loads((await device.next_message()).payload)["name"] for _ in range(2)]
    assert names == ["first", "second"]
    assert (await command(mqtt_app, "dev-flaky", created[0]["id"]))["status"] == "sent"
