"""The seeds' MQTT clients against Telemetra, each through the embedded broker and Mosquitto (CLIENTS.md §3.1,
§3.2, §4.2–§4.5): smart-heat-pump's firmware (``millis()`` timestamps, its command topic, its Last Will) and
simulator, and paku-iot's heater and Ruuvi emulators and edge devices (preset ``paku-iot``). Devices change
only host, port and credentials: username = the device id, password = its Telemetra secret."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from telemetra.domain.timeutil import now_ms, parse_iso_ms
from tests.conftest import ADMIN
from tests.mqtt.conftest import MqttApp, eventually, start_mqtt_app

pytestmark = pytest.mark.mosquitto

HEATPUMP = {"mqtt_presets": ["default", "heatpump"]}
PAKU_IOT = {"mqtt_presets": ["paku-iot"], "rejected_per_minute": 5}  # an allowance of 10 at once


async def latest(app: MqttApp, device_id: str) -> dict[str, Any]:
    values: dict[str, Any] = (await app.get(f"/api/v1/devices/{device_id}/latest"))["values"]
    return values


async def state(app: MqttApp, device_id: str) -> dict[str, Any]:
    values: dict[str, Any] = (await app.get(f"/api/v1/devices/{device_id}/state"))["state"]
    return values


async def rejected(app: MqttApp, device_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await app.get("/api/v1/rejected", params={"device_id": device_id}))["rejected"]
    return rows


# -- smart-heat-pump ---------------------------------------------------------------------------------------


def firmware_reading(millis: int, inlet: float) -> dict[str, Any]:
    """firmware.ino's message: ``timestamp`` is millis() since boot, with ``version`` and ``valid``."""
    return {
        "device": "site1",
        "timestamp": millis,
        "version": "1.0.0",
        "temperature": {"inlet": inlet, "outlet": 50.2, "ambient": 25.0, "compressor": 70.3},
        "electrical": {"voltage": 230.1, "current": 8.42, "power": 1938},
        "pressure": {"high": 280, "low": 70},
        "status": {"compressor": True, "fan": False, "defrost": False},
        "alerts": {"voltage": 1, "compressor_temp": 0, "pressure_high": 0, "pressure_low": 0, "current": 0},
        "valid": {"temp_inlet": True, "temp_outlet": True, "voltage": True, "current": True, "pressure_low": False},
    }


