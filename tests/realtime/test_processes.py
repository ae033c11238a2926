"""Changes made by another process — the CLI on the same SQLite file, a second server on the same
PostgreSQL — reach a running server at once; a background task that dies fails /health."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import websockets

from telemetra.core import Core
from telemetra.events import model
from telemetra.events.model import ChangeEvent
from tests.conftest import ADMIN, ADMIN_KEY, make_settings, postgres_database
from tests.realtime.test_streams import create, receive
from tests.support.server import served
from tests.test_cli import COMMAND, Server, clean_env


def cli_env(database_url: str, data_dir: Path, port: int) -> dict[str, str]:
    return clean_env(
        data_dir,
        TELEMETRA_DATABASE_URL=database_url,
        TELEMETRA_ADMIN_KEYS=ADMIN_KEY,
        TELEMETRA_PORT=str(port),
        TELEMETRA_LOG_LEVEL="WARNING",
    )


async def run_cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    result = await asyncio.to_thread(
        subprocess.run, [*COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def next_change(events, device_id: str, change: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds until the ``device`` event ``change`` of ``device_id`` arrives (at most 5)."""
    started = time.monotonic()
    async with asyncio.timeout(5):
        async for event in events:
            if isinstance(event, ChangeEvent) and event.device_id == device_id and event.data["change"] == change:
                return time.monotonic() - started
    raise AssertionError("the subscription ended")


async def test_a_device_changed_by_the_cli_is_known_to_the_running_server_at_once(
    database_url: str, tmp_path: Path
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    settings = make_settings(database_url, tmp_path / "data")
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http) as client:
        env = cli_env(database_url, tmp_path / "data", s.port)
        events = s.services.hub.subscribe(types=[model.DEVICE])
        await run_cli(env, cwd, "devices", "create", "from-cli")
        assert await next_change(events, "from-cli", "created") < 1.0
        old = await create(client, "rekeyed")
        ok = await client.post("/api/v1/ingest", json={"device_id": "rekeyed", "t": 1}, headers={"X-API-Key": old})
        assert ok.status_code == 201  # the key works, and is now in the server's credential cache
        await run_cli(env, cwd, "devices", "rotate", "rekeyed")
        assert await next_change(events, "rekeyed", "rotated") < 1.0
        refused = await client.post("/api/v1/ingest", json={"device_id": "rekeyed", "t": 2}, headers={"X-API-Key": old})
        assert refused.status_code == 401, refused.text


async def test_a_client_on_one_process_sees_what_another_ingested(tmp_path: Path) -> None:
    async with postgres_database() as url:
        workdir = tmp_path / "b"
        workdir.mkdir()
        other = Server(workdir, tmp_path / "b.log", TELEMETRA_DATABASE_URL=url, TELEMETRA_ADMIN_KEYS=ADMIN_KEY)
        try:
            other.wait_healthy()
            async with (
                served(make_settings(url, tmp_path / "data")) as a,
                httpx.AsyncClient(base_url=other.url, timeout=10) as b,
                websockets.connect(f"{a.ws}/api/v1/realtime?token={ADMIN_KEY}&types=telemetry,device") as ws,
            ):
                key = await create(b, "on-b")  # created in process B
                created = await receive(ws)
                assert (created["type"], created["change"], created["device_id"]) == ("device", "created", "on-b")
                r = await b.post("/api/v1/ingest", json={"device_id": "on-b", "t": 21.5}, headers={"X-API-Key": key})
                assert r.status_code == 201
                seen = await receive(ws)
                assert (seen["type"], seen["device_id"], seen["values"]) == ("telemetry", "on-b", {"t": 21.5})
                # A rotation in B is felt in A's credential cache at once.
                async with httpx.AsyncClient(base_url=a.http) as client_a:
                    assert (
                        await client_a.get("/api/v1/devices/on-b/latest", headers={"X-API-Key": key})
                    ).status_code == 200
                    assert (await b.post("/api/v1/devices/on-b/rotate", headers=ADMIN)).status_code == 200
                    assert (await receive(ws))["change"] == "rotated"
                    stale = await client_a.get("/api/v1/devices/on-b/latest", headers={"X-API-Key": key})
                    assert stale.status_code == 401
        finally:
            assert other.stop(), other.output()
        assert "Traceback" not in other.output()


async def test_a_background_task_that_dies_fails_health(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 't.db'}", tmp_path / "data")
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http) as client:
        before = await client.get("/health")
        assert before.status_code == 200, before.text  # positive control
        core = next(c for c in s.services.components if isinstance(c, Core))

        async def broken() -> None:  # a bug in a background task, as it would show up
            await asyncio.sleep(0)
            raise KeyError("device_id")

        core.supervisor.spawn("broken", broken)
        for _ in range(100):
            after = await client.get("/health")
            if after.status_code == 503:
                break
            await asyncio.sleep(0.02)
        assert after.status_code == 503, after.text
        tasks = after.json()["checks"]["tasks"]
        assert tasks["status"] == "failed" and "KeyError" in tasks["failed"]["core.broken"]["error"]
        # The other tasks go on: ingest still works while /health says what died.
        key = await create(client, "still")
        r = await client.post("/api/v1/ingest", json={"device_id": "still", "t": 1}, headers={"X-API-Key": key})
        assert r.status_code == 201
    logged = [r for r in caplog.records if "core.broken" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # with its traceback
