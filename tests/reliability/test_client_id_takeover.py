"""No device can take over another device's MQTT session, or the collector's, on Mosquitto.

Mosquitto 2.0.11 lets an authenticated client connect with any client id, and a connection with an id in
use takes that session over: the holder is disconnected and, with clean start off, the newcomer inherits
its subscriptions and queued messages — another device's commands, or the telemetry queued for the
collector (then never stored). Telemetra binds each device's dynsec client to the client id equal to its
device id (TELEMETRA_MQTT_BIND_CLIENT_ID, on by default), gives the collector a random id kept in the data
directory, and lets a device receive nothing but its own downlink topics.

Every refusal is paired with a positive control: the thief's own credentials connect under its own id,
the victim stays connected and receives a command published afterwards, and the victim's numbered stream
is stored whole (acknowledged = stored, nothing lost or duplicated).
"""

from __future__ import annotations

import socket
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest

from tests.mqtt.conftest import Device, MqttApp, eventually, start_mqtt_app
from tests.support.mqtt_load import Tally, stored_seqs

pytestmark = [pytest.mark.mosquitto]

ATTEMPTS = [
    (protocol, persistent)
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5)
    for persistent in (True, False)  # clean start off (inherit the session) and on (just kick)
]


class Stream:
    """dev-b's numbered telemetry, each publish waiting for its PUBACK."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.acked: set[int] = set()
        self.next = 0

    async def send(self, count: int) -> None:
        for _ in range(count):
            seq = self.next
            self.next += 1
            payload = orjson.dumps({"ts": 1_700_000_000_000 + seq, "seq": seq})
            if not (await self.device.publish("telemetra/dev-b/telemetry", payload)).is_failure:
                self.acked.add(seq)


async def stored_once(app: MqttApp, stream: Stream) -> Tally:
    url = app.running.settings.database_url
    assert url is not None

    async def all_in() -> dict[str, list[int]] | None:
        stored = stored_seqs(url, ["dev-b"])
        return stored if len(stored["dev-b"]) >= len(stream.acked) else None

    stored = await eventually(all_in, what="dev-b's stream stored")
    return Tally.of({"dev-b": stream.acked}, stored)


async def test_no_device_can_take_over_another_devices_or_the_collectors_session(tmp_path: Path) -> None:
    async with start_mqtt_app("mosquitto", tmp_path, mqtt_client_id=None) as app:
        collector_id = app.services.mqtt_collector.client._client_id.decode()
        # Not derived from anything a device can know (it used to be telemetra-<host>-<port>).
        assert socket.gethostname() not in collector_id and str(app.running.settings.port) not in collector_id
        assert len(collector_id) >= len("telemetra-") + 24, collector_id

        secret_a = await app.create_device("dev-a")
        secret_b = await app.create_device("dev-b")
        service = await app.connect_service()
        victim = app.device("dev-b", secret_b, persistent=True)
        assert not (await victim.connect()).is_failure
        assert not (await victim.subscribe("telemetra/dev-b/cmd"))[0].is_failure
        stream = Stream(victim)
        await stream.send(100)

        for target in ("dev-b", collector_id):
            for protocol, persistent in ATTEMPTS:
                thief = app.device("dev-a", secret_a, client_id=target, protocol=protocol, persistent=persistent)
                rc = await thief.connect()
                assert rc.is_failure, f"dev-a connected as {target!r} ({protocol=}, {persistent=})"
                await stream.send(25)

        # dev-b was never disconnected, and its commands still reach it, and only it.
        await service.publish("telemetra/dev-b/cmd", b"for-b")
        assert (await victim.next_message()).payload == b"for-b"
        assert not victim.disconnected.is_set()
        # The collector kept its session: what dev-b sent meanwhile is all stored.
        assert app.services.mqtt_collector.connected
        await stream.send(100)
        tally = await stored_once(app, stream)

        # dev-b away with a command queued in its session: a thief with its id is refused and dev-b, back,
        # finds the command.
        await victim.close()
        await service.publish("telemetra/dev-b/cmd", b"queued-for-b")
        thief = app.device("dev-a", secret_a, client_id="dev-b", persistent=True)
        assert (await thief.connect()).is_failure
        back = app.device("dev-b", secret_b, persistent=True)
        assert not (await back.connect()).is_failure
        assert (await back.next_message()).payload == b"queued-for-b"

        # Control: the thief's credentials are good under its own id.
        await app.connect_device("dev-a", secret_a)

    print(f"dev-b's stream through {2 * len(ATTEMPTS)} takeover attempts: {tally.line()}")
    assert tally.acknowledged == stream.next
    assert tally.lost == 0 and tally.duplicated == 0


async def test_without_the_binding_a_taken_over_session_delivers_nothing(tmp_path: Path) -> None:
    """TELEMETRA_MQTT_BIND_CLIENT_ID=false (devices with other or broker-assigned ids): Mosquitto then lets
    dev-a take dev-b's session — dev-b is dropped — but the receive ACLs give dev-a none of dev-b's commands,
    neither those queued in the session nor those published while dev-a holds it."""
    async with start_mqtt_app("mosquitto", tmp_path, mqtt_bind_client_id=False) as app:
        secret_a = await app.create_device("dev-a")
        secret_b = await app.create_device("dev-b")
        service = await app.connect_service()
        victim = app.device("dev-b", secret_b, client_id="shared-id", persistent=True)
        assert not (await victim.connect()).is_failure
        assert not (await victim.subscribe("telemetra/dev-b/cmd"))[0].is_failure
        await victim.close()
        await service.publish("telemetra/dev-b/cmd", b"queued-for-b")

        thief = app.device("dev-a", secret_a, client_id="shared-id", persistent=True)
        assert not (await thief.connect()).is_failure  # the weaker mode: the takeover itself happens
        await service.publish("telemetra/dev-b/cmd", b"live-for-b")
        # Control on the same connection: dev-a's own command, published last, is the first thing to arrive
        # (the broker delivers in order: dev-b's queued and live commands would have come before it).
        assert not (await thief.subscribe("telemetra/dev-a/cmd"))[0].is_failure
        await service.publish("telemetra/dev-a/cmd", b"for-a")
        assert (await thief.next_message()).payload == b"for-a"
        assert thief.messages.empty()

        # dev-b, back under the id, receives commands again.
        back = app.device("dev-b", secret_b, client_id="shared-id", persistent=True)
        assert not (await back.connect()).is_failure
        await service.publish("telemetra/dev-b/cmd", b"after")
        assert (await back.next_message()).payload == b"after"
