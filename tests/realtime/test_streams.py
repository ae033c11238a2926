"""Every WebSocket path, against a real server on SQLite and PostgreSQL: message shapes, filters, auth,
heartbeat, resume, a client that stops reading, and the connection counts in /health."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import ADMIN, ADMIN_KEY, make_settings
from tests.support.server import Served, served

VIEWER_KEY = "test-viewer-key-" + "v" * 24
TS = 1_790_000_000_000


@asynccontextmanager
async def server(
    database_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Served, httpx.AsyncClient]]:
    settings = make_settings(database_url, tmp_path / "data", viewer_keys=[VIEWER_KEY], **overrides)
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http, timeout=10) as client:
        yield s, client


async def create(client: httpx.AsyncClient, device_id: str) -> str:
    r = await client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["credentials"]["api_key"]
    return key


async def post(client: httpx.AsyncClient, key: str, body: Any, path: str = "/api/v1/ingest") -> None:
    r = await client.post(path, json=body, headers={"X-API-Key": key})
    assert r.status_code == 201, r.text


def connect(s: Served, path: str, *, key: str | None = ADMIN_KEY, **kwargs: Any) -> Any:
    headers = {"X-API-Key": key} if key else None
    return websockets.connect(s.ws + path, additional_headers=headers, open_timeout=20, **kwargs)


async def receive(ws: ClientConnection, *, skip: tuple[str, ...] = ("heartbeat",), within: float = 5) -> dict[str, Any]:
    """The next message not of a ``skip`` type, within ``within`` seconds in all."""
    async with asyncio.timeout(within):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message.get("type") not in skip:
                return message


async def refusal(s: Served, path: str, key: str | None = None) -> tuple[int, str]:
    async with connect(s, path, key=key) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_own_stream_carries_committed_telemetry_with_filters(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        key_a, key_b = await create(client, "rt-a"), await create(client, "rt-b")
        async with connect(s, "/api/v1/realtime?devices=rt-a&types=telemetry") as ws:
            await post(client, key_b, {"device_id": "rt-b", "t": 1})  # another device: filtered out
            await post(client, key_a, {"device_id": "rt-a", "ts": TS, "metrics": {"temperature": {"inlet": 45.5}}})
            await post(client, key_a, {"device_id": "rt-a", "ts": TS, "metrics": {"temperature": {"inlet": 45.5}}})
            await post(client, key_a, {"device_id": "rt-a", "ts": TS + 1000, "on": True})
            first, second = await receive(ws), await receive(ws)
        assert first["type"] == "telemetry" and first["device_id"] == "rt-a"
        assert first["values"] == {"temperature.inlet": 45.5}  # dotted, like /latest
        assert first["ts"] == "2026-09-21T14:13:20.000Z" and isinstance(first["id"], int)
        # The redelivered duplicate was no event: the next one is the new reading.
        assert second["values"] == {"on": True} and second["id"] > first["id"]
        latest = await client.get("/api/v1/devices/rt-a/latest", headers=ADMIN)
        assert set(latest.json()["values"]) == {"temperature.inlet", "on"}  # what was streamed is stored


async def test_types_filter_state_and_device_changes(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        async with connect(s, "/api/v1/realtime?types=device,state") as ws:
            key = await create(client, "rt-types")
            created = await receive(ws)
            await post(client, key, {"device_id": "rt-types", "t": 1})
            online = await receive(ws)
            r = await client.patch("/api/v1/devices/rt-types", json={"disabled": True}, headers=ADMIN)
            assert r.status_code == 200, r.text
            disabled = await receive(ws)
        assert (created["type"], created["change"], created["device_id"]) == ("device", "created", "rt-types")
        assert (online["type"], online["online"]) == ("state", True)  # its first message: no telemetry event
        assert (disabled["type"], disabled["change"]) == ("device", "disabled")


async def test_auth_is_refused_with_close_codes_and_reasons(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        key_a = await create(client, "au-a")
        await create(client, "au-b")
        assert (await refusal(s, "/api/v1/realtime"))[0] == 4401
        code, reason = await refusal(s, "/api/v1/realtime", key="wrong-key-" + "x" * 30)
        assert code == 4401 and "invalid API key" in reason
        code, reason = await refusal(s, "/api/v1/realtime?devices=au-b", key=key_a)
        assert code == 4403 and "own device" in reason
        assert (await refusal(s, "/api/v1/stream/devices/au-b", key=key_a))[0] == 4403
        assert (await refusal(s, "/ws", key=key_a))[0] == 4403  # all devices: staff only
        assert (await refusal(s, "/stream/au-b?token=" + key_a))[0] == 4403
        code, reason = await refusal(s, "/api/v1/realtime?types=telemetry,nonsense", ADMIN_KEY)
        assert code == 4400 and "types" in reason and "nonsense" in reason
        assert (await refusal(s, "/api/v1/realtime?since=abc", ADMIN_KEY))[0] == 4400
        # Positive controls: the device's own key on its own stream, the viewer key, ?token=.
        async with (
            connect(s, "/api/v1/realtime", key=key_a) as own,
            connect(s, "/api/v1/realtime", key=VIEWER_KEY) as viewer,
        ):
            async with websockets.connect(f"{s.ws}/api/v1/realtime?token={VIEWER_KEY}&types=telemetry") as by_token:
                await post(client, key_a, {"device_id": "au-a", "t": 2})
                assert (await receive(own, skip=("heartbeat", "state")))["device_id"] == "au-a"
                assert (await receive(viewer, skip=("heartbeat", "state")))["device_id"] == "au-a"
                assert (await receive(by_token))["values"] == {"t": 2}
        health = (await client.get("/health")).json()
        assert health["checks"]["websocket"]["refused"] >= 7


async def test_heartbeat_and_resume_after_reconnect(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path, ws_heartbeat_interval=0.2) as (s, client):
        key = await create(client, "hb")
        async with connect(s, "/api/v1/realtime?devices=hb&types=telemetry") as ws:
            assert (await receive(ws, skip=()))["type"] == "heartbeat"
            await post(client, key, {"device_id": "hb", "n": 0})
            last_seen = (await receive(ws))["id"]
        for n in (1, 2, 3):  # while the client is away
            await post(client, key, {"device_id": "hb", "n": n})
        async with connect(s, f"/api/v1/realtime?devices=hb&types=telemetry&since={last_seen}") as ws:
            missed = [(await receive(ws))["values"]["n"] for _ in range(3)]
            await post(client, key, {"device_id": "hb", "n": 4})
            live = (await receive(ws))["values"]["n"]
        assert missed == [1, 2, 3] and live == 4
        async with connect(s, "/api/v1/realtime?devices=hb&since=1") as ws:  # an id from another run
            assert await receive(ws) == {"type": "gap", "missed": -1}


async def test_a_client_that_stops_reading_loses_its_oldest_and_is_told(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path, ws_queue_size=20) as (s, client):
        key = await create(client, "slow")
        keys = {f"k{i:02d}": float(i) for i in range(30)}  # ~0.7 kB a message: the socket buffers fill fast
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning to megabytes
        async with websockets.connect(
            f"{s.ws}/api/v1/realtime?devices=slow&types=telemetry",
            additional_headers=ADMIN,
            sock=sock,
            max_queue=1,
        ) as ws:
            batches = 12
            for b in range(batches):  # acknowledged although the client reads nothing
                readings = [{"ts": TS + (b * 200 + i) * 1000, **keys} for i in range(200)]
                await post(client, key, readings, "/api/v1/ingest/batch")
            received, gaps = 0, []
            last: dict[str, Any] = {}
            while last.get("ts") != "2026-09-21T14:53:19.000Z":  # the last reading posted
                message = await receive(ws)
                if message["type"] == "gap":
                    gaps.append(message["missed"])
                else:
                    received += 1
                    last = message
        assert gaps and all(g > 0 for g in gaps)
        assert received + sum(gaps) == batches * 200  # every event either delivered or counted as missed
        stored = await client.get(
            "/api/v1/devices/slow/aggregate",
            params={"keys": "k00", "interval": "1d", "start": "2026-09-01T00:00:00Z", "end": "2026-10-01T00:00:00Z"},
            headers=ADMIN,
        )
        assert stored.status_code == 200, stored.text
        assert sum(b["count"] for b in stored.json()["series"]["k00"]) == batches * 200


async def test_telemetry_app_streams(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path, trusted_networks=["127.0.0.1/32"]) as (s, client):
        key_a, key_b = await create(client, "app-a"), await create(client, "app-b")
        paths = [
            "/api/v1/stream/devices/app-a",
            "/api/v1/realtime/subscribe/app-a",
            "/compat/telemetry-app/api/v1/stream/devices/app-a",
        ]
        for path in paths:
            async with connect(s, path, key=None) as ws:  # the app sends no key: a trusted network
                assert (await receive(ws))["type"] == "ack"
                await ws.send('{"action":"ping"}')
                assert await receive(ws) == {"type": "pong"}
                await ws.send("not json")
                assert (await receive(ws))["code"] == "INVALID_JSON"
                await ws.send('{"action":"dance"}')
                assert (await receive(ws))["code"] == "UNKNOWN_ACTION"
                await post(client, key_b, {"device_id": "app-b", "temperature": 1.0})
                await post(client, key_a, {"device_id": "app-a", "temperature": 21.5, "humidity": 40})
                reading = await receive(ws)
                assert reading["type"] == "reading" and reading["device_id"] == "app-a"
                data = reading["data"]
                assert set(data) == {"id", "device_id", "timestamp", "metrics"}
                assert data["metrics"] == {"temperature": 21.5, "humidity": 40.0}
                assert data["timestamp"].endswith("Z") and "+00:00" not in data["timestamp"]
                # subscribe to another device on the same socket
                await ws.send('{"action":"subscribe","device_id":"app-b"}')
                assert (await receive(ws))["type"] == "ack"
                await post(client, key_b, {"device_id": "app-b", "temperature": 2.0})
                assert (await receive(ws))["device_id"] == "app-b"
                await ws.send('{"action":"unsubscribe","device_id":"app-b"}')
                assert (await receive(ws))["type"] == "ack"
        for path in ("/api/v1/stream/all", "/compat/telemetry-app/api/v1/stream/all"):
            async with connect(s, path, key=None) as ws:
                assert (await receive(ws))["type"] == "ack"
                await post(client, key_b, {"device_id": "app-b", "temperature": 3.0})
                assert (await receive(ws))["data"]["metrics"] == {"temperature": 3.0}


async def test_heatpump_dashboard_streams(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path, trusted_networks=["127.0.0.1/32"]) as (s, client):
        key = await create(client, "hp-001")
        payload = {"temperature": {"inlet": 45.0, "outlet": 50.5}, "electrical": {"voltage": 230.0}}
        for path in ("/ws", "/api/ws"):
            async with connect(s, path, key=None) as ws:
                await ws.send("hello")
                pong = await receive(ws)
                assert pong["type"] == "pong" and pong["timestamp"].endswith("Z")
                await post(client, key, {"device_id": "hp-001", **payload})
                message = await receive(ws)
                assert message["type"] == "sensor_data" and message["device_id"] == "hp-001"
                assert message["data"] == payload  # nested as the device sent it


async def test_device_stream_carries_commands_and_config_down(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        key = await create(client, "esp")
        early = await client.post("/api/v1/devices/esp/commands", json={"name": "blink"}, headers=ADMIN)
        async with websockets.connect(f"{s.ws}/stream/esp?token={key}") as ws:
            queued_before = await receive(ws)  # delivered on connect
            r = await client.post(
                "/api/v1/devices/esp/commands", json={"name": "restart", "params": {"delay_ms": 500}}, headers=ADMIN
            )
            assert r.status_code == 201, r.text
            live = await receive(ws)
            r = await client.put("/api/v1/devices/esp/config", json={"sample_interval_ms": 30000}, headers=ADMIN)
            assert r.status_code == 200, r.text
            config = await receive(ws)
        assert queued_before == {"type": "command", "id": early.json()["id"], "payload": {"action": "blink"}}
        assert live["payload"] == {"action": "restart", "delay_ms": 500}
        assert config == {"type": "config_update", "payload": {"sample_interval_ms": 30000, "version": 1}}
        status = await client.get(f"/api/v1/devices/esp/commands/{live['id']}", headers=ADMIN)
        assert status.json()["status"] == "sent"


async def test_health_counts_connections_per_stream(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        async with connect(s, "/api/v1/realtime") as a, connect(s, "/ws") as b:
            await a.ping()
            await b.ping()
            websocket = (await client.get("/health")).json()["checks"]["websocket"]
            assert websocket["connections"] == 2 and websocket["streams"] == {"realtime": 1, "heatpump": 1}
        for _ in range(100):  # closing is asynchronous on the server side
            websocket = (await client.get("/health")).json()["checks"]["websocket"]
            if websocket["connections"] == 0:
                break
            await asyncio.sleep(0.05)
        assert websocket["connections"] == 0


async def test_an_open_stream_ends_when_its_device_key_is_revoked(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path) as (s, client):
        key = await create(client, "revoked")
        async with (
            websockets.connect(f"{s.ws}/stream/revoked?token={key}") as device,
            connect(s, "/api/v1/realtime", key=key) as reader,
        ):
            await device.ping()
            await reader.ping()
            assert (await client.post("/api/v1/devices/revoked/rotate", headers=ADMIN)).status_code == 200
            for ws in (device, reader):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_keyless_stream_refuses_pages_of_another_site(database_url: str, tmp_path: Path) -> None:
    async with server(database_url, tmp_path, trusted_networks=["127.0.0.1/32"]) as (s, _client):
        evil = {"Origin": "http://evil.example"}
        async with websockets.connect(f"{s.ws}/ws", additional_headers=evil) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
        own = {"Origin": f"http://127.0.0.1:{s.port}"}  # the dashboard served by Telemetra itself
        async with websockets.connect(f"{s.ws}/ws", additional_headers=own) as ws:
            await ws.send("hi")
            assert (await receive(ws))["type"] == "pong"
