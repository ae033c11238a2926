"""The registry ↔ Mosquitto reconciliation (mqtt/broker_accounts.py) against drift made by hand, and the
pure planner it uses (mqtt/dynsec_plan.py).

Drift is made with the dynsec admin account the way an operator with ``mosquitto_ctrl`` (or a broker
restored from an old backup) would; the reconciliation runs at Telemetra's start and whenever its
provisioner connection comes back, and counts what it found and repaired.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from telemetra.mqtt.dynsec import DynsecProvisioner
from telemetra.mqtt.dynsec_plan import AccountSpec, ForeignAccount, plan_account, plan_removal, secret_fingerprint
from tests.conftest import ADMIN, make_settings, running_app
from tests.mqtt.conftest import Device, Endpoint, eventually, metric_sum
from tests.support.mosquitto import MosquittoInstance, start_mosquitto

pytestmark = pytest.mark.mosquitto

ROOTS = ("telemetra/{device}/",)
DOWNLINK = ("telemetra/{device}/cmd", "telemetra/{device}/config")


def admin(broker: MosquittoInstance) -> DynsecProvisioner:
    return DynsecProvisioner(
        host=broker.host,
        port=broker.port,
        username=broker.admin_username,
        password=broker.admin_password,
        device_roots=ROOTS,
        downlink=DOWNLINK,
        timeout=3.0,
    )


async def connects(broker: MosquittoInstance, username: str, password: str, client_id: str | None = None) -> bool:
    device = Device(Endpoint(broker.host, broker.port), username, password, client_id=client_id or username)
    rc = await device.connect()
    if not rc.is_failure:
        await device.close()
    return not rc.is_failure


async def test_drift_is_repaired_at_start_and_after_a_reconnect(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        settings = make_settings(
            f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}",
            tmp_path / "data",
            **broker.telemetra_settings(),
        )
        async with running_app(settings) as app:
            keys = {d: await app.create_device(d) for d in ("a", "b", "c")}
            r = await app.client.patch("/api/v1/devices/b", json={"disabled": True}, headers=ADMIN)
            assert r.status_code == 200
        assert not await connects(broker, "b", keys["b"])

        # While Telemetra is away: b enabled again by hand, a client and role for a device that does not
        # exist, c's role detached and deleted.
        async with admin(broker) as prov:
            await prov.run([{"command": "enableClient", "username": "b"}])
            await prov.upsert_device("ghost", "ghost-pw")
            await prov.run(
                [
                    {"command": "removeClientRole", "username": "c", "rolename": "telemetra-dev-c"},
                    {"command": "deleteRole", "rolename": "telemetra-dev-c"},
                ]
            )
        assert await connects(broker, "b", keys["b"]) and await connects(broker, "ghost", "ghost-pw")

        async with running_app(settings) as app:
            await eventually(lambda: _synced(app), what="reconciled at start")
            assert not await connects(broker, "b", keys["b"]), "the disabled device connects"
            assert not await connects(broker, "ghost", "ghost-pw"), "a device not in the registry connects"
            await _assert_publishes(broker, "c", keys["c"])
            first = await _counts(app)
            assert first["drift"] == {
                "enabled": 1,
                "orphan_client": 1,
                "orphan_role": 1,
                "missing_role": 1,
                "role_detached": 1,
            }, first
            assert first["repairs"] == first["drift"]

            # Now while it runs: a's binding removed and its role widened by hand; then the broker restarts,
            # the provisioner reconnects and reconciles again.
            async with admin(broker) as prov:
                await prov.run([{"command": "modifyClient", "username": "a", "clientid": ""}])
                await prov.run(
                    [
                        {
                            "command": "addRoleACL",
                            "rolename": "telemetra-dev-a",
                            "acltype": "publishClientSend",
                            "topic": "#",
                            "allow": True,
                        }
                    ]
                )
            assert await connects(broker, "a", keys["a"], client_id="not-a")
            reconciled = await metric(app, "telemetra_mqtt_account_reconciliations_total", outcome="ok")
            await asyncio.to_thread(broker.restart)

            async def again() -> bool:
                done = await metric(app, "telemetra_mqtt_account_reconciliations_total", outcome="ok")
                return done > reconciled and await _synced(app)

            await eventually(again, within=15, what="reconciled after the reconnect")
            assert not await connects(broker, "a", keys["a"], client_id="not-a"), "a's client id is not bound"
            assert await connects(broker, "a", keys["a"])
            second = await _counts(app)
            assert second["drift"]["client_id"] == 1 and second["drift"]["role_acls"] == 1, second
            assert second["repairs"] == second["drift"]
            assert await metric(app, "telemetra_mqtt_accounts_unrepaired") == 0
    finally:
        broker.stop()


async def _synced(app: Any) -> bool:
    r = await app.client.get("/health")
    return bool(r.json()["checks"]["mqtt_accounts"]["status"] == "ok")


async def metric(app: Any, name: str, **labels: str) -> float:
    return metric_sum((await app.client.get("/metrics")).text, name, **labels)


async def _counts(app: Any) -> dict[str, dict[str, float]]:
    """Drift found and repaired so far, by kind."""
    text = (await app.client.get("/metrics")).text
    out: dict[str, dict[str, float]] = {}
    for key, name in (
        ("drift", "telemetra_mqtt_account_drift_total"),
        ("repairs", "telemetra_mqtt_account_repairs_total"),
    ):
        kinds = set(re.findall(rf'^{name}{{kind="([^"]+)"}}', text, re.MULTILINE))
        out[key] = {kind: metric_sum(text, name, kind=kind) for kind in kinds}
    return out


async def _assert_publishes(broker: MosquittoInstance, device_id: str, secret: str) -> None:
    """The device may publish on its topic again (its role is back): MQTT 5 reports a refusal in the PUBACK."""
    import paho.mqtt.client as mqtt

    device = Device(Endpoint(broker.host, broker.port), device_id, secret, client_id=device_id, protocol=mqtt.MQTTv5)
    assert not (await device.connect()).is_failure
    try:
        assert not (await device.publish(f"telemetra/{device_id}/telemetry", b'{"x":1}')).is_failure
    finally:
        await device.close()


# ---------------------------------------------------------------------------- the planner (pure)

ACLS = [{"acltype": "publishClientSend", "topic": "telemetra/d/#", "allow": True, "priority": 0}]


def spec(**overrides: Any) -> AccountSpec:
    values: dict[str, Any] = {
        "username": "d",
        "rolename": "telemetra-dev-d",
        "acls": ACLS,
        "textname": "Telemetra device d",
        "enabled": True,
        "credential": secret_fingerprint("s1"),
        "client_id": "d",
    }
    values.update(overrides)
    return AccountSpec(**values)


def client(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "username": "d",
        "clientid": "d",
        "textdescription": f"telemetra credential {secret_fingerprint('s1')}",
        "roles": [{"rolename": "telemetra-dev-d"}],
        "groups": [],
    }
    base.update(fields)
    return base


ROLE = {"rolename": "telemetra-dev-d", "acls": ACLS}


def test_an_account_in_step_needs_nothing() -> None:
    plan = plan_account(spec(), password=None, client=client(), role=ROLE)
    assert plan.commands == [] and plan.drift == []


def test_a_secret_the_broker_does_not_hold_is_set_with_its_fingerprint_in_one_command() -> None:
    plan = plan_account(spec(credential=secret_fingerprint("s2")), password="s2", client=client(), role=ROLE)
    assert plan.commands == [
        {
            "command": "modifyClient",
            "username": "d",
            "password": "s2",
            "textdescription": f"telemetra credential {secret_fingerprint('s2')}",
        }
    ]


def test_a_stale_secret_without_the_new_one_disables_the_client() -> None:
    plan = plan_account(spec(credential=secret_fingerprint("s2")), password=None, client=client(), role=ROLE)
    assert plan.commands == [{"command": "disableClient", "username": "d"}]
    assert plan.unrepaired == ["credentials_stale"]
    # Idempotent: already disabled, nothing more to send, still unrepaired.
    again = plan_account(
        spec(credential=secret_fingerprint("s2")), password=None, client=client(disabled=True), role=ROLE
    )
    assert again.commands == [] and again.unrepaired == ["credentials_stale"]
    # And a registry enable does not switch the old secret back on.
    assert (
        plan_account(
            spec(credential=secret_fingerprint("s2"), enabled=True),
            password=None,
            client=client(disabled=True),
            role=ROLE,
        ).commands
        == []
    )


def test_a_client_from_before_fingerprints_is_adopted_not_disabled() -> None:
    plan = plan_account(spec(), password=None, client=client(textdescription=None), role=ROLE)
    assert plan.commands == [
        {
            "command": "modifyClient",
            "username": "d",
            "textdescription": f"telemetra credential {secret_fingerprint('s1')}",
        }
    ]
    assert plan.drift == ["credentials_unmarked"] and plan.unrepaired == []


def test_a_missing_client_without_its_secret_is_left_missing() -> None:
    plan = plan_account(spec(), password=None, client=None, role=None)
    assert [c["command"] for c in plan.commands] == ["createRole"]
    assert plan.unrepaired == ["missing_client"]
    created = plan_account(spec(enabled=False), password="s1", client=None, role=ROLE)
    assert created.commands == [
        {
            "command": "createClient",
            "username": "d",
            "textname": "Telemetra device d",
            "roles": [{"rolename": "telemetra-dev-d"}],
            "password": "s1",
            "textdescription": f"telemetra credential {secret_fingerprint('s1')}",
            "clientid": "d",
        },
        {"command": "disableClient", "username": "d"},
    ]


def test_narrowed_acls_drop_the_sessions_without_refusing_the_device() -> None:
    wide = {
        "rolename": "telemetra-dev-d",
        "acls": [*ACLS, {"acltype": "subscribeLiteral", "topic": "x", "allow": True, "priority": 0}],
    }
    plan = plan_account(spec(), password=None, client=client(), role=wide)
    assert [c["command"] for c in plan.commands] == ["modifyRole", "disableClient", "enableClient"]


def test_someone_elses_client_is_never_touched() -> None:
    admin_client = client(username="d", roles=[{"rolename": "admin"}])
    with pytest.raises(ForeignAccount):
        plan_account(spec(), password="s1", client=admin_client, role=ROLE)
    with pytest.raises(ForeignAccount):
        plan_removal("d", client=admin_client, role=None)
