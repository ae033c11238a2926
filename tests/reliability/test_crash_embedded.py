"""SIGKILL of Telemetra under MQTT load on its embedded broker loses nothing it acknowledged.

The embedded broker lives in the Telemetra process, so a kill takes the broker down with it: whatever a
device was told was received (PUBACK) must already be committed, since nothing else holds it. Devices
are real paho clients with up to 20 messages in flight each; paho sends what was not acknowledged again
once it reconnects to the restarted process, and device timestamps make a redelivery land once. The kill
comes while the stream is in full flow, so an acknowledgement on receipt (amqtt's own behaviour) would
lose the messages in flight.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.mqtt.conftest import TelemetraProcess, create_device_over_http
from tests.reliability.fleet import Fleet, count, stored_by_device
from tests.reliability.support import database
from tests.support.mosquitto import free_port

DEVICES = 10
PER_DEVICE = 800


@pytest.mark.parametrize("db", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
async def test_sigkill_under_load_loses_nothing_acknowledged(db: str, tmp_path: Path) -> None:
    async with database(db, tmp_path) as url:
        await asyncio.to_thread(scenario, url, tmp_path)


def scenario(database_url: str, tmp_path: Path) -> None:
    mqtt_port = free_port()
    telemetra = TelemetraProcess(
        tmp_path / "telemetra",
        port=free_port(),
        env={"TELEMETRA_DATABASE_URL": database_url, "TELEMETRA_MQTT_PORT": str(mqtt_port)},
    )
    fleet: Fleet | None = None
    try:
        telemetra.start()
        telemetra.wait_healthy()
        credentials = [(f"kill-{i}", create_device_over_http(telemetra, f"kill-{i}")) for i in range(DEVICES)]
        fleet = Fleet("127.0.0.1", mqtt_port, credentials, per_device=PER_DEVICE)
        assert fleet.wait_acked(fleet.total // 3, timeout=60) >= fleet.total // 3, "the stream did not get going"
        telemetra.kill()
        acked_at_kill = fleet.acked_by_device()
        stored_at_kill = count(acked_at_kill, stored_by_device(database_url))
        telemetra.start()
        telemetra.wait_healthy()
        assert fleet.wait_acked(fleet.total, timeout=120) == fleet.total, f"only {fleet.acked} of {fleet.total}"
        final = count(fleet.acked_by_device(), stored_by_device(database_url))
        print(f"at the kill: {stored_at_kill}; at the end: {final}")
        # Everything acknowledged before the kill was already stored: nothing waited in memory for a commit.
        assert stored_at_kill.lost == 0, stored_at_kill
        assert 0 < stored_at_kill.acknowledged < fleet.total  # the kill really came mid-stream
        assert final.lost == 0 and final.duplicated == 0, final
        assert final.stored == final.acknowledged == fleet.total
    except BaseException:
        print(telemetra.output())
        raise
    finally:
        if fleet is not None:
            fleet.close()
        telemetra.kill()
