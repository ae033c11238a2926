"""iotmesh's gateway flow over HTTP, exactly as CLIENTS.md §1.1/§1.6 give it, on SQLite and PostgreSQL:
poll (bare array, leased), start, 1024-byte ranged parts of a 200 KB image, node progress, complete /
fail, delete of a pending job; two gateways racing for one job; and the raw bytes on a real socket."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from telemetra.app import create_app
from telemetra.domain.timeutil import now_ms
from tests.conftest import ADMIN, AppFactory, Running, make_settings
from tests.ota.conftest import image, job, node_statuses, upload
from tests.support.procs import free_port

SIZE = 200_001  # 200 KB and one byte: the last part is short
PART = 1024


async def _gateway(t: Running, name: str) -> dict[str, str]:
    secret = await t.create_device(name, kind="gateway")
    return {"X-API-Key": secret}


async def _fetch_parts(c: httpx.AsyncClient, firmware_id: int, size: int, headers: dict[str, str]) -> bytes:
    """What the gateway does: one request per 1024-byte part, reading exactly end-start+1 bytes."""
    out = bytearray()
    for n in range(math.ceil(size / PART)):
        start, end = n * PART, min(n * PART + PART - 1, size - 1)
        r = await c.get(
            f"/api/v1/firmware/{firmware_id}/download", headers={**headers, "Range": f"bytes={start}-{end}"}
        )
        assert r.status_code == 206, r.text
        assert r.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert r.headers["content-length"] == str(end - start + 1) == str(len(r.content))
        out += r.content
    return bytes(out)


async def _report_parts(c: httpx.AsyncClient, update_id: int, node: str, total: int, headers: dict[str, str],
                        fail_at: int | None = None) -> None:  # fmt: skip
    for part in range(total + 1):  # 0…N inclusive, as the test suite does
        body: dict[str, Any] = {"current_part": part, "total_parts": total, "status": "downloading"}
        if part == fail_at:
            body.update(status="failed", error_message=f"failed at part {part}")
        elif part == total:
            body["status"] = "completed"
        r = await c.post(f"/api/v1/ota/updates/{update_id}/node/{node}/progress", json=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "status": "ok",
            "node_id": node,
            "progress": f"{part}/{total}",
            "node_status": body["status"],
            "retry": False,
        }
        if part == fail_at:
            return


async def test_the_iotmesh_gateway_flow(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        gw = await _gateway(t, "gw-a1b2c3d4")
        data = image(SIZE, 5)
        fw = await upload(c, data, model="pir", version="1.1.0")
        created = await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"], "force_update": False,
                                                             "target_node_id": None}, headers=ADMIN)  # fmt: skip
        assert created.status_code == 200, created.text
        update = created.json()
        assert (update["status"], update["target_node_type"], update["delivery"]) == ("pending", "pir", "gateway")
        listed = (await c.get("/api/v1/ota/updates", headers=ADMIN)).json()
        assert isinstance(listed, list) and [u["id"] for u in listed] == [update["id"]]

        # G3: a bare array; the gateway reads element 0.
        r = await c.get("/api/v1/ota/updates/pending", headers=gw)
        assert r.status_code == 200
        pending = r.json()
        assert isinstance(pending, list) and len(pending) == 1
        p = pending[0]
        assert (p["update_id"], p["firmware_id"], p["node_type"], p["version"]) == (
            update["id"],
            fw["id"],
            "pir",
            "1.1.0",
        )
        assert (p["hardware"], p["size_bytes"], p["target_node_id"], p["force"]) == ("ESP32", SIZE, None, False)
        assert p["md5"] == hashlib.md5(data).hexdigest() and len(p["md5"]) == 32
        assert p["num_parts"] == math.ceil(SIZE / PART) == 196

        # G4 with an empty body and a JSON content type, as the gateway sends it.
        start_headers = {**gw, "Content-Type": "application/json"}
        r = await c.post(f"/api/v1/ota/updates/{update['id']}/start", content=b"", headers=start_headers)
        assert r.status_code == 200 and r.json() == {"status": "distributing", "update_id": update["id"], "error": None}
        assert (await c.get("/api/v1/ota/updates/pending", headers=gw)).json() == []
        r = await c.post(f"/api/v1/ota/updates/{update['id']}/start", headers=gw)
        assert (r.status_code, r.json()["field"]) == (409, "status")
        r = await c.delete(f"/api/v1/ota/updates/{update['id']}", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (409, "status")  # in progress: cancel it first

        # G5: every 1024-byte part, then the image matches the MD5 the nodes verify.
        got = await _fetch_parts(c, fw["id"], SIZE, gw)
        assert hashlib.md5(got).hexdigest() == p["md5"] and got == data

        # Progress for mesh nodes that are not registered devices, then G6.
        await _report_parts(c, update["id"], "node_pir_1", p["num_parts"], gw)
        await _report_parts(c, update["id"], "node_pir_2", p["num_parts"], gw, fail_at=1)
        r = await c.post(f"/api/v1/ota/updates/{update['id']}/complete", content=b"", headers=start_headers)
        assert r.status_code == 200 and r.json()["status"] == "completed"
        detail = await job(c, update["id"])
        assert (detail["status"], detail["node_type"], detail["version"]) == ("completed", "pir", "1.1.0")
        assert node_statuses(detail) == {"node_pir_1": "completed", "node_pir_2": "failed"}
        failed = next(n for n in detail["nodes"] if n["node_id"] == "node_pir_2")
        assert (failed["current_part"], failed["total_parts"], failed["error_message"]) == (1, 196, "failed at part 1")
        assert detail["completed_at"] is not None and detail["waves"] == []

        # G7 on a second job: failed, with the message kept; then a pending job is deleted (200 + JSON).
        second = (await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)).json()
        message = {"error_message": "Failed to offer update via mesh"}
        r = await c.post(f"/api/v1/ota/updates/{second['id']}/fail", params=message, headers=gw)
        assert r.status_code == 200 and r.json()["error"] == "Failed to offer update via mesh"
        assert (await job(c, second["id"]))["error_message"] == "Failed to offer update via mesh"
        third = (await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)).json()
        assert len((await c.get("/api/v1/ota/updates/pending", headers=gw)).json()) == 1
        r = await c.delete(f"/api/v1/ota/updates/{third['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["update_id"] == third["id"]
        assert (await c.get("/api/v1/ota/updates/pending", headers=gw)).json() == []

        # Every wrong id names its field.
        for path, field in (
            ("/api/v1/ota/updates/999/start", "update_id"),
            ("/api/v1/ota/updates/999/complete", "update_id"),
        ):
            r = await c.post(path, headers=gw)
            assert (r.status_code, r.json()["field"]) == (404, field)
        r = await c.post("/api/v1/ota/updates", json={"firmware_id": 999}, headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (404, "firmware_id")
        r = await c.post(f"/api/v1/ota/updates/{update['id']}/node/x/progress", json={"status": "exploded"}, headers=gw)
        assert (r.status_code, r.json()["field"]) == (422, "status")


async def test_two_gateways_racing_never_take_the_same_job(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        gateways = [await _gateway(t, f"gw-{i}") for i in range(2)]
        fw = await upload(c, image(3000), model="led", version="2.0.0")
        for _ in range(5):
            update = (await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)).json()
            polls = [gateways[i % 2] for i in range(8)]  # four pollers per gateway, all at once
            answers = await asyncio.gather(*(c.get("/api/v1/ota/updates/pending", headers=h) for h in polls))
            assert all(a.status_code == 200 for a in answers)
            winners = {i % 2 for i, a in enumerate(answers) if a.json()}
            assert len(winners) == 1, [a.json() for a in answers]  # one gateway got it, the other nothing
            winner = gateways[winners.pop()]
            loser = gateways[1] if winner is gateways[0] else gateways[0]
            assert [u["update_id"] for u in (await c.get("/api/v1/ota/updates/pending", headers=winner)).json()] == [
                update["id"]
            ]  # the holder keeps seeing it
            assert (await c.get("/api/v1/ota/updates/pending", headers=loser)).json() == []
            r = await c.post(f"/api/v1/ota/updates/{update['id']}/start", headers=loser)
            assert (r.status_code, r.json()["field"]) == (409, "update_id")
            assert (await c.post(f"/api/v1/ota/updates/{update['id']}/start", headers=winner)).status_code == 200
            assert (await c.post(f"/api/v1/ota/updates/{update['id']}/complete", headers=winner)).status_code == 200


async def test_a_lease_runs_out(app_factory: AppFactory) -> None:
    """A gateway that took a job and went away does not keep it: after the lease, another takes it."""
    async with app_factory() as t:
        fw = await upload(t.client, image(100), model="led", version="2.0.0")
        update = (await t.client.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)).json()
        repo = t.services.ota.jobs_repo
        now, lease = now_ms(), 120_000
        assert [j.id for j in await repo.lease_pending("device:a", now_ms=now, lease_ms=lease)] == [update["id"]]
        assert await repo.lease_pending("device:b", now_ms=now + lease - 1, lease_ms=lease) == []
        assert [j.id for j in await repo.lease_pending("device:b", now_ms=now + lease + 1, lease_ms=lease)] == [
            update["id"]
        ]
        assert await repo.lease_pending("device:a", now_ms=now + lease + 2, lease_ms=lease) == []


async def test_key_less_gateways_need_the_setting(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        r = await t.client.get("/api/v1/ota/updates/pending")
        assert (r.status_code, r.json()["field"]) == (401, "X-API-Key")
        secret = await t.create_device("plain-device")
        r = await t.client.get("/api/v1/ota/updates/pending", headers={"X-API-Key": secret})
        assert r.status_code == 403
    async with app_factory(allow_anonymous_nodes=True) as t:
        fw = await upload(t.client, image(100), model="led", version="2.0.0")
        await t.client.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)
        r = await t.client.get("/api/v1/ota/updates/pending")
        assert r.status_code == 200 and len(r.json()) == 1


async def _raw_get(port: int, request: bytes) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(
        next(line.split(b":", 1)[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    body = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return head, body


async def test_parts_on_a_raw_socket_are_neither_chunked_nor_compressed(tmp_path: Path) -> None:
    """The gateway reads exactly end-start+1 bytes after the headers from the socket: a real server must
    send Content-Length and the plain slice, even to a client that says it takes gzip."""
    port = free_port()
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'raw.db'}", tmp_path / "data")
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:
            for _ in range(200):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            assert server.started
            data = image(5000, 3)
            fw = await upload(c, data, model="pir", version="1.0.0")
        request = (
            f"GET /api/v1/firmware/{fw['id']}/download HTTP/1.1\r\nHost: x\r\nRange: bytes=2048-3071\r\n"
            "Accept-Encoding: gzip, deflate\r\nConnection: close\r\n\r\n"
        ).encode()
        head, body = await _raw_get(port, request)
        assert head.startswith(b"HTTP/1.1 206")
        lower = head.lower()
        assert b"transfer-encoding" not in lower and b"content-encoding" not in lower
        assert b"content-length: 1024\r\n" in lower and b"content-range: bytes 2048-3071/5000\r\n" in lower
        assert body == data[2048:3072]
    finally:
        server.should_exit = True
        await serving
