"""Revocations made while Mosquitto is unreachable are applied when it is back.

Rotating, disabling or deleting a device answers at once from the registry; Mosquitto's copy of the
device (dynamic security) can only follow once it is reachable again. When the provisioner's connection is
back, the changes that waited are applied first and then the whole registry is reconciled with the
broker's accounts: the old secret no longer connects, a disabled or deleted device is refused, a device
created meanwhile gets its secret. A new secret lives in memory until then (the registry keeps a hash of
it, the broker another); if Telemetra restarted before the broker came back, the device's broker client is
disabled instead — its old secret must not work — and it needs one more rotation.

Devices keep publishing through the outage (paho reconnects): the control device's stream is counted —
acknowledged, stored, lost, duplicated — and nothing the disabled device published after it was disabled,
or the old secret published after the reconciliation, may be stored.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN, make_settings, running_app
from tests.mqtt.conftest import Device, Endpoint, MqttApp, eventually, metric_sum, start_mqtt_app
from tests.support.mosquitto import start_mosquitto
from tests.support.mqtt_load import SeqLoad, Tally, stored_seqs

pytestmark = [pytest.mark.mosquitto]


async def accounts_health(client: Any) -> dict[str, Any]:
    r = await client.get("/health")
    body: dict[str, Any] = r.json()["checks"]["mqtt_accounts"]
    return body


async def accepted(endpoint: Endpoint, username: str, password: str) -> bool:
    device = Device(endpoint, username, password, client_id=username)
    rc = await device.connect()
    if not rc.is_failure:
        await device.close()
    return not rc.is_failure


async def rotate(app: MqttApp, device_id: str) -> str:
    r = await app.client.post(f"/api/v1/devices/{device_id}/rotate", headers=ADMIN)
    assert r.status_code == 200, r.text
    secret: str = r.json()["credentials"]["api_key"]
    return secret


async def test_revocations_while_the_broker_is_down_are_applied_when_it_is_back(tmp_path: Path) -> None:
    async with start_mqtt_app("mosquitto", tmp_path) as app:
        broker = app.mosquitto
        assert broker is not None
        endpoint = app.endpoint
        keys = {d: await app.create_device(d) for d in ("rot", "dis", "del", "keep")}
        for device_id, secret in keys.items():
            assert await accepted(endpoint, device_id, secret), device_id
        url = app.running.settings.database_url
        assert url is not None
        # Publishing all along: the control device, the one about to be disabled, and the secret about to be
        # rotated away (held by, say, whoever stole it).
        load = await asyncio.to_thread(
            SeqLoad, broker.host, broker.port, [(d, keys[d]) for d in ("keep", "dis", "rot")], messages=10**6, rate=50
        )
        load.start()
        try:
            await asyncio.to_thread(load.wait_published, 3 * 25)

            await asyncio.to_thread(broker.stop)
            dis_acked_before = load.acknowledged()["dis"]
            new_rot = await rotate(app, "rot")
            r = await app.client.patch("/api/v1/devices/dis", json={"disabled": True}, headers=ADMIN)
            assert r.status_code == 200, r.text
            r = await app.client.delete("/api/v1/devices/del", headers=ADMIN)
            assert r.status_code == 204, r.text
            new_key = await app.create_device("new")
            health = await accounts_health(app.client)
            assert health["status"] == "down" and health["changes_pending"] == 4, health
            assert await app.metric("telemetra_mqtt_account_changes_pending") == 4

            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            await eventually(lambda: _status_ok(app), within=15, what="the accounts reconciled")
            window_s = time.monotonic() - back
            rot_acked_at_reconcile = load.acknowledged()["rot"]
            keep_acked_at_reconcile = len(load.acknowledged()["keep"])

            assert not await accepted(endpoint, "rot", keys["rot"]), "the rotated-away secret still connects"
            assert await accepted(endpoint, "rot", new_rot), "the new secret does not connect"
            assert not await accepted(endpoint, "dis", keys["dis"]), "the disabled device still connects"
            assert not await accepted(endpoint, "del", keys["del"]), "the deleted device still connects"
            assert await accepted(endpoint, "new", new_key), "the device created meanwhile cannot connect"
            assert await accepted(endpoint, "keep", keys["keep"])

            # The control stream goes on after the reconciliation (the window below was a real one).
            await asyncio.to_thread(load.wait_published, load.published + 3 * 25)
            await eventually(
                lambda: _true(len(load.acknowledged()["keep"]) >= keep_acked_at_reconcile + 25),
                what="keep's stream acknowledged after the reconciliation",
            )
        finally:
            await asyncio.to_thread(load.stop, 3.0)
            load.close()
        acknowledged = load.acknowledged()

        async def keep_stored() -> dict[str, list[int]] | None:
            stored = await asyncio.to_thread(stored_seqs, url, ["keep", "dis", "rot"])
            return stored if len(stored["keep"]) >= len(acknowledged["keep"]) else None

        stored = await eventually(keep_stored, what="keep's stream stored")
        keep = Tally.of({"keep": acknowledged["keep"]}, {"keep": stored["keep"]})
        print(f"control device through the outage: {keep.line()}; reconciled {window_s:.2f}s after the broker was back")
        assert keep.lost == 0 and keep.duplicated == 0
        # Nothing the old secret got a PUBACK for after the reconciliation, nothing of the disabled device's
        # after it was disabled: the broker refused the one, the collector refuses the other.
        assert acknowledged["rot"] == rot_acked_at_reconcile
        assert set(stored["dis"]) <= dis_acked_before
        assert set(stored["rot"]) <= rot_acked_at_reconcile

        drift = {k: await app.metric("telemetra_mqtt_account_drift_total", kind=k) for k in _KINDS}
        repairs = {k: await app.metric("telemetra_mqtt_account_repairs_total", kind=k) for k in _KINDS}
        assert all(n >= 1 for n in drift.values()), drift
        assert repairs == drift, (repairs, drift)
        assert await app.metric("telemetra_mqtt_account_changes_pending") == 0
        assert await app.metric("telemetra_mqtt_accounts_unrepaired") == 0


# rot: its broker password is not the registry's; dis: enabled in the broker; del: a client of no device;
# new: a registry device the broker lacks.
_KINDS = ("credentials_stale", "enabled", "orphan_client", "missing_client")


async def _status_ok(app: MqttApp) -> bool:
    return (await accounts_health(app.client))["status"] == "ok"


async def _true(value: bool) -> bool:
    return value


async def test_a_rotation_outliving_its_secret_disables_the_old_one(tmp_path: Path) -> None:
    """Rotated while the broker was down, and Telemetra restarted before it came back: the new secret is
    gone (only its hash is kept), so the broker cannot be given it — but the old one stops working, the
    device counts as unrepaired, and one more rotation fixes it."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        settings = make_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}",
            tmp_path / "data",
            **broker.telemetra_settings(),
        )
        endpoint = Endpoint(broker.host, broker.port)
        async with running_app(settings) as first:
            old = await first.create_device("rot")
            assert await accepted(endpoint, "rot", old)
            await asyncio.to_thread(broker.stop)
            r = await first.client.post("/api/v1/devices/rot/rotate", headers=ADMIN)
            assert r.status_code == 200, r.text
            lost_secret = r.json()["credentials"]["api_key"]

        async with AsyncExitStack() as stack:
            # Telemetra starts while the broker is still down (it must not refuse to start), and the broker
            # comes back meanwhile.
            starting = asyncio.create_task(asyncio.to_thread(broker.start))
            second = await stack.enter_async_context(running_app(settings))
            await starting

            async def reconciled() -> dict[str, Any] | None:
                health = await accounts_health(second.client)
                return health if health["status"] == "ok" else None

            health = await eventually(reconciled, within=15, what="the accounts reconciled")
            assert health["unrepaired"] == 1, health
            assert not await accepted(endpoint, "rot", old), "the rotated-away secret still connects"
            assert not await accepted(endpoint, "rot", lost_secret)  # the broker never had it
            text = (await second.client.get("/metrics")).text
            assert metric_sum(text, "telemetra_mqtt_accounts_unrepaired") == 1
            assert metric_sum(text, "telemetra_mqtt_account_drift_total", kind="credentials_stale") >= 1

            r = await second.client.post("/api/v1/devices/rot/rotate", headers=ADMIN)
            assert r.status_code == 200, r.text
            fresh = r.json()["credentials"]["api_key"]
            assert await accepted(endpoint, "rot", fresh)
            assert (await accounts_health(second.client))["unrepaired"] == 0
    finally:
        broker.stop()
