"""The device registry (SPEC §1, §5): credentials shown once, list filters and pages, update, delete with
all the device's data, rotation, disabling, claim codes, and concurrent first posts of a new device —
on SQLite and PostgreSQL. One app per backend; every test works on devices (and a model name) of its own."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select, update

from telemetra.domain.records import Batch, Event
from telemetra.domain.timeutil import now_ms
from telemetra.storage.schema import (
    ClaimCode,
    Device,
    DeviceState,
    EventRow,
    LatestRow,
    StateHistory,
    TelemetryRow,
)
from tests.api.shared_app import lenient_client, shared_app_fixture, unique
from tests.conftest import ADMIN, Running

FLEET_KEY = "fleet-key-for-the-device-tests-0123456789"
shared = shared_app_fixture(device_api_keys=[FLEET_KEY])
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def ingest(api: Running, key: str, body: Any) -> int:
    r = await api.client.post("/api/v1/ingest", json=body, headers={"X-API-Key": key})
    return r.status_code


async def count_rows(api: Running, device_id: str) -> dict[str, int]:
    counts = {}
    async with api.services.engine.connect() as conn:
        for model in (TelemetryRow, LatestRow, DeviceState, StateHistory, EventRow, ClaimCode):
            stmt = select(func.count()).select_from(model).where(model.device_id == device_id)
            counts[model.__tablename__] = (await conn.execute(stmt)).scalar_one()
        stmt = select(func.count()).select_from(Device).where(Device.id == device_id)
        counts["devices"] = (await conn.execute(stmt)).scalar_one()
    return counts


# ---------------------------------------------------------------------------------------------- create


async def test_create_returns_credentials_once(shared: Running) -> None:
    device_id = unique("esp32")
    r = await shared.client.post(
        "/api/v1/devices",
        json={"id": device_id, "name": "Kitchen", "model": "env-v1", "notes": "n", "metadata": {"floor": 2}},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    secret = body["credentials"]["api_key"]
    assert body["credentials"]["mqtt"] == {"username": device_id, "password": secret}
    assert len(secret) >= 22  # ≥ 128 bits in URL-safe base64
    device = body["device"]
    assert device["id"] == device_id and device["name"] == "Kitchen" and device["model"] == "env-v1"
    assert device["kind"] == "device" and device["metadata"] == {"floor": 2} and device["notes"] == "n"
    assert device["online"] is False and device["last_seen_at"] is None and device["disabled"] is False
    assert device["created_at"].endswith("Z")

    # The secret is never shown again, nor stored.
    paths = (f"/api/v1/devices/{device_id}", "/api/v1/devices?limit=1000", f"/api/v1/nodes/{device_id}", "/api/devices")
    for path in paths:
        r = await shared.client.get(path, headers=ADMIN)
        assert r.status_code == 200 and secret not in r.text, path
    async with shared.services.engine.connect() as conn:
        row = (await conn.execute(select(Device.__table__).where(Device.id == device_id))).one()
    assert secret not in [str(v) for v in row] and row.secret_hash
    # And it works at once (seeds' lesson: keys returned at creation that ingest then rejected).
    assert await ingest(shared, secret, {"t": 1}) == 201
    r = await shared.client.get(f"/api/v1/devices/{device_id}", headers={"X-API-Key": secret})
    assert r.status_code == 200 and r.json()["online"] is True


async def test_create_without_id_generates_one(shared: Running) -> None:
    r = await shared.client.post("/api/v1/devices", json={"kind": "gateway"}, headers=ADMIN)
    assert r.status_code == 201
    body = r.json()
    assert body["device"]["id"].startswith("dev-") and body["device"]["kind"] == "gateway"
    assert body["credentials"]["mqtt"]["username"] == body["device"]["id"]
    assert await ingest(shared, body["credentials"]["api_key"], {"t": 1}) == 201


async def test_duplicate_id_is_409(shared: Running) -> None:
    device_id = unique("dup")
    key = await shared.create_device(device_id)
    r = await shared.client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN)
    assert r.status_code == 409
    assert r.json()["field"] == "id"
    assert await ingest(shared, key, {"t": 1}) == 201  # the first one's key still works


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "has space"}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"kind": "robot"}, "kind"),
        ({"name": "n" * 129}, "name"),
        ({"metadata": [1]}, "metadata"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_create_refuses_bad_fields(shared: Running, body: dict[str, Any], field: str) -> None:
    r = await shared.client.post("/api/v1/devices", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


# ---------------------------------------------------------------------------------------------- list, get, patch


async def test_list_filters_and_pagination(shared: Running) -> None:
    model, token = unique("model"), unique("tok")
    ids = sorted(unique("lst") for _ in range(3))
    keys = {}
    keys[ids[0]] = await shared.create_device(ids[0], model=model, name=f"Boiler {token.upper()}")
    keys[ids[1]] = await shared.create_device(ids[1], model=model, notes=f"near the {token}")
    keys[ids[2]] = await shared.create_device(ids[2], model=model, kind="gateway")
    await shared.create_device(unique("other"), model=unique("model"), name=token)  # same token, other model
    assert await ingest(shared, keys[ids[1]], {"t": 1}) == 201

    async def listed(query: str) -> tuple[list[str], int, dict[str, Any]]:
        r = await shared.client.get(f"/api/v1/devices?model={model}&{query}", headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        return [d["id"] for d in body["devices"]], body["total"], body

    assert (await listed(""))[:2] == (ids, 3)
    assert (await listed("kind=gateway"))[:2] == ([ids[2]], 1)
    assert (await listed(f"search={token}"))[:2] == (ids[:2], 2)  # name (case-insensitive) and notes
    assert (await listed(f"search={ids[2][-10:]}"))[:2] == ([ids[2]], 1)  # id
    assert (await listed("online=true"))[:2] == ([ids[1]], 1)
    assert (await listed("online=false"))[:2] == ([ids[0], ids[2]], 2)
    page, total, body = await listed("limit=2&offset=0")
    assert (page, total, body["limit"], body["offset"]) == (ids[:2], 3, 2, 0)
    page, total, body = await listed("limit=2&offset=2")
    assert (page, total, body["offset"]) == ([ids[2]], 3, 2)
    assert (await listed("offset=10"))[:2] == ([], 3)
    # Without the model filter the token matches the fourth device too.
    r = await shared.client.get(f"/api/v1/devices?search={token}", headers=ADMIN)
    assert r.json()["total"] == 3
    # Seed 000's and seed 003's list paths list them too, as bare arrays in their own shapes.
    r = await shared.client.get("/api/v1/nodes?limit=10000", headers=ADMIN)
    assert set(ids) <= {d["id"] for d in r.json()}
    r = await shared.client.get("/api/devices?limit=10000", headers=ADMIN)
    assert set(ids) <= {d["device_id"] for d in r.json()}
    for query in ("limit=0", "limit=1001", "offset=-1", "online=maybe"):
        r = await shared.client.get(f"/api/v1/devices?{query}", headers=ADMIN)
        assert r.status_code == 422 and r.json()["field"] == query.split("=")[0]


async def test_list_sorts_by_any_column_with_empty_values_last(shared: Running) -> None:
    model = unique("sortm")
    ids = [unique("srt") for _ in range(3)]
    await shared.create_device(ids[0], model=model, name="b")
    await shared.create_device(ids[1], model=model, name="a")
    await shared.create_device(ids[2], model=model)  # no name
    keys = {}
    for device_id in ids[:2]:
        r = await shared.client.post(f"/api/v1/devices/{device_id}/rotate", headers=ADMIN)
        keys[device_id] = r.json()["credentials"]["api_key"]
    assert await ingest(shared, keys[ids[0]], {"t": 1}) == 201  # heard from: ids[0] only

    async def order(sort: str) -> list[str]:
        r = await shared.client.get(f"/api/v1/devices?model={model}&sort={sort}", headers=ADMIN)
        assert r.status_code == 200, r.text
        return [d["id"] for d in r.json()["devices"]]

    assert await order("name") == [ids[1], ids[0], ids[2]]
    assert await order("-name") == [ids[0], ids[1], ids[2]]  # the device without a name stays last
    assert (await order("-last_seen_at"))[0] == ids[0]
    assert (await order("last_seen_at"))[0] == ids[0]
    assert await order("-id") == sorted(ids, reverse=True)
    r = await shared.client.get("/api/v1/devices?sort=secret_hash", headers=ADMIN)
    assert r.status_code == 422 and r.json()["field"] == "sort"


async def test_get_and_patch(shared: Running) -> None:
    device_id = unique("patch")
    await shared.create_device(device_id, name="before", model="m1", metadata={"a": 1})
    created = (await shared.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)).json()
    assert {k: created[k] for k in ("name", "model", "metadata", "notes")} == {
        "name": "before",
        "model": "m1",
        "metadata": {"a": 1},
        "notes": None,
    }
    r = await shared.client.patch(
        f"/api/v1/devices/{device_id}", json={"notes": "moved", "metadata": {"b": 2}}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    got = (await shared.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)).json()
    assert got == r.json()
    # Only the given fields change.
    assert (got["name"], got["model"], got["notes"], got["metadata"]) == ("before", "m1", "moved", {"b": 2})
    assert got["created_at"] == created["created_at"] and got["updated_at"] >= created["updated_at"]
    r = await shared.client.patch(f"/api/v1/devices/{device_id}", json={"name": None}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["name"] is None  # nullable fields can be cleared
    r = await shared.client.patch(f"/api/v1/devices/{unique('ghost')}", json={"notes": "x"}, headers=ADMIN)
    assert r.status_code == 404
    r = await shared.client.patch(f"/api/v1/devices/{device_id}", json={"secret_hash": "x"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["field"] == "secret_hash"
    r = await shared.client.get(f"/api/v1/devices/{unique('ghost')}", headers=ADMIN)
    assert r.status_code == 404 and r.json()["field"] == "device_id"


@pytest.mark.parametrize("field", ["kind", "disabled"])
async def test_patch_null_into_a_required_field_is_4xx(shared: Running, field: str) -> None:
    device_id = unique("nullpatch")
    await shared.create_device(device_id)
    async with lenient_client(shared) as client:
        r = await client.patch(f"/api/v1/devices/{device_id}", json={field: None}, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


# ---------------------------------------------------------------------------------------------- delete


async def test_delete_removes_the_device_and_all_its_data(shared: Running) -> None:
    device_id, bystander = unique("del"), unique("keep")
    key = await shared.create_device(device_id)
    other_key = await shared.create_device(bystander)
    for k, d in ((key, device_id), (other_key, bystander)):
        assert await ingest(shared, k, {"ts": now_ms() - 1000, "t": 1, "mode": "eco"}) == 201
        r = await shared.client.post(f"/api/v1/nodes/{d}/telemetry", json={"state": {"motion": "1"}}, headers=ADMIN)
        assert r.status_code == 200
        await shared.services.queue.submit(
            Batch(events=[Event(d, now_ms(), "boot", {"reason": "power"})]), transport="http"
        )
    before = await count_rows(shared, device_id)
    assert before == {
        "telemetry": 2,
        "latest": 2,
        "device_state": 1,
        "state_history": 1,
        "events": 1,
        "claim_codes": 0,
        "devices": 1,
    }
    events = (await shared.client.get(f"/api/v1/devices/{device_id}/events", headers=ADMIN)).json()["events"]
    assert [(e["name"], e["payload"]) for e in events] == [("boot", {"reason": "power"})]

    r = await shared.client.delete(f"/api/v1/devices/{device_id}", headers=ADMIN)
    assert r.status_code == 204 and r.content == b""
    assert set((await count_rows(shared, device_id)).values()) == {0}
    assert await count_rows(shared, bystander) == before  # nobody else's data went with it
    assert (await shared.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)).status_code == 404
    assert (await shared.client.get(f"/api/v1/devices/{device_id}/latest", headers=ADMIN)).status_code == 404
    assert await ingest(shared, key, {"t": 1}) == 401  # its key died with it
    assert (await shared.client.delete(f"/api/v1/devices/{device_id}", headers=ADMIN)).status_code == 404
    # A new device of the same id starts empty.
    await shared.create_device(device_id)
    latest = (await shared.client.get(f"/api/v1/devices/{device_id}/latest", headers=ADMIN)).json()
    assert latest["values"] == {}


async def test_delete_removes_unclaimed_claim_codes(shared: Running) -> None:
    device_id = unique("claimdel")
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [device_id]}, headers=ADMIN)
    assert r.status_code == 201
    assert (await count_rows(shared, device_id))["claim_codes"] == 1
    assert (await shared.client.delete(f"/api/v1/devices/{device_id}", headers=ADMIN)).status_code == 204
    assert set((await count_rows(shared, device_id)).values()) == {0}
    code = r.json()["claim_codes"][0]["claim_code"]
    r = await shared.client.post("/api/v1/provision/claim", json={"claim_code": code})
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("path", ["rotate", "credentials"])
async def test_rotate_retires_the_old_key_at_once(shared: Running, path: str) -> None:
    device_id = unique("rot")
    old = await shared.create_device(device_id)
    assert await ingest(shared, old, {"t": 1}) == 201  # the old key is now in the auth cache
    r = await shared.client.post(f"/api/v1/devices/{device_id}/{path}", headers=ADMIN)
    assert r.status_code == 200, r.text
    new = r.json()["credentials"]["api_key"]
    assert new != old and r.json()["credentials"]["mqtt"] == {"username": device_id, "password": new}
    r = await shared.client.post("/api/v1/ingest", json={"t": 2}, headers={"X-API-Key": old})
    assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
    assert await ingest(shared, new, {"t": 3}) == 201
    r = await shared.client.post(f"/api/v1/devices/{unique('ghost')}/{path}", headers=ADMIN)
    assert r.status_code == 404


async def test_disabled_device_is_refused_until_enabled(shared: Running) -> None:
    device_id = unique("off")
    key = await shared.create_device(device_id)
    assert await ingest(shared, key, {"t": 1}) == 201
    r = await shared.client.patch(f"/api/v1/devices/{device_id}", json={"disabled": True}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["disabled"] is True
    r = await shared.client.post("/api/v1/ingest", json={"t": 2}, headers={"X-API-Key": key})
    assert r.status_code == 403 and "disabled" in r.json()["detail"]
    r = await shared.client.get(f"/api/v1/devices/{device_id}/latest", headers={"X-API-Key": key})
    assert r.status_code == 403
    # A fleet key may not write for it either; the admin still reads it.
    r = await shared.client.post(
        "/api/v1/ingest", json={"device_id": device_id, "t": 2}, headers={"X-API-Key": FLEET_KEY}
    )
    assert r.status_code == 403
    latest = (await shared.client.get(f"/api/v1/devices/{device_id}/latest", headers=ADMIN)).json()
    assert latest["values"]["t"]["value"] == 1.0
    r = await shared.client.patch(f"/api/v1/devices/{device_id}", json={"disabled": False}, headers=ADMIN)
    assert r.status_code == 200
    assert await ingest(shared, key, {"t": 3}) == 201


# ---------------------------------------------------------------------------------------------- claim codes


async def test_create_claim_codes_by_count_and_by_ids(shared: Running) -> None:
    prefix = unique("batch").replace("-", "")[:20]
    r = await shared.client.post(
        "/api/v1/claim-codes", json={"count": 3, "prefix": prefix, "model": "m-claim", "ttl_s": 3600}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    codes = r.json()["claim_codes"]
    assert len(codes) == 3 and len({c["device_id"] for c in codes}) == 3 and len({c["claim_code"] for c in codes}) == 3
    for c in codes:
        assert c["device_id"].startswith(f"{prefix}-") and c["expires_at"].endswith("Z")
        device = (await shared.client.get(f"/api/v1/devices/{c['device_id']}", headers=ADMIN)).json()
        assert device["model"] == "m-claim"
    ids = [unique("byid"), unique("byid")]
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": ids, "kind": "gateway"}, headers=ADMIN)
    assert r.status_code == 201
    assert [c["device_id"] for c in r.json()["claim_codes"]] == ids
    device = (await shared.client.get(f"/api/v1/devices/{ids[0]}", headers=ADMIN)).json()
    assert device["kind"] == "gateway"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({}, 422, "count"),
        ({"count": 1, "device_ids": ["x"]}, 422, "count"),
        ({"count": 0}, 422, "count"),
        ({"count": 1001}, 422, "count"),
        ({"device_ids": ["bad id"]}, 422, "device_ids.0"),
        ({"count": 1, "ttl_s": 5}, 422, "ttl_s"),
        ({"count": 1, "prefix": "a/b"}, 422, "prefix"),
    ],
)
async def test_claim_code_requests_refused(shared: Running, body: dict[str, Any], status: int, field: str) -> None:
    r = await shared.client.post("/api/v1/claim-codes", json=body, headers=ADMIN)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field


async def test_claim_codes_for_a_device_that_has_credentials_is_409(shared: Running) -> None:
    device_id = unique("hascreds")
    await shared.create_device(device_id)
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [device_id]}, headers=ADMIN)
    assert r.status_code == 409 and r.json()["field"] == "device_ids"


async def test_a_full_batch_of_claim_codes_reuses_unclaimed_devices_and_is_all_or_nothing(shared: Running) -> None:
    earlier = unique("again")
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [earlier]}, headers=ADMIN)
    assert r.status_code == 201
    ids = [earlier, *(unique("bulk") for _ in range(998)), earlier]  # one not yet claimed, named twice
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": ids, "model": "m-bulk"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    codes = r.json()["claim_codes"]
    assert [c["device_id"] for c in codes] == ids and len({c["claim_code"] for c in codes}) == 1000
    assert (await count_rows(shared, earlier))["claim_codes"] == 3 and (await count_rows(shared, ids[500]))[
        "devices"
    ] == 1
    for c in (codes[0], codes[500]):
        r = await shared.client.post("/api/v1/provision/claim", json={"claim_code": c["claim_code"]})
        assert r.status_code == 200 and r.json()["device"]["id"] == c["device_id"], r.text
    assert (await shared.client.get(f"/api/v1/devices/{ids[500]}", headers=ADMIN)).json()["model"] == "m-bulk"

    has_credentials = unique("creds")
    await shared.create_device(has_credentials)
    fresh = [unique("none") for _ in range(5)]
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [*fresh, has_credentials]}, headers=ADMIN)
    assert r.status_code == 409 and has_credentials in r.json()["detail"], r.text
    assert [(await count_rows(shared, d))["devices"] for d in fresh] == [0] * 5  # nothing of the batch was kept


@pytest.mark.parametrize("code", ["AAAA-BBBB-CCCC-DDDD", "nope"])
async def test_unknown_claim_code_is_404(shared: Running, code: str) -> None:
    r = await shared.client.post("/api/v1/provision/claim", json={"claim_code": code})
    assert r.status_code == 404 and r.json()["field"] == "claim_code"


async def test_claim_request_validation(shared: Running) -> None:
    for body in ({}, {"claim_code": "abc"}, {"claim_code": "x" * 65}, {"claim_code": "ABCD-EFGH", "extra": 1}):
        r = await shared.client.post("/api/v1/provision/claim", json=body)
        assert r.status_code == 422, body
        assert r.json()["field"], body


async def test_claim_code_exchanged_once_for_working_credentials(shared: Running) -> None:
    device_id = unique("claim")
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [device_id]}, headers=ADMIN)
    code = r.json()["claim_codes"][0]["claim_code"]
    async with lenient_client(shared) as client:
        # Typed by a person: lower case, without dashes.
        r = await client.post("/api/v1/provision/claim", json={"claim_code": code.lower().replace("-", "")})
        assert r.status_code == 200, r.text
        creds = r.json()["credentials"]
        assert r.json()["device"]["id"] == device_id
        assert creds["mqtt"] == {"username": device_id, "password": creds["api_key"]}
        assert await ingest(shared, creds["api_key"], {"t": 1}) == 201
        r = await client.post("/api/v1/provision/claim", json={"claim_code": code})
        assert r.status_code == 410 and r.json()["field"] == "claim_code"
    assert await ingest(shared, creds["api_key"], {"t": 2}) == 201  # the second try took nothing away


async def test_expired_claim_code_is_410(shared: Running) -> None:
    device_id = unique("expired")
    r = await shared.client.post("/api/v1/claim-codes", json={"device_ids": [device_id], "ttl_s": 60}, headers=ADMIN)
    code = r.json()["claim_codes"][0]["claim_code"]
    async with shared.services.engine.begin() as conn:  # move time: the code expired a second ago
        await conn.execute(update(ClaimCode).where(ClaimCode.device_id == device_id).values(expires_at=now_ms() - 1000))
    async with lenient_client(shared) as client:
        r = await client.post("/api/v1/provision/claim", json={"claim_code": code})
    assert r.status_code == 410, r.text
    assert "expired" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- races


async def test_concurrent_first_posts_of_a_new_device(shared: Running) -> None:
    """Seeds 000/001 turned concurrent first posts of one device into 500s (get-or-create race)."""
    device_id, node_id = unique("race"), unique("race-node")
    fleet = {"X-API-Key": FLEET_KEY}
    async with lenient_client(shared) as client:
        answers = await asyncio.gather(
            *(client.post("/api/v1/ingest", json={"device_id": device_id, "n": i}, headers=fleet) for i in range(20)),
            *(client.post(f"/api/v1/nodes/{node_id}/telemetry", json={"n": i}, headers=fleet) for i in range(20)),
        )
    assert [r.status_code for r in answers] == [201] * 20 + [200] * 20, [r.text for r in answers if r.is_error]
    for d in (device_id, node_id):
        counts = await count_rows(shared, d)
        assert counts["devices"] == 1
        assert counts["telemetry"] == 20  # no device time: 20 distinct server times, none lost
        history = (await shared.client.get(f"/api/v1/devices/{d}/telemetry?keys=n", headers=ADMIN)).json()
        assert sorted(p["value"] for p in history["series"]["n"]) == [float(i) for i in range(20)]


async def test_concurrent_creates_of_one_id_give_one_201(shared: Running) -> None:
    device_id = unique("twin")
    async with lenient_client(shared) as client:
        answers = await asyncio.gather(
            *(client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN) for _ in range(10))
        )
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [409] * 9
    winner = next(r for r in answers if r.status_code == 201).json()["credentials"]["api_key"]
    assert await ingest(shared, winner, {"t": 1}) == 201
