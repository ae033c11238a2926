"""No client value reaches the database unchecked (issue 6, item 7): a NUL in a path, query or body value,
an integer past 64 bits, NaN, a lone surrogate, or a document too deep is a 4xx naming the field — on
PostgreSQL (which refuses NUL in text and big integers in BIGINT) as on SQLite. Each case was a 500 before
the shared parameter types of ``telemetra.api.fields``. Also the gateway rules of item 8: no data for a
disabled child, no reserved ids auto-registered."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.api.shared_app import lenient_client, shared_app_fixture, unique
from tests.conftest import ADMIN, Running

shared = shared_app_fixture()
pytestmark = pytest.mark.asyncio(loop_scope="module")

BIG = 99999999999999999999  # past 2**64
D = "{D}"  # replaced by the module's device


async def send(client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    """The body as a permissive client writes it: ``json.dumps`` escapes lone surrogates and writes NaN
    (httpx's own encoder refuses both, so it could not send what a real client may)."""
    if body is None:
        return await client.request(method, path, headers=headers)
    content = json.dumps(body).encode()
    return await client.request(method, path, content=content, headers={**headers, "content-type": "application/json"})


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# (method, path, JSON body or None, the field the refusal must name)
CASES: list[tuple[str, str, Any, str]] = [
    # Path values.
    ("GET", "/api/v1/devices/a%00b", None, "device_id"),
    ("GET", "/api/v1/devices/a%00b/latest", None, "device_id"),
    ("GET", "/api/devices/a%00b/readings", None, "device_id"),
    ("PATCH", "/api/v1/devices/a%00b", {"notes": "x"}, "device_id"),
    ("GET", f"/api/v1/devices/{'x' * 129}", None, "device_id"),
    ("GET", f"/api/v1/devices/{D}/commands/a%00b", None, "command_id"),
    ("POST", "/api/v1/device/commands/a%00b/ack", {"status": "ok"}, "command_id"),
    ("POST", f"/api/v1/alerts/{BIG}/clear", None, "alert_id"),
    ("POST", f"/api/v1/alerts/{BIG}/acknowledge", None, "alert_id"),
    ("POST", "/api/v1/nodes/a%00b/telemetry", {"uptime": 1}, "device_id"),
    # Query values.
    ("GET", "/api/v1/devices?search=a%00b", None, "search"),
    ("GET", "/api/v1/devices?model=a%00b", None, "model"),
    ("GET", f"/api/v1/devices?model={'m' * 129}", None, "model"),
    ("GET", "/api/v1/devices?kind=a%00b", None, "kind"),
    ("GET", f"/api/v1/devices?offset={BIG}", None, "offset"),
    ("GET", f"/api/v1/devices/{D}/latest?keys=a%00b", None, "keys"),
    ("GET", f"/api/v1/devices/{D}/telemetry?keys=t,a%00b", None, "keys"),
    ("GET", f"/api/v1/devices/{D}/aggregate?keys=a%00b", None, "keys"),
    ("GET", f"/api/v1/devices/{D}/telemetry/export?keys=a%00b", None, "keys"),
    ("GET", f"/api/v1/devices/{D}/events?name=a%00b", None, "name"),
    ("GET", f"/api/v1/devices/{D}/commands?status=a%00b", None, "status"),
    ("GET", "/api/v1/alerts?device_id=a%00b", None, "device_id"),
    ("GET", "/api/v1/rejected?device_id=a%00b", None, "device_id"),
    ("GET", f"/api/v1/devices/{D}/telemetry?cursor={_cursor(f'{BIG}:t')}", None, "cursor"),
    ("GET", f"/api/v1/devices/{D}/telemetry?cursor={_cursor('1:a' + chr(0) + 'b')}", None, "cursor"),
    ("GET", "/api/v1/device/commands?wait=nan", None, "wait"),
    # Body values.
    ("POST", "/api/v1/devices", {"name": "a\x00b"}, "name"),
    ("POST", "/api/v1/devices", {"notes": "a\x00b"}, "notes"),
    ("POST", "/api/v1/devices", {"model": "a\x00b"}, "model"),
    ("POST", "/api/v1/devices", {"metadata": {"a": "b\x00"}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a\x00": 1}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a": BIG}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a": [1, {"b": -BIG}]}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a": "\ud800"}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a": float("nan")}}, "metadata"),
    ("POST", "/api/v1/devices", {"metadata": {"a": float("inf")}}, "metadata"),
    (
        "POST",
        "/api/v1/devices",
        {"metadata": {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}},
        "metadata",
    ),
    ("POST", "/api/v1/devices", {"id": "admin"}, "id"),
    ("POST", "/api/v1/devices", {"id": "Telemetra-svc"}, "id"),
    ("POST", "/api/v1/devices", {"id": ".."}, "id"),
    ("PATCH", f"/api/v1/devices/{D}", {"name": "a\x00b"}, "name"),
    ("PATCH", f"/api/v1/devices/{D}", {"metadata": {"a": BIG}}, "metadata"),
    ("POST", f"/api/v1/devices/{D}/commands", {"name": "a\x00b"}, "name"),
    ("POST", f"/api/v1/devices/{D}/commands", {"name": "reboot", "params": {"delay": BIG}}, "params"),
    ("POST", f"/api/v1/devices/{D}/commands", {"name": "reboot", "params": {"why": "a\x00"}}, "params"),
    ("POST", "/api/v1/claim-codes", {"count": 1, "model": "a\x00b"}, "model"),
    ("POST", "/api/v1/claim-codes", {"device_ids": ["root"]}, "device_ids"),
    ("POST", "/api/v1/claim-codes", {"device_ids": ["a\x00b"]}, "device_ids.0"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def device(shared: Running) -> tuple[str, str]:
    device_id = unique("valid")
    return device_id, await shared.create_device(device_id)


@pytest.mark.parametrize(("method", "path", "body", "field"), CASES, ids=[f"{c[0]} {c[1][:60]} {c[3]}" for c in CASES])
async def test_refused_with_the_field_named(
    shared: Running, device: tuple[str, str], method: str, path: str, body: Any, field: str
) -> None:
    device_id, key = device
    # The device-side paths take the device's own key; everything else the admin's.
    headers = {"X-API-Key": key} if path.startswith("/api/v1/device/") else ADMIN
    async with lenient_client(shared) as client:
        r = await send(client, method, path.replace(D, device_id), body, headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    answer = r.json()
    assert answer["field"] == field, answer
    assert answer["code"] and answer["detail"], answer


async def test_the_same_values_within_bounds_are_taken(shared: Running, device: tuple[str, str]) -> None:
    """Positive control: the bounds are the database's, not tighter — 64-bit integers, unicode text and a
    31-level document are stored and read back as sent."""
    device_id, _ = device
    limit = 2**63 - 1
    deep: Any = 1
    for _ in range(31):
        deep = [deep]
    body = {"name": "Küche ☃", "metadata": {"max": limit, "min": -limit - 1, "deep": deep, "t": "é"}}
    r = await shared.client.patch(f"/api/v1/devices/{device_id}", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    r = await shared.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)
    assert r.json()["name"] == "Küche ☃" and r.json()["metadata"] == body["metadata"]
    r = await shared.client.post(
        f"/api/v1/devices/{device_id}/commands", json={"name": "set", "params": {"n": limit}}, headers=ADMIN
    )
    assert r.status_code == 201 and r.json()["params"] == {"n": limit}, r.text
    r = await shared.client.get(f"/api/v1/devices?offset={limit}", headers=ADMIN)
    assert r.status_code == 200 and r.json()["devices"] == [], r.text


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"interval_s": BIG}, "interval_s"),
        ({"led": "on", "label": "a\x00"}, "label"),
        ({"nested": {"deeper": [float("nan")]}}, "nested"),
        ({"a\x00": 1}, None),  # a bad key: the refusal says which in its detail
    ],
)
async def test_a_refused_desired_config_changes_nothing(
    shared: Running, device: tuple[str, str], config: dict[str, Any], field: str | None
) -> None:
    device_id, _ = device
    r = await shared.client.put(f"/api/v1/devices/{device_id}/config", json={"interval_s": 60}, headers=ADMIN)
    assert r.status_code == 200, r.text
    before = (await shared.client.get(f"/api/v1/devices/{device_id}/config", headers=ADMIN)).json()

    async with lenient_client(shared) as client:
        r = await send(client, "PUT", f"/api/v1/devices/{device_id}/config", config, ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and r.json()["code"] == "invalid", r.text
    after = (await shared.client.get(f"/api/v1/devices/{device_id}/config", headers=ADMIN)).json()
    assert after == before  # not saved: neither the document nor a new version


# ---------------------------------------------------------------------------------------------- gateways


async def _gateway(shared: Running) -> tuple[str, dict[str, str]]:
    gateway = unique("gw")
    return gateway, {"X-API-Key": await shared.create_device(gateway, kind="gateway")}


@pytest.mark.parametrize("path", ["/api/v1/nodes/{c}/telemetry", "/api/v1/devices/{c}/telemetry"])
async def test_a_gateway_cannot_post_for_its_disabled_child(shared: Running, path: str) -> None:
    gateway, headers = await _gateway(shared)
    child = unique("child")
    await shared.create_device(child, parent_id=gateway)
    url = path.format(c=child)
    assert (await shared.client.post(url, json={"uptime": 1}, headers=headers)).status_code == 200  # control
    r = await shared.client.patch(f"/api/v1/devices/{child}", json={"disabled": True}, headers=ADMIN)
    assert r.status_code == 200, r.text

    r = await shared.client.post(url, json={"uptime": 2}, headers=headers)
    assert r.status_code == 403 and r.json()["field"] == "device_id", r.text
    r = await shared.client.post("/api/v1/ingest", json={"device_id": child, "uptime": 3}, headers=headers)
    assert r.status_code == 403 and r.json()["field"] == "device_id", r.text
    latest = (await shared.client.get(f"/api/v1/devices/{child}/latest", headers=ADMIN)).json()
    assert latest["values"]["uptime"]["value"] == 1.0  # nothing after the control


@pytest.mark.parametrize("child", ["admin", "ROOT", "telemetra", "telemetra-svc", "telemetra_collector", ".", ".."])
async def test_a_gateway_cannot_auto_register_a_reserved_id(shared: Running, child: str) -> None:
    _, headers = await _gateway(shared)
    r = await shared.client.post("/api/v1/ingest", json={"device_id": child, "t": 1}, headers=headers)
    assert r.status_code == 403 and r.json()["field"] == "device_id", r.text
    if child.strip("."):  # "." and ".." are no path segment at all
        r = await shared.client.post(f"/api/v1/nodes/{child}/telemetry", json={"uptime": 1}, headers=headers)
        assert r.status_code == 403 and r.json()["field"] == "device_id", r.text
    r = await shared.client.get(f"/api/v1/devices?search={child}", headers=ADMIN)
    assert all(d["id"].lower() != child.lower() for d in r.json()["devices"])


async def test_admin_node_posts_do_not_auto_register_a_reserved_id(shared: Running) -> None:
    r = await shared.client.post("/api/v1/nodes/admin/telemetry", json={"uptime": 1}, headers=ADMIN)
    assert r.status_code == 403 and r.json()["field"] == "device_id", r.text


async def test_a_gateway_auto_registers_iotmesh_node_ids(shared: Running) -> None:
    """Positive control: what real gateways send (iotmesh: lowercase hex painlessMesh ids, 1-8 characters;
    names like ``ruuvi_cabin``) is still registered as the gateway's child."""
    gateway, headers = await _gateway(shared)
    suffix = unique("x")[-6:]
    for node in (f"a1{suffix}", f"{suffix[:1]}", f"ruuvi_cabin-{suffix}", f"admin-{suffix}"):
        r = await shared.client.post(f"/api/v1/nodes/{node}/telemetry", json={"uptime": 1}, headers=headers)
        assert r.status_code == 200, (node, r.text)
        device = (await shared.client.get(f"/api/v1/devices/{node}", headers=ADMIN)).json()
        assert device["parent_id"] == gateway and device["auto_registered"] is True, device
