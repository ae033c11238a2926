"""A Mosquitto outage is said once when it starts and once when it ends — not once per reconnect attempt."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.conftest import make_settings, running_app
from tests.mqtt.conftest import eventually
from tests.support.mosquitto import start_mosquitto

pytestmark = pytest.mark.mosquitto


async def test_a_broker_outage_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        settings = make_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}",
            tmp_path / "data",
            **broker.telemetra_settings(),
        )
        async with running_app(settings) as app:
            collector = app.services.mqtt_collector
            await eventually(lambda: _true(collector.connected), what="collector connected")
            caplog.clear()
            caplog.set_level(logging.DEBUG, logger="telemetra.mqtt.collector")
            await asyncio.to_thread(broker.stop)

            def attempts() -> int:
                return sum("attempt" in r.getMessage() for r in caplog.records if r.name == "telemetra.mqtt.collector")

            # Positive control: the collector really tried again and again while the broker was away.
            await eventually(lambda: _true(attempts() >= 3), within=15, what="several reconnect attempts")
            await asyncio.to_thread(broker.start)
            await eventually(lambda: _true(collector.connected), within=15, what="collector reconnected")
        collector_lines = [
            r for r in caplog.records if r.name == "telemetra.mqtt.collector" and r.levelno >= logging.INFO
        ]
        warnings = [r for r in collector_lines if r.levelno >= logging.WARNING]
        refused = [r for r in warnings if r.getMessage().startswith("MQTT broker ")]
        assert len(refused) == 1, [r.getMessage() for r in warnings]
        assert any("reachable again" in r.getMessage() for r in collector_lines)
    finally:
        broker.stop()


async def _true(value: bool) -> bool:
    return value
