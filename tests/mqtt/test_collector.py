"""The MQTT data path end to end: a real broker (embedded amqtt, or Mosquitto with dynamic security),
real paho devices, the real app; what devices publish is checked through the HTTP API.

Denials are shown non-vacuously: the denied message is followed, on the same connection, by a
permitted control message; once the control message is stored, the denied one would have been too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import ADMIN
from tests.mqtt.conftest import MqttApp, eventually

pytestmark = pytest.mark.mosquitto


def iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


async def latest(app: MqttApp, device_id: str) -> dict[str, Any]:
    values: dict[str, Any] = (await app.get(f"/api/v1/devices/{device_id}/latest"))["values"]
    return values


async def device_view(app: MqttApp, device_id: str) -> dict[str, Any]:
    body: dict[str, Any] = await app.get(f"/api/v1/devices/{device_id}")
    return body


@pytest.mark.parametrize("mqtt_db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_device_telemetry_with_device_ts_is_queryable(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("sensor-1")
    device = await mqtt_app.connect_device("sensor-1", secret)
    t0 = int(time.time() * 1000) - 60_000  # a minute ago: the device's clock, not the server's
    await device.publish("telemetra/sensor-1/telemetry", orjson.dumps({"ts": t0, "temperature": 21.5, "humidity": 40}))
    await device.publish(
        "telemetra/sensor-1/telemetry", orjson.dumps({"ts": t0 + 1000, "values": {"temperature": 22.0}})
    )

    async def both_points() -> Any:
        body = await mqtt_app.get(
            "/api/v1/devices/sensor-1/telemetry", params={"keys": "temperature,humidity", "range": "1h"}
        )
        return body if len(body["series"].get("temperature", [])) == 2 else None

    body = await eventually(both_points, what="two temperature points")
    assert body["series"]["temperature"] == [
        {"ts": iso(t0), "value": 21.5},
        {"ts": iso(t0 + 1000), "value": 22.0},
    ]
    assert body["series"]["humidity"] == [{"ts": iso(t0), "value": 40}]
    values = await latest(mqtt_app, "sensor-1")
    assert values["temperature"] == {"ts": iso(t0 + 1000), "value": 22.0}

    # A redelivery of the same device-timestamped message is stored once.
    await device.publish("telemetra/sensor-1/telemetry", orjson.dumps({"ts": t0, "temperature": 21.5, "humidity": 40}))
    await device.publish("telemetra/sensor-1/telemetry", orjson.dumps({"ts": t0 + 2000, "marker": 1}))
    await eventually(lambda: _has_key(mqtt_app, "sensor-1", "marker"), what="the marker point")
    body = await mqtt_app.get("/api/v1/devices/sensor-1/telemetry", params={"keys": "temperature", "range": "1h"})
    assert len(body["series"]["temperature"]) == 2


async def _has_key(app: MqttApp, device_id: str, key: str) -> bool:
    return key in await latest(app, device_id)


async def test_device_cannot_publish_as_another_device(mqtt_app: MqttApp) -> None:
    secret_a = await mqtt_app.create_device("dev-a")
    await mqtt_app.create_device("dev-b")
    a = await mqtt_app.connect_device("dev-a", secret_a)
    now = int(time.time() * 1000)
    # Forged telemetry and state for B, then a control message of A's own.
    await a.publish("telemetra/dev-b/telemetry", orjson.dumps({"ts": now, "forged": 1}))
    await a.publish("telemetra/dev-b/state", orjson.dumps({"online": True, "rssi": -1}), retain=True)
    await a.publish("heatpump/dev-b/data", orjson.dumps({"temperature": {"inlet": 99}}))
    await a.publish("telemetra/dev-a/telemetry", orjson.dumps({"ts": now, "control": 1}))

    await eventually(lambda: _has_key(mqtt_app, "dev-a", "control"), what="A's own control message")
    assert await latest(mqtt_app, "dev-b") == {}
    b = await device_view(mqtt_app, "dev-b")
    assert b["online"] is False and b["rssi"] is None and b["last_seen_at"] is None
    if mqtt_app.mode == "mosquitto":
        # Over MQTT 5 Mosquitto also says so in the PUBACK (over 3.1.1 a refused publish is acked as usual).
        a5 = await mqtt_app.connect_device("dev-a", secret_a, protocol=mqtt.MQTTv5)
        assert (await a5.publish("telemetra/dev-b/telemetry", b'{"forged":2}')).is_failure
        assert not (await a5.publish("telemetra/dev-a/telemetry", b'{"control":2}')).is_failure
    # Nothing of B's reached the collector at all, not even as a rejected message.
    rejected = (await mqtt_app.get("/api/v1/rejected"))["rejected"]
    assert [r for r in rejected if r["device_id"] == "dev-b"] == []


async def test_wrong_password_is_refused(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-pw")
    wrong = mqtt_app.device("dev-pw", secret[:-2] + ("aa" if not secret.endswith("aa") else "bb"))
    assert (await wrong.connect()).is_failure
    unknown = mqtt_app.device("nobody", secret)
    assert (await unknown.connect()).is_failure
    other_user = await mqtt_app.create_device("dev-pw-2")
    swapped = mqtt_app.device("dev-pw", other_user)  # a real secret, but of another device
    assert (await swapped.connect()).is_failure
    # Control: the right pair is accepted.
    await mqtt_app.connect_device("dev-pw", secret)


async def test_rotation_takes_effect_at_the_broker(mqtt_app: MqttApp) -> None:
    old = await mqtt_app.create_device("dev-rot")
    before = await mqtt_app.connect_device("dev-rot", old)
    await before.close()

    r = await mqtt_app.client.post("/api/v1/devices/dev-rot/rotate", headers=ADMIN)
    assert r.status_code == 200, r.text
    creds = r.json()["credentials"]
    new = creds["api_key"]
    assert new != old and creds["mqtt"] == {"username": "dev-rot", "password": new}

    assert (await mqtt_app.device("dev-rot", old).connect()).is_failure
    after = await mqtt_app.connect_device("dev-rot", new)
    await after.publish("telemetra/dev-rot/telemetry", orjson.dumps({"ts": int(time.time() * 1000), "after": 1}))
    await eventually(lambda: _has_key(mqtt_app, "dev-rot", "after"), what="telemetry under the new secret")


@pytest.mark.parametrize("action", ["rotate", "disable", "delete"])
async def test_registry_change_closes_sessions_opened_with_old_credentials(mqtt_app: MqttApp, action: str) -> None:
    secret = await mqtt_app.create_device("dev-cut")
    service = None
    if mqtt_app.mode == "mosquitto":
        service = await mqtt_app.connect_service()
        await service.subscribe("telemetra/dev-cut/state")
    session = await mqtt_app.connect_device("dev-cut", secret, timeout=9.0, will=("telemetra/dev-cut/state", "offline"))
    if action == "rotate":
        r = await mqtt_app.client.post("/api/v1/devices/dev-cut/rotate", headers=ADMIN)
    elif action == "disable":
        r = await mqtt_app.client.patch("/api/v1/devices/dev-cut", json={"disabled": True}, headers=ADMIN)
    else:
        r = await mqtt_app.client.delete("/api/v1/devices/dev-cut", headers=ADMIN)
    assert r.status_code in (200, 204), r.text
    await session.wait_disconnected()  # a leaked key must stop working now, not at the next reconnect
    assert (await mqtt_app.device("dev-cut", secret).connect()).is_failure
    # Revoked, not lost: like Mosquitto's dynamic security, the broker does not publish the Last Will.
    if service is not None:
        await service.assert_no_message()
        return
    # Embedded: a will would have gone to ingest ahead of this marker (one FIFO path): once the marker is
    # stored, nothing from the will was (no offline state, and no rejected record for a deleted device).
    marker = await mqtt_app.create_device("dev-marker")
    probe = await mqtt_app.connect_device("dev-marker", marker)
    await probe.publish("telemetra/dev-marker/telemetry", orjson.dumps({"marker": 1}))
    await eventually(lambda: _has_key(mqtt_app, "dev-marker", "marker"), what="the marker after the revocation")
    rejected = (await mqtt_app.get("/api/v1/rejected"))["rejected"]
    assert [r for r in rejected if r["device_id"] == "dev-cut"] == []
    if action != "delete":
        state = await mqtt_app.get("/api/v1/devices/dev-cut/state")
        assert "online" not in str(state), state


@pytest.mark.parametrize("mqtt_app", ["embedded"], indirect=True)  # Mosquitto does not ask the registry
@pytest.mark.parametrize("stage", ["authenticating", "registering"])
async def test_rotation_while_connecting_shuts_the_old_secret_out(
    mqtt_app: MqttApp, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    secret = await mqtt_app.create_device("dev-race")
    paused, resume = asyncio.Event(), asyncio.Event()

    async def pause() -> None:
        paused.set()
        await resume.wait()

    if stage == "authenticating":
        directory = mqtt_app.services.directory
        by_secret = directory.by_secret

        async def slow_by_secret(key: str) -> Any:
            info = await by_secret(key)
            if key == secret:  # read before the rotation, answered after it
                await pause()
            return info

        monkeypatch.setattr(directory, "by_secret", slow_by_secret)
    else:
        broker = mqtt_app.services.mqtt_broker._broker
        disconnect_previous = broker._disconnect_previous

        async def slow_disconnect_previous(client_id: str) -> None:
            # Authenticated and accepted, but not yet among the sessions a revocation looks through.
            await disconnect_previous(client_id)
            if client_id == device.client_id:
                await pause()

        monkeypatch.setattr(broker, "_disconnect_previous", slow_disconnect_previous)
    device = mqtt_app.device("dev-race", secret)
    connecting = asyncio.create_task(device.connect())
    await asyncio.wait_for(paused.wait(), 5)
    r = await mqtt_app.client.post("/api/v1/devices/dev-race/rotate", headers=ADMIN)
    assert r.status_code == 200, r.text
    resume.set()
    rc = await connecting
    if stage == "authenticating":
        assert rc.is_failure
    else:
        assert not rc.is_failure  # the CONNACK was decided before the rotation
        await device.wait_disconnected()


async def test_last_will_marks_device_offline(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-will")
    device = await mqtt_app.connect_device("dev-will", secret, will=("telemetra/dev-will/state", "offline"))
    await device.publish("telemetra/dev-will/state", orjson.dumps({"online": True, "rssi": -61}), retain=True)

    async def online_is(value: bool) -> bool:
        return (await device_view(mqtt_app, "dev-will"))["online"] is value

    await eventually(lambda: online_is(True), what="the device online")
    await device.drop()
    await eventually(lambda: online_is(False), what="the Last Will to mark the device offline")
    if mqtt_app.mode == "embedded":
        return  # in process, a device's retained messages go to ingest; nobody else may subscribe to them
    # The will is retained at the broker: a late subscriber (the service) reads "offline".
    service = await mqtt_app.connect_service()
    await service.subscribe("telemetra/dev-will/state")
    message = await service.next_message()
    assert message.payload == b"offline" and message.retain


HEATPUMP = [{"mqtt_presets": ["default", "heatpump"]}]


@pytest.mark.parametrize("mqtt_overrides", HEATPUMP)
async def test_heatpump_preset_with_seed_payloads(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("hp-01")
    device = await mqtt_app.connect_device("hp-01", secret)
    ts = int(time.time() * 1000) - 5000
    data = {
        "device": "hp-01",
        "timestamp": ts,
        "temperature": {"inlet": 45.1, "outlet": 50.2, "ambient": 25.0, "compressor": 70.3},
        "electrical": {"voltage": 230.1, "current": 8.4, "power": 1932},
        "pressure": {"high": 280.0, "low": 70.1},
        "status": {"compressor": True, "fan": True, "defrost": False},
    }
    await device.publish("heatpump/hp-01/data", orjson.dumps(data))
    values = await eventually(
        lambda: _latest_if(mqtt_app, "hp-01", "pressure.low"), what="the heat pump's nested telemetry"
    )
    expected = {
        "temperature.inlet": 45.1,
        "temperature.outlet": 50.2,
        "temperature.ambient": 25.0,
        "temperature.compressor": 70.3,
        "electrical.voltage": 230.1,
        "electrical.current": 8.4,
        "electrical.power": 1932,
        "pressure.high": 280.0,
        "pressure.low": 70.1,
    }
    for key, value in expected.items():
        assert values[key] == {"ts": iso(ts), "value": value}, key
    assert values["status.compressor"]["value"] in (True, 1) and values["status.defrost"]["value"] in (False, 0)

    await device.publish("heatpump/hp-01/status/online", b"true", retain=True)
    await eventually(lambda: _online(mqtt_app, "hp-01"), what="heatpump/…/status/online true")

    alert = {"type": "high_temp", "level": "warning", "value": 82.5, "message": "Outlet temperature high"}
    await device.publish("heatpump/hp-01/alerts", orjson.dumps(alert))

    async def active_alert() -> Any:
        alerts = (await mqtt_app.get("/api/v1/alerts", params={"device_id": "hp-01"}))["alerts"]
        return alerts[0] if alerts else None

    found = await eventually(active_alert, what="the alert")
    assert (found["type"], found["level"], found["value"], found["message"], found["status"]) == (
        "high_temp",
        "warning",
        82.5,
        "Outlet temperature high",
        "active",
    )
    assert [a["id"] for a in (await mqtt_app.get("/api/v1/alerts", params={"status": "active"}))["alerts"]] == [
        found["id"]
    ]
    r = await mqtt_app.client.post(f"/api/v1/alerts/{found['id']}/acknowledge", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "acknowledged" and r.json()["acknowledged_at"]
    r = await mqtt_app.client.post(f"/api/v1/alerts/{found['id']}/clear", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "cleared" and r.json()["cleared_at"]
    r = await mqtt_app.client.post(f"/api/v1/alerts/{found['id']}/clear", headers=ADMIN)
    assert r.status_code == 409, r.text
    assert (await mqtt_app.get("/api/v1/alerts", params={"status": "active"}))["alerts"] == []


async def _latest_if(app: MqttApp, device_id: str, key: str) -> dict[str, Any] | None:
    values = await latest(app, device_id)
    return values if key in values else None


async def _online(app: MqttApp, device_id: str) -> bool:
    return bool((await device_view(app, device_id))["online"])


async def test_rejected_messages_are_recorded_and_collector_keeps_going(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("dev-rj")
    await mqtt_app.create_device("dev-other")
    device = await mqtt_app.connect_device("dev-rj", secret)
    rejected_before = await mqtt_app.metric("telemetra_rejected_messages_total")
    now = int(time.time() * 1000)

    await device.publish("telemetra/dev-rj/telemetry", b'{"temperature": 21.5,')  # malformed JSON
    ghost = orjson.dumps({"ts": now, "temperature": 1})
    if mqtt_app.mode == "mosquitto":  # only the service may publish for a device that does not exist
        await (await mqtt_app.connect_service()).publish("telemetra/ghost/telemetry", ghost)
    else:  # in process the broker's ACL refusal itself is kept: a device may not publish as another
        await device.publish("telemetra/ghost/telemetry", ghost)
    await device.publish(  # the body names another (registered) device: information, the topic's device wins
        "telemetra/dev-rj/telemetry", orjson.dumps({"device": "dev-other", "ts": now, "temperature": 2})
    )
    await device.publish("telemetra/dev-rj/telemetry", orjson.dumps({"ts": now, "good": 1}))

    await eventually(lambda: _has_key(mqtt_app, "dev-rj", "good"), what="the good message after the bad ones")

    async def two_rejected() -> list[dict[str, Any]] | None:
        rows: list[dict[str, Any]] = (await mqtt_app.get("/api/v1/rejected"))["rejected"]
        return rows if len(rows) >= 2 else None

    rows = await eventually(two_rejected, what="two rejected messages")
    by_topic = {(r["topic"], r["device_id"]): r for r in rows}
    assert len(rows) == 2, rows
    malformed = [r for r in rows if r["payload"] == '{"temperature": 21.5,']
    assert len(malformed) == 1 and malformed[0]["device_id"] == "dev-rj"
    assert "malformed" in malformed[0]["reason"].lower() and malformed[0]["source"] == "mqtt"
    if mqtt_app.mode == "mosquitto":
        assert "unknown device" in by_topic[("telemetra/ghost/telemetry", "ghost")]["reason"]
    else:
        refused = by_topic[("telemetra/ghost/telemetry", "dev-rj")]
        assert refused["reason"].startswith("acl") and refused["payload"] == ghost.decode()
    # Nothing of the rejected messages was stored anywhere; the one naming another device is dev-rj's.
    assert set(await latest(mqtt_app, "dev-rj")) == {"good", "temperature"}
    assert (await latest(mqtt_app, "dev-rj"))["temperature"]["value"] == 2.0
    assert await latest(mqtt_app, "dev-other") == {}
    assert await mqtt_app.metric("telemetra_rejected_messages_total") >= rejected_before + 2
    assert await mqtt_app.metric("telemetra_rejected_messages_total", transport="mqtt") >= 2


async def test_every_mqtt_message_is_counted_once_whatever_it_carries(mqtt_app: MqttApp) -> None:
    """The collector merges what one read brings into one batch; the messages metric must still count
    each message, telemetry or not (events, state)."""
    secret = await mqtt_app.create_device("counted-1")
    device = await mqtt_app.connect_device("counted-1", secret)
    before = await mqtt_app.metric("telemetra_ingested_messages_total", transport="mqtt")
    events = [device.publish(f"telemetra/counted-1/event/tick{i}", orjson.dumps({"n": i})) for i in range(5)]
    states = [device.publish("telemetra/counted-1/state", orjson.dumps({"rssi": -40 - i})) for i in range(3)]
    await asyncio.gather(*events, *states)
    await device.publish("telemetra/counted-1/telemetry", orjson.dumps({"marker": 1}))
    await eventually(lambda: _has_key(mqtt_app, "counted-1", "marker"), what="the marker point")

    async def counted() -> float | None:
        now = await mqtt_app.metric("telemetra_ingested_messages_total", transport="mqtt")
        return now - before if now - before >= 9 else None

    assert await eventually(counted, what="nine messages counted") == 9
