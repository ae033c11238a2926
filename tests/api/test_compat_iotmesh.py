"""iotmesh's clients against Telemetra, each sending exactly what it sends and parsing what it parses
(CLIENTS.md §1.1–§1.5): the gateway firmware's telemetry posts, the React dashboard, the HTML test console
and the OTA test suite's health precheck. None of them sends a key: the app trusts the test client's
network with the operator role, as a user's setup would (or its nginx would add an operator key).
OTA calls are the OTA suite's."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from tests.api.shared_app import shared_app_fixture, unique
from tests.conftest import Running

shared = shared_app_fixture(trusted_networks=["127.0.0.1/32"], trusted_role="operator")
pytestmark = pytest.mark.asyncio(loop_scope="module")

# What the gateway sets on every POST (Arduino HTTPClient), and no key by default.
GATEWAY_HEADERS = {"Content-Type": "application/json"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def telemetry(name: str, *, uptime: int, peers: int, role: str = "PEER", **state: str) -> dict[str, Any]:
    """MeshSwarm's telemetry JSON (gateway's own and forwarded alike)."""
    return {
        "name": name,
        "uptime": uptime,
        "heap_free": 180_000,
        "peer_count": peers,
        "role": role,
        "firmware": "1.0.0",
        "state": {"led": "1", "motion": "0", **state},
    }


def js_date(text: str) -> datetime:
    """What ``new Date()`` needs: an explicit UTC designator, exactly one."""
    assert isinstance(text, str) and ISO_Z.match(text), text
    return datetime.fromisoformat(text)


def node_id() -> str:
    # painlessMesh ids: lowercase hex without zero padding.
    return unique("n").split("-")[1][:8].lstrip("0") or "1"


async def post(shared: Running, node: str, body: dict[str, Any]) -> Any:
    r = await shared.client.post(f"/api/v1/nodes/{node}/telemetry", json=body, headers=GATEWAY_HEADERS)
    assert r.status_code in (200, 201), r.text  # G1/G2: the gateway takes 200 or 201
    return r.json()


async def test_gateway_posts_for_itself_and_forwards_mesh_nodes(shared: Running) -> None:
    gateway, pir = node_id(), node_id()
    answer = await post(shared, gateway, telemetry("Gateway", uptime=120, peers=2, role="COORD", time="1795428000"))
    assert answer["status"] == "ok" and answer["node_id"] == gateway and ISO_Z.match(answer["timestamp"])
    await post(shared, pir, telemetry("PIR", uptime=30, peers=2, motion="1"))

    # Dashboard and test console: bare arrays, the fields and types they read.
    r = await shared.client.get("/api/v1/nodes")
    assert r.status_code == 200
    nodes = r.json()
    assert isinstance(nodes, list)
    seen = [js_date(n["last_seen"]) for n in nodes]
    assert seen == sorted(seen, reverse=True)  # most recently heard from first
    mine = {n["id"]: n for n in nodes if n["id"] in (gateway, pir)}
    assert set(mine) == {gateway, pir}
    node = mine[gateway]
    assert set(node) >= {"id", "name", "is_online", "role", "firmware_version", "last_seen", "first_seen"}
    assert (node["name"], node["role"], node["firmware_version"]) == ("Gateway", "COORD", "1.0.0")
    assert node["is_online"] is True and node["peer_count"] == 2 and isinstance(node["peer_count"], int)
    assert node["ip_address"] is None
    assert js_date(node["first_seen"]) <= js_date(node["last_seen"])

    r = await shared.client.get("/api/v1/state")
    assert r.status_code == 200
    state = [s for s in r.json() if s["node_id"] in (gateway, pir)]
    assert all(isinstance(s["key"], str) and isinstance(s["value"], str) for s in state)
    assert {(s["node_id"], s["key"]): s["value"] for s in state} == {
        (gateway, "led"): "1",
        (gateway, "motion"): "0",
        (gateway, "time"): "1795428000",
        (pir, "led"): "1",
        (pir, "motion"): "1",
    }
    assert all(s["version"] == 1 and js_date(s["updated_at"]) for s in state)
    # No timestamp is sent: telemetry is stamped on receipt; uptime (seconds since boot) is a series.
    r = await shared.client.get(f"/api/v1/nodes/{pir}/history?hours=1")
    history = r.json()
    assert r.status_code == 200 and isinstance(history, list) and len(history) == 1
    assert history[0] | {"time": None} == {
        "time": None,
        "node_id": pir,
        "heap_free": 180_000,
        "uptime_sec": 30,
        "peer_count": 2,
        "role": "PEER",
    }
    assert abs((datetime.now().astimezone() - js_date(history[0]["time"])).total_seconds()) < 60


async def test_state_version_increments_only_on_change_and_history_is_newest_first(shared: Running) -> None:
    node = node_id()
    await post(shared, node, telemetry("LED", uptime=10, peers=1, led="0"))
    await post(shared, node, telemetry("LED", uptime=40, peers=1, led="0"))
    await post(shared, node, telemetry("LED", uptime=70, peers=3, led="1"))
    r = await shared.client.get(f"/api/v1/nodes/{node}/state")
    assert r.status_code == 200
    by_key = {s["key"]: s for s in r.json()}
    assert by_key["led"]["value"] == "1" and by_key["led"]["version"] == 2
    assert by_key["motion"]["version"] == 1
    history = (await shared.client.get(f"/api/v1/nodes/{node}/history")).json()
    assert [h["uptime_sec"] for h in history] == [70, 40, 10]
    assert [h["peer_count"] for h in history] == [3, 1, 1]


async def test_dashboard_rename_and_delete_answer_json(shared: Running) -> None:
    node = node_id()
    await post(shared, node, telemetry("BTN", uptime=5, peers=0))
    r = await shared.client.put(f"/api/v1/nodes/{node}/name", json={"name": "Front door"})
    assert r.status_code == 200 and r.json()["name"] == "Front door" and r.json()["id"] == node
    r = await shared.client.get(f"/api/v1/nodes/{node}")
    assert r.status_code == 200 and r.json()["name"] == "Front door"

    r = await shared.client.delete(f"/api/v1/nodes/{node}")
    assert r.status_code == 200  # not 204: the dashboard calls response.json() on every success
    assert isinstance(r.json()["message"], str)
    r = await shared.client.get(f"/api/v1/nodes/{node}")
    assert r.status_code == 404 and r.json()["detail"] == "Node not found"
    assert node not in {n["id"] for n in (await shared.client.get("/api/v1/nodes")).json()}
    r = await shared.client.get("/api/v1/nodes/never-there/history?hours=1")
    assert r.status_code == 404


async def test_history_hours_are_bounded_like_the_original(shared: Running) -> None:
    node = node_id()
    await post(shared, node, telemetry("DHT", uptime=5, peers=0))
    for hours in (0, 169):
        r = await shared.client.get(f"/api/v1/nodes/{node}/history?hours={hours}")
        assert r.status_code == 422 and r.json()["field"] == "hours"


async def test_gateway_with_its_optional_key(shared: Running) -> None:
    """TELEMETRY_KEY set: the gateway sends it as X-API-Key; as a Telemetra gateway its nodes are its children."""
    gateway = node_id()
    key = await shared.create_device(gateway, kind="gateway")
    child = node_id()
    r = await shared.client.post(
        f"/api/v1/nodes/{child}/telemetry",
        json=telemetry("PIR", uptime=3, peers=1),
        headers={**GATEWAY_HEADERS, "X-API-Key": key},
    )
    assert r.status_code == 200, r.text
    node = (await shared.client.get(f"/api/v1/nodes/{child}")).json()
    assert node["role"] == "PEER" and node["is_online"] is True


async def test_the_test_suites_health_precheck(shared: Running) -> None:
    r = await shared.client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy" and js_date(body["timestamp"])
