"""A revocation made from the CLI — another process, writing the database directly — reaches Mosquitto
at once through the running server: the registry's change event drives the account mirror."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.conftest import make_settings, running_app
from tests.mqtt.conftest import eventually
from tests.mqtt.test_broker_accounts import connects
from tests.realtime.test_processes import cli_env, run_cli
from tests.support.mosquitto import start_mosquitto

pytestmark = pytest.mark.mosquitto


async def test_a_key_rotated_from_the_cli_stops_connecting_to_mosquitto_at_once(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "mosquitto")
    url = f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"
    try:
        settings = make_settings(
            url,
            tmp_path / "data",
            mqtt_url=f"mqtt://telemetra-svc:{secrets.token_urlsafe(18)}@{broker.host}:{broker.port}",
            mqtt_dynsec_username=broker.admin_username,
            mqtt_dynsec_password=broker.admin_password,
        )
        async with running_app(settings) as app:
            key = await app.create_device("cli-rot")
            assert await connects(broker, "cli-rot", key)  # positive control
            cwd = tmp_path / "cwd"
            cwd.mkdir()
            env = cli_env(url, tmp_path / "data", 1)  # port 1: no server there; the CLI writes the database
            await run_cli(env, cwd, "devices", "rotate", "cli-rot")

            async def refused() -> bool:
                return not await connects(broker, "cli-rot", key)

            await eventually(refused, within=2, what="the old key refused by Mosquitto")
    finally:
        broker.stop()
