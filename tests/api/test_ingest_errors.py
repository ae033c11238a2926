"""Device-side HTTP ingest (SPEC §3, §4, PROTOCOLS.md): every refusal is a 4xx JSON body that names the
field — never a 500 — and every seed's payload shape is stored as its firmware sends it; a full queue
answers 503 with Retry-After and nothing it accepted is lost. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from telemetra.domain.timeutil import ms_to_iso, now_ms
from tests.api.shared_app import lenient_client, shared_app_fixture, unique
from tests.conftest import ADMIN, AppFactory, Running

FLEET_KEY = "fleet-key-for-the-ingest-tests-0123456789"
FLEET = {"X-API-Key": FLEET_KEY}
shared = shared_app_fixture(device_api_keys=[FLEET_KEY])
module_loop = pytest.mark.asyncio(loop_scope="module")


async def new_device(api: Running, prefix: str = "ing", **fields: Any) -> tuple[str, dict[str, str]]:
    device_id = unique(prefix)
    return device_id, {"X-API-Key": await api.create_device(device_id, **fields)}


async def latest(api: Running, device_id: str) -> dict[str, Any]:
    r = await api.client.get(f"/api/v1/devices/{device_id}/latest", headers=ADMIN)
    assert r.status_code == 200, r.text
    values: dict[str, Any] = r.json()["values"]
    return values


def nested(depth: int) -> dict[str, Any]:
    doc: Any = 1
    for i in range(depth):
        doc = {f"l{i}": doc}
    return doc


NOW_PLUS_DAY = "{future_ms}"
# (path, body: bytes or JSON, expected status, expected field)
BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("/api/v1/ingest", b'{"t": ', 400, "body"),
    ("/api/v1/ingest", b"", 400, "body"),
    ("/api/v1/ingest", b"   ", 400, "body"),
    ("/api/v1/ingest", b"\xff\xfe\x00", 400, "body"),
    ("/api/v1/ingest", b'{"t": NaN}', 400, "body"),
    ("/api/v1/ingest", b'{"t": 1e400}', 400, "body"),
    ("/api/v1/ingest", b'"a string"', 422, "body"),
    ("/api/v1/ingest", b"42", 422, "body"),
    ("/api/v1/ingest", b"null", 422, "body"),
    ("/api/v1/ingest", b"[1, 2]", 422, "body[0]"),
    ("/api/v1/ingest", b"[]", 422, "body"),
    ("/api/v1/ingest", {}, 422, "body"),
    ("/api/v1/ingest", {"t": None, "values": {}}, 422, "body"),
    ("/api/v1/ingest", {f"k{i}": i for i in range(257)}, 422, "body"),
    ("/api/v1/ingest", {"k" * 129: 1}, 422, "body." + "k" * 32 + "…"),
    ("/api/v1/ingest", nested(9), 422, "body.l8.l7.l6.l5.l4.l3.l2.l1"),
    ("/api/v1/ingest", {"s": "x" * 1025}, 422, "body.s"),
    ("/api/v1/ingest", {"a.b": 1, "a": {"b": 2}}, 422, "body"),
    ("/api/v1/ingest", {"bad\u0001key": 1}, 422, "body"),
    ("/api/v1/ingest", {"ts": -5, "t": 1}, 422, "body.ts"),  # (0 is a clock that was never set: see test_device_clock)
    ("/api/v1/ingest", {"ts": "1969-12-31T23:59:59Z", "t": 1}, 422, "body.ts"),
    ("/api/v1/ingest", {"ts": "2100-01-01T00:00:00Z", "t": 1}, 422, "body.ts"),
    ("/api/v1/ingest", {"ts": NOW_PLUS_DAY, "t": 1}, 422, "body.ts"),
    ("/api/v1/ingest", {"ts": "soon", "t": 1}, 422, "body.ts"),
    ("/api/v1/ingest", {"timestamp": True, "t": 1}, 422, "body.timestamp"),
    ("/api/v1/ingest", {"device_id": "no spaces allowed", "t": 1}, 422, "body.device_id"),
    ("/api/v1/ingest", {"device_id": 12, "t": 1}, 422, "body.device_id"),
    ("/api/v1/ingest", [{"t": 1}, {"ts": "garbage", "t": 2}], 422, "body[1].ts"),
    ("/api/v1/ingest/batch", {"t": 1}, 422, "body"),
    ("/api/v1/ingest/batch", {"readings": []}, 422, "readings"),
    ("/api/v1/ingest/batch", {"readings": [{"t": 1}, "x"]}, 422, "readings[1]"),
    ("/api/v1/ingest/batch", [{"t": 1}] * 1001, 422, "body"),
    ("/api/v1/ingest/batch", b"[{]", 400, "body"),
    ("/api/v1/nodes/{me}/telemetry", [{"uptime": 1}], 422, "body"),
    ("/api/v1/nodes/{me}/telemetry", {"state": ["motion"]}, 422, "body.state"),
    ("/api/v1/nodes/{me}/telemetry", {"state": {"m": {"deep": 1}}}, 422, "body.state.m"),
    ("/api/v1/nodes/{me}/telemetry", {"name": {"x": 1}}, 422, "body.name"),
    ("/api/v1/nodes/{me}/telemetry", {"uptime": "x" * 2000}, 422, "body.uptime"),
    ("/api/v1/nodes/{me}/telemetry", b"{", 400, "body"),
    ("/api/v1/devices/{me}/telemetry", {"firmware": ["1"]}, 422, "body.firmware"),
    ("/api/v1/ingest", b'{"label": "a\\u0000b"}', 422, "body.label"),
    ("/api/v1/ingest", {"values": {"label": "a\x00b"}}, 422, "body.values.label"),
    ("/api/v1/ingest/batch", [{"t": 1}, {"s": {"x": "\x00"}}], 422, "body[1].s.x"),
    ("/api/v1/nodes/{me}/telemetry", {"name": "pir\x00"}, 422, "body.name"),
    ("/api/v1/nodes/{me}/telemetry", {"state": {"motion": "1\x00"}}, 422, "body.state.motion"),
    ("/api/v1/nodes/{me}/telemetry", {"firmware": "1.0\x00"}, 422, "body.firmware"),
    ("/api/v1/nodes/bad%20id/telemetry", {"uptime": 1}, 422, "device_id"),
    ("/api/v1/nodes/bad%00id/telemetry", {"uptime": 1}, 422, "device_id"),
    ("/api/v1/nodes/" + "x" * 129 + "/telemetry", {"uptime": 1}, 422, "device_id"),
]


@module_loop
@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    BAD_INPUTS,
    ids=[f"{i:02d}-{field}" for i, (_, _, _, field) in enumerate(BAD_INPUTS)],
)
async def test_bad_input_is_4xx_naming_the_field(
    shared: Running, path: str, body: Any, status: int, field: str
) -> None:
    device_id, headers = await new_device(shared, kind="gateway")  # a gateway may use every path below
    if body == {"ts": NOW_PLUS_DAY, "t": 1}:
        body = {"ts": now_ms() + 86_400_000, "t": 1}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with lenient_client(shared) as client:
        r = await client.post(
            path.replace("{me}", device_id),
            content=content,
            headers={**headers, "Content-Type": "application/json"},
        )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    answer = r.json()
    assert answer["field"] == field, answer
    assert answer["detail"] and answer["code"]
    assert await latest(shared, device_id) == {}  # nothing of a refused message is stored


@module_loop
async def test_device_id_in_body_must_match_the_key(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    other, _ = await new_device(shared)
    for path, body, field in (
        ("/api/v1/ingest", {"device_id": other, "t": 1}, "body[0].device_id"),
        ("/api/v1/ingest/batch", [{"t": 1}, {"device": other, "t": 1}], "body[1].device_id"),
    ):
        r = await shared.client.post(path, json=body, headers=headers)
        assert r.status_code == 403, r.text
        assert r.json()["field"] == field
    r = await shared.client.post(f"/api/v1/nodes/{other}/telemetry", json={"uptime": 1}, headers=headers)
    assert r.status_code == 403 and r.json()["field"] == "device_id"
    assert await latest(shared, other) == {} and await latest(shared, device_id) == {}
    # Naming itself is fine, by any of the names seeds use.
    for name in ("device_id", "device", "deviceId"):
        r = await shared.client.post("/api/v1/ingest", json={name: device_id, name + "_t": 1}, headers=headers)
        assert r.status_code == 201, r.text


@module_loop
async def test_oversize_payload_is_413(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    limit = shared.settings.max_payload_bytes
    big = orjson.dumps({"s": "x" * limit})
    async with lenient_client(shared) as client:
        r = await client.post("/api/v1/ingest", content=big, headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body"
        assert str(limit) in r.json()["detail"]

        # Without a Content-Length (chunked): the size is checked on the body itself.
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        r = await client.post("/api/v1/ingest/batch", content=chunks(), headers=headers)
        assert r.status_code == 413, r.text
        assert "content-length" not in r.request.headers
    assert await latest(shared, device_id) == {}


@module_loop
async def test_arrays_flatten_and_accepted_answer_counts(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    body = {"values": {"cells": [3.1, 3.2], "pack": [{"v": 1, "ok": True}, {"v": 2, "note": "x"}]}}
    r = await shared.client.post("/api/v1/ingest", json=body, headers=headers)
    assert r.status_code == 201
    answer = r.json()
    assert {k: answer[k] for k in ("status", "device_ids", "messages", "points", "accepted", "device_id")} == {
        "status": "accepted",
        "device_ids": [device_id],
        "messages": 1,
        "points": 6,
        "accepted": True,
        "device_id": device_id,
    }
    values = await latest(shared, device_id)
    assert {k: v["value"] for k, v in values.items()} == {
        "cells.0": 3.1,
        "cells.1": 3.2,
        "pack.0.v": 1.0,
        "pack.0.ok": True,
        "pack.1.v": 2.0,
        "pack.1.note": "x",
    }


@module_loop
async def test_random_documents_never_cause_a_500(shared: Running) -> None:
    """Random JSON (seeded) through both ingest paths and the node path: 201/200 or a named 4xx."""
    _, headers = await new_device(shared, kind="gateway")
    rng = random.Random(1123)

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 3 or roll < 0.5:
            return rng.choice(
                [None, True, False, 0, -1, 1e308, -1e-308, 2**63, 2**64 - 1, 3.5, "", "x", "ä€", "1e400", "inf"]
            )
        if roll < 0.75:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        keys = ["a", "b.c", "", "ts", "timestamp", "values", "metrics", "device_id", "state", "name", "readings"]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}

    async with lenient_client(shared) as client:
        for i in range(120):
            doc = value(0)
            doc = {k: v for k, v in doc.items() if k not in ("ts", "timestamp")} if isinstance(doc, dict) else doc
            path = ("/api/v1/ingest", "/api/v1/ingest/batch", f"/api/v1/nodes/{unique('n')}/telemetry")[i % 3]
            r = await client.post(
                path, content=orjson.dumps(doc), headers={**headers, "Content-Type": "application/json"}
            )
            assert r.status_code in (200, 201, 400, 403, 422), (path, doc, r.status_code, r.text)
            if r.status_code >= 400:
                assert r.json()["field"], (path, doc, r.text)


# ---------------------------------------------------------------------------------------------- seeds


@module_loop
async def test_seed_000_node_post(shared: Running) -> None:
    gateway, gw_headers = await new_device(shared, "mesh-gw", kind="gateway")
    node = unique("pir")
    payload = {
        "name": "pir1",
        "uptime": 120,
        "heap_free": 180000,
        "peer_count": 3,
        "role": "PIR",
        "firmware": "1.0.0",
        "state": {"motion": "1"},
    }
    r = await shared.client.post(f"/api/v1/nodes/{node}/telemetry", json=payload, headers=gw_headers)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "ok" and answer["node_id"] == node and answer["timestamp"].endswith("Z")
    values = await latest(shared, node)
    assert {k: v["value"] for k, v in values.items()} == {"uptime": 120.0, "heap_free": 180000.0, "peer_count": 3.0}
    device = (await shared.client.get(f"/api/v1/devices/{node}", headers=ADMIN)).json()
    assert (device["name"], device["role"], device["fw_version"]) == ("pir1", "PIR", "1.0.0")
    assert device["parent_id"] == gateway and device["online"] is True

    async def state() -> dict[str, Any]:
        body: dict[str, Any] = (await shared.client.get(f"/api/v1/devices/{node}/state", headers=ADMIN)).json()
        return body["state"]

    first = await state()
    assert first["motion"]["value"] == "1" and first["motion"]["version"] == 1
    # The same value again: no new version, no history entry.
    r = await shared.client.post(f"/api/v1/nodes/{node}/telemetry", json={"state": {"motion": "1"}}, headers=gw_headers)
    assert r.status_code == 200
    assert (await state())["motion"]["version"] == 1
    # A change: version 2, and the history has both values, newest first.
    r = await shared.client.post(
        f"/api/v1/nodes/{node}/telemetry",
        json={"state": {"motion": "0", "armed": True}, "firmware": "1.1.0"},
        headers=gw_headers,
    )
    assert r.status_code == 200
    now_state = await state()
    assert now_state["motion"]["value"] == "0" and now_state["motion"]["version"] == 2
    assert now_state["armed"] == {"value": "true", "ts": now_state["armed"]["ts"], "version": 1}
    history = (await shared.client.get(f"/api/v1/devices/{node}/state/history", headers=ADMIN)).json()["history"]
    assert [(h["key"], h["value"]) for h in history if h["key"] == "motion"] == [("motion", "0"), ("motion", "1")]
    everyone = {(s["node_id"], s["key"]): s for s in (await shared.client.get("/api/v1/state", headers=ADMIN)).json()}
    assert everyone[(node, "motion")]["value"] == "0" and everyone[(node, "armed")]["value"] == "true"
    device = (await shared.client.get(f"/api/v1/devices/{node}", headers=ADMIN)).json()
    assert device["fw_version"] == "1.1.0" and device["name"] == "pir1"  # absent fields are left alone


@module_loop
async def test_seed_001_flat_and_metrics_shapes(shared: Running) -> None:
    device_id, headers = await new_device(shared, "esp32")
    r = await shared.client.post(
        "/api/v1/ingest",
        json={"device_id": device_id, "metrics": {"temperature": 31.4, "humidity": 62.1, "voltage": 3.91}},
        headers=headers,
    )
    assert r.status_code == 201 and r.json()["points"] == 3
    r = await shared.client.post("/api/v1/ingest", json={"temperature": 22.5, "humidity": 65}, headers=headers)
    assert r.status_code == 201
    values = await latest(shared, device_id)
    assert {k: v["value"] for k, v in values.items()} == {"temperature": 22.5, "humidity": 65.0, "voltage": 3.91}
    # With a shared DEVICE_API_KEYS key, for a device the server has never seen.
    fresh = unique("esp32")
    r = await shared.client.post("/api/v1/ingest", json={"device_id": fresh, "metrics": {"t": 1.5}}, headers=FLEET)
    assert r.status_code == 201 and r.json()["device_ids"] == [fresh]
    assert (await latest(shared, fresh))["t"]["value"] == 1.5


@module_loop
async def test_seed_003_nested_payload_with_device_and_ms_timestamp(shared: Running) -> None:
    site = unique("site")
    ts = now_ms() - 60_000
    payload = {
        "device": site,
        "timestamp": ts,
        "temperature": {"inlet": 45.1, "outlet": 50.2, "ambient": 25.0, "compressor": 70.3},
        "electrical": {"voltage": 230.1, "current": 8.4, "power": 1932},
        "pressure": {"high": 280.0, "low": 70.1},
        "status": {"compressor": True, "fan": True, "defrost": False},
        "alerts": {"high_temp": False},
    }
    for _ in range(2):  # a redelivery is stored once
        r = await shared.client.post("/api/v1/ingest", json=payload, headers=FLEET)
        assert r.status_code == 201, r.text
        assert r.json()["points"] == 13
    values = await latest(shared, site)
    assert values["temperature.inlet"] == {"ts": ms_to_iso(ts), "value": 45.1}
    assert values["electrical.power"]["value"] == 1932.0
    assert values["status.defrost"]["value"] is False and values["status.fan"]["value"] is True
    assert len(values) == 13 and {v["ts"] for v in values.values()} == {ms_to_iso(ts)}
    history = (await shared.client.get(f"/api/v1/devices/{site}/telemetry?range=1h", headers=ADMIN)).json()
    assert sum(len(points) for points in history["series"].values()) == 13


@module_loop
async def test_messages_without_device_time_in_one_batch_are_all_kept(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    r = await shared.client.post("/api/v1/ingest/batch", json=[{"t": 1}, {"t": 2}, {"t": 3}], headers=headers)
    assert r.status_code == 201 and r.json()["messages"] == 3
    history = (await shared.client.get(f"/api/v1/devices/{device_id}/telemetry", headers=ADMIN)).json()
    points = history["series"]["t"]
    assert [p["value"] for p in points] == [1.0, 2.0, 3.0]  # in order, on distinct server times
    assert len({p["ts"] for p in points}) == 3
    assert (await latest(shared, device_id))["t"]["value"] == 3.0


# ---------------------------------------------------------------------------------------------- backpressure


async def test_full_queue_answers_503_with_retry_after_and_loses_nothing_accepted(app_factory: AppFactory) -> None:
    async with app_factory(ingest_queue_max_points=100, ingest_retry_after_s=2) as t:
        key = await t.create_device("flood")
        base = now_ms() - 3_600_000
        r = await t.client.post("/api/v1/ingest", json={"warm": 1}, headers={"X-API-Key": key})
        assert r.status_code == 201  # the key is now in the auth cache: the flood goes straight to the queue
        async with lenient_client(t) as client:
            # 60 messages of 10 points against room for 100: they reach the queue faster than one commit.
            answers = await asyncio.gather(
                *(
                    client.post(
                        "/api/v1/ingest",
                        json={"ts": base + i, **{f"k{j}": i for j in range(10)}},
                        headers={"X-API-Key": key},
                    )
                    for i in range(60)
                )
            )
        statuses = [r.status_code for r in answers]
        assert set(statuses) <= {201, 503}, statuses
        refused = [i for i, r in enumerate(answers) if r.status_code == 503]
        accepted = [i for i, r in enumerate(answers) if r.status_code == 201]
        assert refused, "the queue never filled up"
        assert accepted, "nothing was accepted"
        for i in refused:
            assert answers[i].headers["Retry-After"] == "2"
            assert answers[i].json()["code"] == "overloaded" and answers[i].json()["detail"]
        for i in accepted:
            assert answers[i].json()["points"] == 10
        history = (
            await t.client.get(f"/api/v1/devices/flood/telemetry?keys=k0&start={base}&limit=1000", headers=ADMIN)
        ).json()
        stored = sorted(int(p["value"]) for p in history["series"].get("k0", []))
        assert stored == accepted  # every 201 is stored, no 503 is
        # Each accepted message is whole: all ten keys.
        count = (
            await t.client.get(
                f"/api/v1/devices/flood/telemetry?start={base}&limit=10000&keys={','.join(f'k{j}' for j in range(10))}",
                headers=ADMIN,
            )
        ).json()
        assert sum(len(v) for v in count["series"].values()) == 10 * len(accepted)
        # Once drained, a retry goes through.
        r = await t.client.post("/api/v1/ingest", json={"ts": base + refused[0], "k0": 0}, headers={"X-API-Key": key})
        assert r.status_code == 201


@module_loop
async def test_malformed_json_on_the_claim_path_names_the_body(shared: Running) -> None:
    r = await shared.client.post(
        "/api/v1/provision/claim", content=b'{"claim_code": ', headers={"Content-Type": "application/json"}
    )
    assert r.status_code in (400, 422), r.text
    assert r.json()["field"] == "body"
