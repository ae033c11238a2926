"""Who may call what (SPEC §1): every HTTP endpoint × every kind of caller, with the exact status.

Callers: an admin, an operator and a viewer key (``TELEMETRA_*_KEYS``); device A; device B; gateway G
(``kind=gateway``) whose child is C; a fleet key (seed 001's ``DEVICE_API_KEYS``); no key; a key nobody
issued. The matrix runs on both backends against one app per backend (``shared_app``): a cell costs a
request or two, an app start would cost more than the whole row. Cells that change a device (delete,
rotate) act on a fresh device of their own. Key-less access from trusted networks and CORS preflights
follow the matrix.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.api.shared_app import lenient_client, shared_app_fixture, unique
from tests.conftest import ADMIN, AppFactory, Running

FLEET_KEY = "fleet-key-for-the-auth-matrix-0123456789"
OPERATOR_KEY = "operator-key-for-the-auth-matrix-0123456789"
VIEWER_KEY = "viewer-key-for-the-auth-matrix-0123456789"
CALLERS = ("admin", "operator", "viewer", "dev_a", "dev_b", "gateway", "fleet", "none", "wrong")

shared = shared_app_fixture(device_api_keys=[FLEET_KEY], operator_keys=[OPERATOR_KEY], viewer_keys=[VIEWER_KEY])
module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass
class World:
    a: str
    b: str
    g: str
    c: str
    headers: dict[str, dict[str, str]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(shared: Running) -> World:
    a, b, g, c = "dev-a", "dev-b", "gw-g", "child-c"
    key_a = await shared.create_device(a)
    key_b = await shared.create_device(b)
    key_g = await shared.create_device(g, kind="gateway")
    await shared.create_device(c, parent_id=g)
    # A has a heat pump's reading, so smart-heat-pump's status paths (404 without data) answer 200.
    r = await shared.client.post(
        "/api/v1/ingest",
        json={"temperature": {"inlet": 45.1}, "status": {"compressor": True}},
        headers={"X-API-Key": key_a},
    )
    assert r.status_code == 201, r.text
    headers = {
        "admin": ADMIN,
        "operator": {"X-API-Key": OPERATOR_KEY},
        "viewer": {"Authorization": f"Bearer {VIEWER_KEY}"},
        "dev_a": {"X-API-Key": key_a},
        "dev_b": {"Authorization": f"Bearer {key_b}"},  # both header forms are in play
        "gateway": {"X-API-Key": key_g},
        "fleet": {"X-API-Key": FLEET_KEY},
        "none": {},
        "wrong": {"X-API-Key": "not-a-key-anybody-issued"},
    }
    return World(a, b, g, c, headers)


@dataclass(frozen=True)
class Row:
    method: str
    path: str
    expect: tuple[int, ...]  # in CALLERS order
    body: Any = None
    bug: str | None = None  # a known defect in src/: the row is a strict xfail until it is fixed

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


def codes(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.split())
    assert len(parts) == len(CALLERS)
    return parts


#                    admin op  view A   B   G  fleet none wrong
READ_A = codes("200 200 200 200 403 403 403 401 401")  # a device reads only its own data; staff read all
READ_C = codes("200 200 200 403 403 403 403 401 401")  # a gateway writes for its children but does not read them
VIEW = codes("200 200 200 403 403 403 403 401 401")  # fleet-wide reads: admin, operator, viewer
OPERATE = codes("200 200 403 403 403 403 403 401 401")  # changes other than credentials: admin, operator
ADMIN_ONLY = codes("200 403 403 403 403 403 403 401 401")  # credentials and keys
PUBLIC = codes("200 200 200 200 200 200 200 200 200")
WRITE_A = codes("201 201 403 201 403 403 201 401 401")
WRITE_C = codes("201 201 403 403 403 201 201 401 401")
NODE_A = codes("200 200 403 200 403 403 200 401 401")
NODE_C = codes("200 200 403 403 403 200 200 401 401")
DEVICE_SIDE = codes("403 403 403 200 200 200 403 401 401")  # a device's own command poll
TELEMETRY_APP = "/compat/telemetry-app/api/v1"

ROWS = [
    # Device side (SPEC §3).
    Row("POST", "/api/v1/ingest", WRITE_A, {"device_id": "{A}", "t": 1}),
    Row("POST", "/api/v1/ingest", WRITE_C, {"device_id": "{C}", "t": 1}),
    # Without device_id: a device or gateway key names its own device; admin, operator and fleet must say which.
    Row("POST", "/api/v1/ingest", codes("422 422 403 201 201 201 422 401 401"), {"t": 1}),
    Row("POST", "/api/v1/ingest/batch", WRITE_A, [{"device_id": "{A}", "t": 1}]),
    Row("POST", "/api/v1/ingest/batch", WRITE_C, {"readings": [{"device_id": "{C}", "t": 1}]}),
    Row("POST", "/api/v1/devices/{A}/telemetry", NODE_A, {"uptime": 1}),
    Row("POST", "/api/v1/devices/{C}/telemetry", NODE_C, {"uptime": 1}),
    Row("POST", "/api/v1/nodes/{A}/telemetry", NODE_A, {"uptime": 1, "state": {"motion": "0"}}),
    Row("POST", "/api/v1/nodes/{C}/telemetry", NODE_C, {"uptime": 1}),
    Row("POST", "/api/v1/provision/claim", PUBLIC, {"claim_code": "{CLAIM}"}),
    Row("POST", "/api/v1/provision/claim", codes("404 404 404 404 404 404 404 404 404"), {"claim_code": "NOPE-NOPE"}),
    Row("GET", "/api/v1/device/commands", DEVICE_SIDE),
    # Registry: creating a device issues its secret, so it is the admin's, like rotation and claim codes.
    Row("POST", "/api/v1/devices", codes("201 403 403 403 403 403 403 401 401"), {"id": "{NEW}"}),
    Row("GET", "/api/v1/devices", VIEW),
    Row("GET", "/api/v1/devices/{A}", READ_A),
    Row("PATCH", "/api/v1/devices/{A}", OPERATE, {"notes": "patched"}),
    Row("PUT", "/api/v1/devices/{A}", OPERATE, {"notes": "put"}),
    Row("DELETE", "/api/v1/devices/{FRESH}", codes("204 204 403 403 403 403 403 401 401")),
    Row("POST", "/api/v1/devices/{FRESH}/rotate", ADMIN_ONLY),
    Row("POST", "/api/v1/devices/{FRESH}/credentials", ADMIN_ONLY),
    Row("POST", "/api/v1/claim-codes", codes("201 403 403 403 403 403 403 401 401"), {"count": 1}),
    # Reads of one device's data.
    Row("GET", "/api/v1/devices/{A}/telemetry", READ_A),
    Row("GET", "/api/v1/devices/{A}/history?range=24h", READ_A),
    Row("GET", "/api/v1/devices/{A}/latest", READ_A),
    Row("GET", "/api/v1/devices/{A}/aggregate?interval=1h", READ_A),
    Row("GET", "/api/v1/devices/{A}/stats?range=24h", READ_A),
    Row("GET", "/api/v1/devices/{A}/telemetry/export", READ_A),
    Row("GET", "/api/v1/devices/{A}/state", READ_A),
    Row("GET", "/api/v1/devices/{A}/state/history", READ_A),
    Row("GET", "/api/v1/devices/{A}/events", READ_A),
    Row("GET", "/api/v1/devices/{C}/latest", READ_C),
    Row("GET", "/api/v1/devices/{C}/telemetry", READ_C),
    # Commands, configuration and alerts (no MQTT here: commands stay queued).
    Row("POST", "/api/v1/devices/{A}/commands", codes("201 201 403 403 403 403 403 401 401"), {"name": "reboot"}),
    Row("GET", "/api/v1/devices/{A}/commands", READ_A),
    Row("GET", "/api/v1/devices/{A}/commands/nope", codes("404 404 404 404 403 403 403 401 401")),
    Row("POST", "/api/v1/device/commands/nope/ack", codes("403 403 403 404 404 404 403 401 401"), {"status": "ok"}),
    Row("PUT", "/api/v1/devices/{A}/config", OPERATE, {"interval_s": 60}),
    Row("GET", "/api/v1/devices/{A}/config", READ_A),
    Row("GET", "/api/v1/alerts", VIEW),
    Row("GET", "/api/v1/alerts/counts", VIEW),
    Row("POST", "/api/v1/alerts/999999/acknowledge", codes("404 404 403 403 403 403 403 401 401")),
    Row("POST", "/api/v1/alerts/999999/clear", codes("404 404 403 403 403 403 403 401 401")),
    # Fleet-wide reads.
    Row("GET", "/api/v1/rejected", VIEW),
    Row("GET", "/api/v1/stats", VIEW),
    # The dashboard asks which role a key has.
    Row("GET", "/api/v1/me", codes("200 200 200 200 200 200 200 401 401")),
    # iotmesh (seed 000).
    Row("GET", "/api/v1/nodes", VIEW),
    Row("GET", "/api/v1/nodes/{A}", READ_A),
    Row("PUT", "/api/v1/nodes/{A}/name", OPERATE, {"name": "renamed"}),
    Row("DELETE", "/api/v1/nodes/{FRESH}", OPERATE),
    Row("GET", "/api/v1/nodes/{A}/history?hours=2", READ_A),
    Row("GET", "/api/v1/nodes/{A}/state", READ_A),
    Row("GET", "/api/v1/state", VIEW),
    # smart-heat-pump (seed 003).
    Row("GET", "/api/devices", VIEW),
    Row("GET", "/api/stats", VIEW),
    Row("GET", "/api/alerts", VIEW),
    Row("GET", "/api/devices/{A}/status", READ_A),
    Row("GET", "/api/devices/{A}/readings", READ_A),
    Row("GET", "/api/devices/{A}/readings/latest", READ_A),
    # telemetry_app's Flutter app (seeds 001/002).
    Row("GET", f"{TELEMETRY_APP}/health", PUBLIC),
    Row("GET", f"{TELEMETRY_APP}/devices", VIEW),
    Row("POST", f"{TELEMETRY_APP}/devices", codes("201 403 403 403 403 403 403 401 401"), {"device_id": "{NEW}"}),
    Row("GET", f"{TELEMETRY_APP}/devices/{{A}}", READ_A),
    Row("GET", f"{TELEMETRY_APP}/devices/{{A}}/latest", READ_A),
    Row("GET", f"{TELEMETRY_APP}/devices/{{A}}/history?range=24h&limit=1000", READ_A),
    Row("GET", f"{TELEMETRY_APP}/devices/{{A}}/stats?range=24h", READ_A),
    Row("GET", f"{TELEMETRY_APP}/dashboard/stats", VIEW),
    # paku-iot's OTA service (seed 004): the device side is open (a report needs the device's own key,
    # a fleet key or staff); admin reads need a viewer key, changes an operator key. No firmware or
    # rollout exists here, so the allowed cells are the 404s and 422s of a call that got past the keys.
    # (A key nobody issued is refused here too, as on Telemetra's own download.)
    Row(
        "GET",
        "/api/firmware/check?device_id={A}&device_model=m&current_version=1.0.0",
        codes("200 200 200 200 200 200 200 200 401"),
    ),
    Row("GET", "/api/firmware/download/9.9.9?device_model=m", codes("404 404 404 404 404 404 404 404 401")),
    Row("GET", "/api/device/health", PUBLIC),
    Row(
        "POST",
        "/api/device/{A}/update-status",
        codes("404 404 403 404 403 403 404 401 401"),
        {"device_id": "{A}", "firmware_version": "1.0.0", "status": "downloading"},
    ),
    Row(
        "POST", "/api/admin/firmware/upload?version=1.0.0&device_model=m", codes("422 422 403 403 403 403 403 401 401")
    ),
    Row("GET", "/api/admin/firmware/releases?device_model=m&limit=50", VIEW),
    Row(
        "POST",
        "/api/admin/rollout/create",
        codes("404 404 403 403 403 403 403 401 401"),
        {"name": "{NEW}", "firmware_version": "9.9.9", "device_model": "m"},
    ),
    Row("GET", "/api/admin/devices?device_model=m&limit=500", VIEW),
    Row("GET", "/api/admin/update-status?limit=10", VIEW),
    # Webhooks: their secrets and targets are an admin's; operators read them, test and resend.
    Row("GET", "/api/v1/webhooks", OPERATE),
    Row(
        "POST",
        "/api/v1/webhooks",
        codes("201 403 403 403 403 403 403 401 401"),
        {"url": "http://127.0.0.1:9/hook", "events": ["alert.*"]},
    ),
    Row("GET", "/api/v1/webhooks/{HOOK}", OPERATE),
    Row("PATCH", "/api/v1/webhooks/{HOOK}", ADMIN_ONLY, {"events": ["device.*"]}),
    Row("POST", "/api/v1/webhooks/{HOOK}/rotate-secret", ADMIN_ONLY),
    Row("DELETE", "/api/v1/webhooks/{HOOK}", codes("204 403 403 403 403 403 403 401 401")),
    Row("POST", "/api/v1/webhooks/{HOOK}/test", codes("202 202 403 403 403 403 403 401 401")),
    Row("GET", "/api/v1/webhooks/{HOOK}/deliveries", OPERATE),
    Row("POST", "/api/v1/webhooks/{HOOK}/deliveries/999999/retry", codes("404 404 403 403 403 403 403 401 401")),
    # Rules, storage and retention: staff read them, operators change them.
    Row("GET", "/api/v1/rules", VIEW),
    Row(
        "POST",
        "/api/v1/rules",
        codes("201 201 403 403 403 403 403 401 401"),
        {"name": "{NEW}", "key": "t", "op": ">", "value": 1},
    ),
    Row("GET", "/api/v1/rules/{RULE}", VIEW),
    Row("PATCH", "/api/v1/rules/{RULE}", OPERATE, {"value": 2}),
    Row("DELETE", "/api/v1/rules/{RULE}", codes("204 204 403 403 403 403 403 401 401")),
    Row("GET", "/api/v1/storage", VIEW),
    Row("GET", "/api/v1/retention", VIEW),
    Row("PUT", "/api/v1/retention/models/{MODEL}", OPERATE, {"raw_days": 30}),
    Row("DELETE", "/api/v1/retention/models/{MODEL}", codes("204 204 403 403 403 403 403 401 401")),
    # Operations: open to probes and scrapers, whatever they send.
    Row("GET", "/health", PUBLIC),
    Row("GET", "/api/v1/health", PUBLIC),
    Row("GET", "/api/health", PUBLIC),
    Row("GET", "/metrics", PUBLIC),
]


async def _placeholders(running: Running, w: World, row: Row) -> dict[str, str]:
    values = {"A": w.a, "B": w.b, "C": w.c, "G": w.g, "NEW": unique("new")}
    text = f"{row.path} {row.body}"
    if "{FRESH}" in text:
        values["FRESH"] = unique("fresh")
        await running.create_device(values["FRESH"])
    if "{HOOK}" in text:
        r = await running.client.post(
            "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["alert.*"]}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        values["HOOK"] = str(r.json()["id"])
    if "{RULE}" in text:
        r = await running.client.post(
            "/api/v1/rules", json={"name": unique("rule"), "key": "t", "op": ">", "value": 1}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        values["RULE"] = str(r.json()["id"])
    if "{MODEL}" in text:  # a model with an override to change or remove
        values["MODEL"] = unique("model")
        r = await running.client.put(f"/api/v1/retention/models/{values['MODEL']}", json={"raw_days": 7}, headers=ADMIN)
        assert r.status_code == 200, r.text
    if "{CLAIM}" in text:
        r = await running.client.post("/api/v1/claim-codes", json={"count": 1}, headers=ADMIN)
        assert r.status_code == 201, r.text
        values["CLAIM"] = r.json()["claim_codes"][0]["claim_code"]
    return values


def _fill(obj: Any, values: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return obj.format(**values)
    if isinstance(obj, list):
        return [_fill(o, values) for o in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    return obj


@module_loop
@pytest.mark.parametrize(
    "row",
    [pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.bug)] if r.bug else []) for r in ROWS],
)
async def test_auth_matrix(shared: Running, world: World, row: Row) -> None:
    """One row, every caller; the failure message lists every cell that differs, not just the first."""
    wrong: list[str] = []
    async with lenient_client(shared) as client:
        for caller, expected in zip(CALLERS, row.expect, strict=True):
            await _cell(shared, client, world, row, caller, expected, wrong)
    assert not wrong, "\n".join(wrong)


async def _cell(
    shared: Running, client: httpx.AsyncClient, world: World, row: Row, caller: str, expected: int, wrong: list[str]
) -> None:
    values = await _placeholders(shared, world, row)
    kwargs: dict[str, Any] = {"headers": world.headers[caller]}
    if row.body is not None:
        kwargs["json"] = _fill(row.body, values)
    r = await client.request(row.method, _fill(row.path, values), **kwargs)
    if r.status_code != expected:
        wrong.append(f"{caller}: expected {expected}, got {r.status_code} {r.text[:200]}")
    elif r.status_code in (401, 403):
        body = r.json()
        if not body.get("detail") or not body.get("field"):
            wrong.append(f"{caller}: refusal without detail and field: {body}")
        elif r.status_code == 401 and body["field"] != "X-API-Key":
            wrong.append(f"{caller}: 401 should name X-API-Key: {body}")


@module_loop
async def test_unknown_device_is_404_for_admin_but_403_for_another_device(shared: Running, world: World) -> None:
    """A device key learns nothing about which other devices exist."""
    missing = unique("missing")
    for path in ("", "/latest", "/telemetry", "/state"):
        r = await shared.client.get(f"/api/v1/devices/{missing}{path}", headers=ADMIN)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["field"] == "device_id"
        r = await shared.client.get(f"/api/v1/devices/{missing}{path}", headers=world.headers["dev_a"])
        assert r.status_code == 403, (path, r.text)


@module_loop
async def test_fleet_key_auto_registers_an_unknown_device(shared: Running) -> None:
    new = unique("fleet-new")
    r = await shared.client.post(
        "/api/v1/ingest", json={"device_id": new, "metrics": {"t": 21.5}}, headers={"X-API-Key": FLEET_KEY}
    )
    assert r.status_code == 201, r.text
    assert r.json()["device_ids"] == [new]
    device = (await shared.client.get(f"/api/v1/devices/{new}", headers=ADMIN)).json()
    assert device["auto_registered"] is True
    assert device["kind"] == "device" and device["parent_id"] is None
    latest = (await shared.client.get(f"/api/v1/devices/{new}/latest", headers=ADMIN)).json()
    assert latest["values"]["t"]["value"] == 21.5
    # Also through the node path, and in a batch naming two new devices.
    other, third = unique("fleet-node"), unique("fleet-batch")
    r = await shared.client.post(
        f"/api/v1/nodes/{other}/telemetry", json={"uptime": 5}, headers={"X-API-Key": FLEET_KEY}
    )
    assert r.status_code == 200, r.text
    r = await shared.client.post(
        "/api/v1/ingest/batch",
        json=[{"device_id": third, "a": 1}, {"device_id": new, "a": 2}],
        headers={"X-API-Key": FLEET_KEY},
    )
    assert r.status_code == 201 and r.json()["device_ids"] == sorted([third, new])
    for device_id in (other, third):
        assert (await shared.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)).status_code == 200


@module_loop
async def test_gateway_writes_for_its_children_and_registers_new_ones(shared: Running, world: World) -> None:
    gw = world.headers["gateway"]
    new_child = unique("mesh")
    r = await shared.client.post(f"/api/v1/nodes/{new_child}/telemetry", json={"uptime": 7}, headers=gw)
    assert r.status_code == 200, r.text
    device = (await shared.client.get(f"/api/v1/devices/{new_child}", headers=ADMIN)).json()
    assert device["parent_id"] == world.g and device["auto_registered"] is True
    # Now a known child: the gateway may keep writing; another device may not.
    r = await shared.client.post("/api/v1/ingest", json={"device_id": new_child, "x": 1}, headers=gw)
    assert r.status_code == 201, r.text
    r = await shared.client.post(
        "/api/v1/ingest", json={"device_id": new_child, "x": 1}, headers=world.headers["dev_a"]
    )
    assert r.status_code == 403
    # A batch mixing a child and a stranger is refused whole: nothing of it is stored.
    before = (await shared.client.get(f"/api/v1/devices/{new_child}/telemetry?keys=mixed", headers=ADMIN)).json()
    r = await shared.client.post(
        "/api/v1/ingest/batch",
        json=[{"device_id": new_child, "mixed": 1}, {"device_id": world.b, "mixed": 2}],
        headers=gw,
    )
    assert r.status_code == 403, r.text
    after = (await shared.client.get(f"/api/v1/devices/{new_child}/telemetry?keys=mixed", headers=ADMIN)).json()
    assert before["series"] == after["series"] == {}
    # Another gateway's child is not ours either.
    other_gw = unique("gw2")
    other_key = await shared.create_device(other_gw, kind="gateway")
    r = await shared.client.post(
        f"/api/v1/nodes/{new_child}/telemetry", json={"uptime": 1}, headers={"X-API-Key": other_key}
    )
    assert r.status_code == 403


@module_loop
async def test_malformed_authorization_headers_are_anonymous(shared: Running, world: World) -> None:
    key_a = world.headers["dev_a"]["X-API-Key"]
    for headers in ({"Authorization": f"Basic {key_a}"}, {"Authorization": "Bearer "}, {"X-API-Key": ""}):
        r = await shared.client.get(f"/api/v1/devices/{world.a}/latest", headers=headers)
        assert r.status_code == 401, (headers, r.text)
    r = await shared.client.get(f"/api/v1/devices/{world.a}/latest", headers={"Authorization": f"bearer {key_a}"})
    assert r.status_code == 200


async def test_anonymous_node_posts_only_when_allowed(app_factory: AppFactory) -> None:
    async with app_factory() as closed:
        r = await closed.client.post("/api/v1/nodes/pir1/telemetry", json={"uptime": 1})
        assert r.status_code == 401
        assert "ALLOW_ANONYMOUS_NODES" in r.json()["detail"]
    async with app_factory(allow_anonymous_nodes=True) as open_:
        r = await open_.client.post("/api/v1/nodes/pir1/telemetry", json={"uptime": 1, "name": "pir1"})
        assert r.status_code == 200, r.text
        assert r.json()["node_id"] == "pir1"
        device = (await open_.client.get("/api/v1/devices/pir1", headers=ADMIN)).json()
        assert device["auto_registered"] is True and device["name"] == "pir1"
        r = await open_.client.post("/api/v1/devices/pir2/telemetry", json={"uptime": 1})
        assert r.status_code == 200
        # Anonymous means "no key", not "any key"; and only the node paths are open.
        r = await open_.client.post("/api/v1/nodes/pir1/telemetry", json={"uptime": 1}, headers={"X-API-Key": "bogus"})
        assert r.status_code == 401
        r = await open_.client.post("/api/v1/ingest", json={"device_id": "pir1", "uptime": 1})
        assert r.status_code == 401
        r = await open_.client.get("/api/v1/devices/pir1/latest")
        assert r.status_code == 401


async def test_gateway_auto_registration_can_be_turned_off(app_factory: AppFactory) -> None:
    async with app_factory(gateway_auto_register=False) as t:
        key = await t.create_device("gw", kind="gateway")
        await t.create_device("known-child", parent_id="gw")
        r = await t.client.post("/api/v1/nodes/unknown-child/telemetry", json={"uptime": 1}, headers={"X-API-Key": key})
        assert r.status_code == 403
        assert r.json()["field"] == "device_id"
        assert (await t.client.get("/api/v1/devices/unknown-child", headers=ADMIN)).status_code == 404
        r = await t.client.post("/api/v1/nodes/known-child/telemetry", json={"uptime": 1}, headers={"X-API-Key": key})
        assert r.status_code == 200


def test_matrix_covers_every_route() -> None:
    """A new endpoint of these routers without a row here fails this test instead of going unchecked.
    (OTA and realtime have their own suites.)"""
    from telemetra.api import (
        alerts,
        commands,
        compat_heatpump,
        compat_iotmesh,
        compat_paku_ota,
        compat_telemetry_app,
        devices,
        health,
        ingest,
        me,
        rules,
        storage,
        telemetry,
        webhooks,
    )

    modules = (
        ingest, devices, telemetry, health, commands, alerts, me, compat_iotmesh, compat_heatpump, compat_paku_ota,
        rules, storage, webhooks,
    )  # fmt: skip
    routes: set[tuple[str, str]] = set()
    for module in (*modules, compat_telemetry_app):
        for route in module.router.routes:
            for method in route.methods - {"HEAD"}:  # type: ignore[attr-defined]
                routes.add((method, re.sub(r"\{[^}]+\}", "{X}", route.path)))  # type: ignore[attr-defined]
    covered = set()
    for row in ROWS:
        path = row.path.split("?")[0]
        for name in ("{A}", "{C}", "{FRESH}", "{HOOK}", "{RULE}", "{MODEL}", "999999", "nope", "9.9.9"):
            path = path.replace(name, "{X}")
        covered.add((row.method, path))
    assert len(routes) >= 60, "the routers are listed differently now; fix this test"
    assert routes - covered == set()


# -- key-less access: trusted networks -------------------------------------------------------------------


def client_from(running: Running, host: str) -> httpx.AsyncClient:
    """A client whose requests come from ``host`` (the address uvicorn reports, after X-Forwarded-For)."""
    transport = httpx.ASGITransport(app=running.app, client=(host, 40_000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_trusted_networks_are_off_by_default(app_factory: AppFactory, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        async with app_factory() as t, client_from(t, "127.0.0.1") as local:
            assert (await local.get("/api/v1/nodes")).status_code == 401
            assert (await local.get("/api/devices")).status_code == 401
    assert "TRUSTED_NETWORKS" not in caplog.text


async def test_a_trusted_network_gets_its_role_without_a_key(
    app_factory: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with app_factory(trusted_networks=["192.168.1.0/24", "10.0.0.7"], trusted_role="viewer") as t:
            await t.create_device("hp1")
            async with client_from(t, "192.168.1.20") as lan, client_from(t, "192.168.2.20") as outside:
                # The dashboards' reads, without a key, from the trusted network only.
                for path in ("/api/v1/nodes", "/api/v1/state", "/api/devices", "/api/stats", "/api/v1/devices/hp1"):
                    assert (await lan.get(path)).status_code == 200, path
                    assert (await outside.get(path)).status_code == 401, path
                # A viewer does not write, and a presented key is judged as a key, not by the address.
                r = await lan.post("/api/v1/ingest", json={"device_id": "hp1", "t": 1})
                assert r.status_code == 403 and r.json()["field"] == "X-API-Key"
                assert (await lan.put("/api/v1/nodes/hp1/name", json={"name": "x"})).status_code == 403
                assert (await lan.get("/api/v1/nodes", headers={"X-API-Key": "wrong"})).status_code == 401
            async with client_from(t, "10.0.0.7") as host, client_from(t, "10.0.0.8") as neighbour:
                assert (await host.get("/api/v1/nodes")).status_code == 200
                assert (await neighbour.get("/api/v1/nodes")).status_code == 401
    # Said at start, naming the networks and the role.
    assert "TRUSTED_NETWORKS" in caplog.text and "192.168.1.0/24" in caplog.text and "viewer" in caplog.text


async def test_a_trusted_operator_network_runs_the_gateway_and_dashboards(app_factory: AppFactory) -> None:
    """iotmesh's gateway and dashboard send no key: an operator network lets them post and rename, not
    issue credentials."""
    async with app_factory(trusted_networks=["127.0.0.0/8"], trusted_role="operator") as t:
        async with client_from(t, "127.0.0.1") as local:
            r = await local.post("/api/v1/nodes/a1b2c3d4/telemetry", json={"name": "PIR", "uptime": 5})
            assert r.status_code == 200, r.text
            assert (await local.put("/api/v1/nodes/a1b2c3d4/name", json={"name": "Hall"})).status_code == 200
            assert (await local.post("/api/v1/devices", json={"id": "new"})).status_code == 403
            assert (await local.post("/api/v1/devices/a1b2c3d4/rotate")).status_code == 403
            assert (await local.delete("/api/v1/nodes/a1b2c3d4")).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trusted_networks": ["192.168.1.0/33"]}, "not an IP network"),
        ({"trusted_role": "device"}, "trusted_role"),
        ({"operator_keys": ["same-key"], "viewer_keys": ["same-key"]}, "two roles"),
    ],
)
def test_bad_access_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    from tests.conftest import make_settings

    with pytest.raises(ValueError, match=message):
        make_settings("sqlite+aiosqlite://", Path("/nonexistent"), **overrides)


# -- CORS ------------------------------------------------------------------------------------------------


async def test_cors_preflight_for_allowed_origins_only(app_factory: AppFactory) -> None:
    allowed = "http://dashboard.local:3000"
    async with app_factory(cors_origins=[allowed]) as t:
        preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-api-key"}
        r = await t.client.options("/api/v1/nodes", headers={"Origin": allowed, **preflight})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == allowed
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        # The actual request carries the header too; the ingest front door as well.
        r = await t.client.get("/api/v1/nodes", headers={"Origin": allowed, **ADMIN})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        r = await t.client.options(
            "/api/v1/ingest", headers={"Origin": allowed, "Access-Control-Request-Method": "POST"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == allowed
        # Another origin gets no allowance.
        r = await t.client.options("/api/v1/nodes", headers={"Origin": "http://evil.example", **preflight})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    async with app_factory() as closed:  # off by default
        r = await closed.client.get("/health", headers={"Origin": allowed})
        assert "access-control-allow-origin" not in r.headers