@pytest.mark.parametrize("mqtt_db", ["sqlite", "postgres"])
@pytest.mark.parametrize("mqtt_overrides", [HEATPUMP], ids=["heatpump"])
async def test_heatpump_firmware(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("site1")
    firmware = mqtt_app.device("site1", secret, client_id="site1", will=("heatpump/site1/status/online", "false"))
    assert not (await firmware.connect()).is_failure
    await firmware.publish("heatpump/site1/status/online", b"true", qos=0, retain=True)
    assert not (await firmware.subscribe("heatpump/site1/commands", qos=0))[0].is_failure

    # 19.7 days since boot: as epoch seconds this would read 2023-11-14 (and refuse, or file it there).
    millis = 1_700_000_000
    before = now_ms()
    for i in range(2):  # PubSubClient publishes at QoS 0
        await firmware.publish("heatpump/site1/data", orjson.dumps(firmware_reading(millis + 2000 * i, 45 + i)), qos=0)

    async def both() -> dict[str, Any] | None:
        values = await latest(mqtt_app, "site1")
        return values if values.get("timestamp", {}).get("value") == millis + 2000 else None

    values = await eventually(both, what="the second reading")
    after = now_ms()
    inlet = (await mqtt_app.get("/api/v1/devices/site1/telemetry?keys=temperature.inlet&range=1h"))["series"]
    stamps = [parse_iso_ms(p["ts"]) for p in inlet["temperature.inlet"]]
    assert [p["value"] for p in inlet["temperature.inlet"]] == [45.0, 46.0]
    assert all(s is not None and before <= s <= after for s in stamps), (before, stamps, after)  # arrival time
    assert values["valid.pressure_low"]["value"] is False and values["status.compressor"]["value"] is True
    assert "version" not in values  # the firmware version is the device's, not a series
    device = await mqtt_app.get("/api/v1/devices/site1")
    assert device["fw_version"] == "1.0.0" and device["online"] is True
    # Its dashboard's flat status of what the firmware sent.
    status = await mqtt_app.get("/api/devices/site1/status")
    assert (status["temp_inlet"], status["current"], status["compressor_running"]) == (46.0, 8.42, True)

    # A command reaches it on its topic, as {"command": name, …} within the 127 bytes it parses.
    r = await mqtt_app.client.post(
        "/api/v1/devices/site1/commands", json={"name": "defrost", "params": {"minutes": 5}}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    message = await firmware.next_message()
    assert message.topic == "heatpump/site1/commands"
    assert len(message.payload) <= 127 and orjson.loads(message.payload[:127]) == {"command": "defrost", "minutes": 5}
    command_id = r.json()["id"]

    async def sent() -> bool:
        body = await mqtt_app.get(f"/api/v1/devices/site1/commands/{command_id}")
        return bool(body["status"] == "sent")

    await eventually(sent, what="the command marked sent")
    # Too big for what the firmware reads: not sent on its topic, never truncated (the default scheme, also
    # enabled here, carries it; with only the heatpump preset it is refused: tests/mqtt/test_routes.py).
    for name, params in (("note", {"text": "x" * 200}), ("ping", {})):
        r = await mqtt_app.client.post(
            "/api/v1/devices/site1/commands", json={"name": name, "params": params}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
    assert orjson.loads((await firmware.next_message()).payload) == {"command": "ping"}  # the next one it hears

    # Power lost: the broker publishes its Last Will, and Telemetra marks it offline.
    await firmware.drop()

    async def offline() -> bool:
        return (await mqtt_app.get("/api/v1/devices/site1"))["online"] is False

    await eventually(offline, what="the Last Will")
    assert (await state(mqtt_app, "site1"))["online"]["value"] == "false"
    listed = {d["device_id"]: d for d in await mqtt_app.get("/api/devices")}
    assert listed["site1"]["is_online"] is False


@pytest.mark.parametrize("mqtt_overrides", [HEATPUMP], ids=["heatpump"])
async def test_heatpump_simulator_epoch_ms_is_the_reading_time_and_idempotent(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("sim1")
    simulator = mqtt_app.device("sim1", secret)  # empty client id in the original: the broker assigns one
    assert not (await simulator.connect()).is_failure
    await simulator.publish("heatpump/sim1/status/online", b"true", qos=0, retain=True)
    ts = now_ms() - 5000
    reading = firmware_reading(ts, 44.0)
    del reading["version"], reading["valid"]
    reading["device"] = "sim1"
    for _ in range(2):  # a redelivery
        await simulator.publish("heatpump/sim1/data", orjson.dumps(reading), qos=0)
    await simulator.publish("heatpump/sim1/data", orjson.dumps({**reading, "timestamp": ts + 10_000}), qos=0)

    async def third() -> list[Any] | None:
        series = (await mqtt_app.get("/api/v1/devices/sim1/telemetry?keys=temperature.inlet&range=1h"))["series"]
        points = series.get("temperature.inlet", [])
        return points if len(points) >= 2 and parse_iso_ms(points[-1]["ts"]) == ts + 10_000 else None

    points = await eventually(third, what="the third reading")
    assert [parse_iso_ms(p["ts"]) for p in points] == [ts, ts + 10_000]  # the repeated one stored once


# -- paku-iot ----------------------------------------------------------------------------------------------


def utc_seconds() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("mqtt_overrides", [PAKU_IOT], ids=["paku-iot"])
async def test_paku_heater_emulator(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("emu01")
    heater = await mqtt_app.connect_device("emu01", secret)
    assert not (await heater.subscribe("paku/heater/emu01/cmd", qos=0))[0].is_failure
    heater_state = {
        "state": "Off",
        "coolant_temp_c": 21.3,
        "flow_lpm": 0.0,
        "battery_v": 12.6,
        "core_temp_c": 22,
        "safety_ok": True,
        "uart_online": True,
        "error": "None",
        "running": False,
    }
    stamp = utc_seconds()
    data = {
        "timestamp": stamp,
        "device_id": "heater_emu01",  # not the topic's id: information, not a claim
        "location": "van",
        "metrics": {
            "coolant_temp_c": 21.3,
            "flow_lpm": 0.0,
            "battery_v": 12.6,
            "core_temp_c": 22,
            "heater_state": "Off",
            "safety_ok": 1,
            "uart_online": 1,
            "error": "None",
        },
    }
    await heater.publish("paku/heater/emu01/state", orjson.dumps(heater_state), qos=0)
    await heater.publish("paku/heater/emu01/data", orjson.dumps(data), qos=0)

    async def stored() -> dict[str, Any] | None:
        values = await latest(mqtt_app, "emu01")
        return values if "heater_state" in values else None

    values = await eventually(stored, what="the heater's data")
    assert values["coolant_temp_c"]["value"] == 21.3 and values["heater_state"]["value"] == "Off"
    assert values["location"]["value"] == "van"
    assert parse_iso_ms(values["coolant_temp_c"]["ts"]) == parse_iso_ms(stamp)  # its own (wall-clock) time
    current = await eventually(lambda: state(mqtt_app, "emu01"), what="the heater's state")
    assert {k: current[k]["value"] for k in ("state", "coolant_temp_c", "safety_ok", "error")} == {
        "state": "Off",  # a heater that is off, not a device that is offline
        "coolant_temp_c": "21.3",
        "safety_ok": "true",
        "error": "None",
    }
    assert (await mqtt_app.get("/api/v1/devices/emu01"))["online"] is True
    assert await rejected(mqtt_app, "emu01") == []
    r = await mqtt_app.client.get("/api/v1/devices/heater_emu01", headers=ADMIN)
    assert r.status_code == 404

    # A command in the emulator's own shape, on its own topic.
    r = await mqtt_app.client.post(
        "/api/v1/devices/emu01/commands", json={"name": "start", "params": {"power": 5}}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    message = await heater.next_message()
    assert message.topic == "paku/heater/emu01/cmd"
    assert orjson.loads(message.payload) == {"cmd": "start", "power": 5}

    # A publish no route takes is not lost in the broker: it is kept, with its reason, and counted.
    before = await mqtt_app.metric("telemetra_rejected_messages_total", reason="no route")
    await heater.publish("paku/heater/emu01/diagnostics", b'{"uart_errors": 3}')

    async def kept() -> list[dict[str, Any]]:
        return await rejected(mqtt_app, "emu01")

    rows = await eventually(kept, what="the unrouted publish in the rejected store")
    assert [(r["topic"], r["payload"]) for r in rows] == [("paku/heater/emu01/diagnostics", '{"uart_errors": 3}')]
    assert rows[0]["reason"].startswith("no route")
    assert await mqtt_app.metric("telemetra_rejected_messages_total", reason="no route") == before + 1


@pytest.mark.parametrize("mqtt_overrides", [PAKU_IOT], ids=["paku-iot"])
async def test_paku_ruuvi_emulator_legacy_topic(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("van_inside")
    ruuvi = await mqtt_app.connect_device("van_inside", secret)
    stamp = utc_seconds()
    reading = {
        "sensor_id": "van_inside",
        "temperature_c": 18.4,
        "humidity_percent": 61.2,
        "pressure_hpa": 1009.3,
        "acceleration_x_mg": -12,
        "acceleration_y_mg": 4,
        "acceleration_z_mg": 1001,
        "acceleration_total_mg": 1001,
        "tx_power_dbm": 4,
        "movement_counter": 17,
        "measurement_sequence": 4242,
        "battery_mv": 2950,
        "mac": "D1:2B:3C:4D:5E:6F",
        "timestamp": stamp,
    }
    await ruuvi.publish("paku/ruuvi/van_inside", json.dumps(reading, indent=2), qos=0)  # pretty-printed

    async def stored() -> dict[str, Any] | None:
        values = await latest(mqtt_app, "van_inside")
        return values if "temperature_c" in values else None

    values = await eventually(stored, what="the Ruuvi reading")
    assert values["temperature_c"]["value"] == 18.4 and values["battery_mv"]["value"] == 2950.0
    assert values["mac"]["value"] == "D1:2B:3C:4D:5E:6F"
    assert parse_iso_ms(values["temperature_c"]["ts"]) == parse_iso_ms(stamp)


@pytest.mark.parametrize("mqtt_overrides", [PAKU_IOT], ids=["paku-iot"])
async def test_paku_edge_device_status_config_and_ota_reports(mqtt_app: MqttApp) -> None:
    device_id = "ESP32-AB12CD34"
    secret = await mqtt_app.create_device(device_id)
    edge = await mqtt_app.connect_device(device_id, secret)
    status = {
        "timestamp": utc_seconds(),
        "state": "online",
        "uptime_s": 3600,
        "wifi": {"rssi": -61, "ssid": "van"},
        "mqtt": {"reconnects": 0},
        "device_id": device_id,
        "firmware_version": "1.4.2",
        "device_model": "lilygo-t-display-s3",
    }
    await edge.publish(f"paku/edge/{device_id}/status", orjson.dumps(status), retain=True)
    report = {"timing": {"collection_interval_s": 30, "timezone": "EET-2EEST,M3.5.0/3,M10.5.0/4"}}
    await edge.publish(f"paku/edge/{device_id}/config/report", orjson.dumps(report))
    await edge.publish(f"paku/edge/{device_id}/ota/progress", orjson.dumps({"state": "installing", "percent": 40}))

    async def described() -> dict[str, Any] | None:
        device: dict[str, Any] = await mqtt_app.get(f"/api/v1/devices/{device_id}")
        return device if device["fw_version"] == "1.4.2" else None

    device = await eventually(described, what="the edge status")
    assert (device["rssi"], device["model"]) == (-61, "lilygo-t-display-s3")

    async def progress() -> list[Any] | None:
        events = (await mqtt_app.get(f"/api/v1/devices/{device_id}/events"))["events"]
        return events or None

    events = await eventually(progress, what="the OTA progress event")
    assert [(e["name"], e["payload"]) for e in events] == [("ota/progress", {"state": "installing", "percent": 40})]
    config = await mqtt_app.get(f"/api/v1/devices/{device_id}/config")
    assert config["reported"] == report

    # Desired configuration goes out retained on config/set, as paku's devices read it (no version key).
    desired = {"timing": {"collection_interval_s": 60}, "power": {"disconnect_after_transmit": True}}
    r = await mqtt_app.client.put(f"/api/v1/devices/{device_id}/config", json=desired, headers=ADMIN)
    assert r.status_code == 200 and r.json()["published"] is True
    later = await mqtt_app.connect_device(device_id, secret)  # subscribing after the fact: it is retained
    assert not (await later.subscribe(f"paku/edge/{device_id}/config/set"))[0].is_failure
    message = await later.next_message()
    assert message.retain and orjson.loads(message.payload) == desired


@pytest.mark.parametrize("mqtt_overrides", [PAKU_IOT], ids=["paku-iot"])
async def test_refusals_are_kept_within_each_devices_allowance(mqtt_app: MqttApp) -> None:
    secret = await mqtt_app.create_device("chatty")
    chatty = await mqtt_app.connect_device("chatty", secret)
    for i in range(40):
        await chatty.publish("paku/heater/chatty/debug", b'{"i":%d}' % i)

    async def all_counted() -> float | None:
        total = await mqtt_app.metric("telemetra_rejected_messages_total", reason="no route")
        return total if total >= 40 else None

    assert await eventually(all_counted, what="forty refusals counted") == 40  # every one is counted
    rows = await rejected(mqtt_app, "chatty")
    assert len(rows) == 10  # the first ten are kept (5 a minute, an allowance of two minutes' worth)
    assert await mqtt_app.metric("telemetra_rejected_unkept_total", transport="mqtt") == 30


async def test_embedded_broker_keeps_what_its_acl_refuses(tmp_path: Path) -> None:
    """With the embedded broker Telemetra sees a publish its ACL refuses and keeps it. (Mosquitto refuses
    such a publish itself and logs it as "Denied PUBLISH"; Telemetra never receives it.)"""
    async with start_mqtt_app("embedded", tmp_path, **PAKU_IOT) as app:
        secret = await app.create_device("emu02")
        await app.create_device("emu03")
        heater = await app.connect_device("emu02", secret)
        await heater.publish("paku/heater/emu03/state", b'{"state":"Running"}')  # another device's topic
        await heater.publish("paku/heater/emu02/cmd", b'{"cmd":"start"}')  # its own downlink: forging a command
        await heater.publish("paku/heater/emu02/state", b'{"state":"Off"}')  # a control that is taken

        await eventually(lambda: state(app, "emu02"), what="the control message")

        async def both() -> list[dict[str, Any]] | None:
            rows = await rejected(app, "emu02")
            return rows if len(rows) >= 2 else None

        rows = await eventually(both, what="two refused publishes")
        assert sorted(r["topic"] for r in rows) == ["paku/heater/emu02/cmd", "paku/heater/emu03/state"]
        assert all(r["reason"].startswith("acl refused") for r in rows)
        assert await state(app, "emu03") == {}
        assert await app.metric("telemetra_rejected_messages_total", reason="acl refused") == 2
