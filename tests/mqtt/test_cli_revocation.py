"""A revocation made from the CLI — another process — reaches Mosquitto at once through the running
server: the registry's change event drives the account mirror, whichever way the CLI made the change."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN, make_settings
from tests.mqtt.conftest import eventually
from tests.mqtt.test_broker_accounts import connects
from tests.realtime.test_processes import cli_env, run_cli
from tests.support.mosquitto import start_mosquitto
from tests.support.server import Served, served

pytestmark = pytest.mark.mosquitto


async def create(app: Served, device_id: str) -> str:
    async with httpx.AsyncClient(base_url=app.http) as client:
        r = await client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["credentials"]["api_key"]
    return key


async def test_a_key_rotated_from_the_cli_stops_connecting_to_mosquitto_at_once(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "mosquitto")
    url = f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"
    try:
        settings = make_settings(
            url,
            tmp_path / "data",
            **broker.telemetra_settings(),
        )
        async with served(settings) as app:
            key = await create(app, "cli-rot")
            assert await connects(broker, "cli-rot", key)  # positive control
            cwd = tmp_path / "cwd"
            cwd.mkdir()
            env = cli_env(url, tmp_path / "data", app.port)
            await run_cli(env, cwd, "devices", "rotate", "cli-rot")

            async def refused() -> bool:
                return not await connects(broker, "cli-rot", key)

            await eventually(refused, within=2, what="the old key refused by Mosquitto")
    finally:
        broker.stop()
