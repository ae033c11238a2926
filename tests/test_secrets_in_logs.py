"""No secret reaches the server's log (issue 6): ``telemetra serve`` runs as a real process at DEBUG level;
the test creates devices, rotates keys, creates and redeems claim codes, uses every key over HTTP and MQTT
(and presents wrong and revoked ones, which is where a refusal might echo what it was given), then reads
everything the process wrote — stdout and stderr — and looks for each secret it handed out or was given.

Two set-ups: the embedded broker on SQLite with the admin key generated on first start (kept in the data
directory, never printed), and Mosquitto with dynamic security on PostgreSQL, where every device password
also travels to the broker's control topic and the service and dynsec passwords are configured.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import postgres_database
from tests.mqtt.conftest import TelemetraProcess
from tests.support.mosquitto import PahoTestClient, free_port, start_mosquitto


@asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    if kind == "postgres":
        async with postgres_database() as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"


async def mqtt_connects(host: str, port: int, username: str, password: str) -> bool:
    client = PahoTestClient(
        _Endpoint(host, port),  # type: ignore[arg-type]  # duck-typed: only host and port are read
        username,
        password,
        protocol=mqtt.MQTTv311,
        client_id=username,
    )
    rc = await client.connect()
    if not rc.is_failure:
        await client.publish(f"telemetra/{username}/telemetry", b'{"t": 1}')
        await client.close()
    return not rc.is_failure


class _Endpoint:
    """What ``PahoTestClient`` reads from a broker: where to connect."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


def exercise(process: TelemetraProcess, admin_key: str) -> list[str]:
    """Everything that creates or presents a secret; returns every secret that was in play."""
    handed_out: list[str] = []
    with httpx.Client(base_url=process.base_url, headers={"X-API-Key": admin_key}, timeout=10) as admin:
        r = admin.post("/api/v1/devices", json={"id": "log-dev", "name": "Log probe"})
        assert r.status_code == 201, r.text
        first = r.json()["credentials"]["api_key"]
        r = admin.post("/api/v1/devices/log-dev/rotate")
        assert r.status_code == 200, r.text
        second = r.json()["credentials"]["api_key"]
        r = admin.post("/api/v1/devices", json={"id": "log-gw", "kind": "gateway"})
        assert r.status_code == 201, r.text
        gateway = r.json()["credentials"]["api_key"]
        r = admin.post("/api/v1/claim-codes", json={"device_ids": ["log-claimed", "log-unclaimed"]})
        assert r.status_code == 201, r.text
        codes = {c["device_id"]: c["claim_code"] for c in r.json()["claim_codes"]}
        r = httpx.post(f"{process.base_url}/api/v1/provision/claim", json={"claim_code": codes["log-claimed"]})
        assert r.status_code == 200, r.text
        claimed = r.json()["credentials"]["api_key"]
        r = httpx.post(f"{process.base_url}/api/v1/provision/claim", json={"claim_code": codes["log-claimed"]})
        assert r.status_code == 410, r.text  # a refusal is where a code could be echoed
        handed_out += [first, second, gateway, claimed, *codes.values()]

        # Every key in use, good and bad, in both header forms.
        for key, expect in ((second, 201), (claimed, 201), (first, 401), ("wrong-" + second[::-1], 401)):
            r = httpx.post(f"{process.base_url}/api/v1/ingest", json={"t": 1}, headers={"X-API-Key": key})
            assert r.status_code == expect, (expect, r.text)
            r = httpx.get(f"{process.base_url}/api/v1/devices/log-dev", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code in (200, 401, 403), r.text
        r = httpx.post(
            f"{process.base_url}/api/v1/nodes/log-child/telemetry", json={"uptime": 1}, headers={"X-API-Key": gateway}
        )
        assert r.status_code == 200, r.text
        r = admin.patch("/api/v1/devices/log-dev", json={"notes": f"no secret here {secrets.token_hex(4)}"})
        assert r.status_code == 200, r.text
    return handed_out


def assert_not_in_log(process: TelemetraProcess, secrets_in_play: list[str]) -> None:
    log = "\n".join(p.read_text(errors="replace") for p in process.workdir.glob(f"{process.name}.*.log"))
    assert "/api/v1/devices/{device_id}/rotate" in log, "positive control: the requests were logged (DEBUG)"
    for secret in secrets_in_play:
        assert len(secret) >= 8, secret
        found = [m.start() for m in re.finditer(re.escape(secret), log)]
        assert not found, f"a secret is in the server log at offset {found[0]}: …{log[found[0] - 80 : found[0]]}"


@pytest.mark.parametrize(
    ("broker", "db"),
    [
        ("embedded", "sqlite"),
        pytest.param("mosquitto", "postgres", marks=[pytest.mark.mosquitto, pytest.mark.postgres]),
    ],
)
async def test_no_secret_reaches_the_server_log(broker: str, db: str, tmp_path: Path) -> None:
    async with database(db, tmp_path) as url:
        mosquitto = start_mosquitto(tmp_path / "mosquitto", dynsec=True) if broker == "mosquitto" else None
        mqtt_port = mosquitto.port if mosquitto else free_port()
        service_password = secrets.token_urlsafe(18)
        env = {"TELEMETRA_DATABASE_URL": url, "TELEMETRA_LOG_LEVEL": "DEBUG"}
        configured: list[str] = []
        if mosquitto is None:
            # No admin key configured: one is generated at first start and kept in the data directory.
            env |= {
                "TELEMETRA_ADMIN_KEYS": "",
                "TELEMETRA_MQTT_PORT": str(mqtt_port),
                "TELEMETRA_MQTT_HOST": "127.0.0.1",
            }
        else:
            env |= {
                "TELEMETRA_ADMIN_KEYS": f"admin-{secrets.token_urlsafe(32)}",
                "TELEMETRA_MQTT_URL": f"mqtt://telemetra-svc:{service_password}@{mosquitto.host}:{mosquitto.port}",
                "TELEMETRA_MQTT_DYNSEC_USERNAME": mosquitto.admin_username,
                "TELEMETRA_MQTT_DYNSEC_PASSWORD": mosquitto.admin_password,
            }
            configured += [service_password, mosquitto.admin_password]
        process = TelemetraProcess(tmp_path / "telemetra", port=free_port(), env=env)
        try:
            process.start()
            await asyncio.to_thread(process.wait_healthy)
            if mosquitto is None:
                admin_key = (process.data_dir / "admin.key").read_text().strip()
            else:
                admin_key = env["TELEMETRA_ADMIN_KEYS"]
            handed_out = await asyncio.to_thread(exercise, process, admin_key)
            second, first = handed_out[1], handed_out[0]
            # Over MQTT too: the current secret connects, the rotated-away one is refused.
            assert await mqtt_connects("127.0.0.1", mqtt_port, "log-dev", second)
            assert not await mqtt_connects("127.0.0.1", mqtt_port, "log-dev", first)
        finally:
            process.stop()
            if mosquitto is not None:
                mosquitto.stop()
        assert_not_in_log(process, [admin_key, *handed_out, *configured])
