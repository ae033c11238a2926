"""DynsecProvisioner against a real Mosquitto (dynamic-security plugin), with real paho devices.

Every test gets its own broker (it starts in ~40 ms), so tests cannot see each other's clients.
Negative checks ("nothing arrives") are always paired with a control message published afterwards on
the same connection that *must* arrive: the broker handles one connection's packets in order, so once
the control message is in, a forged message would already have been delivered.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from telemetra.mqtt.dynsec import DynsecError, DynsecProvisioner, device_role_name
from tests.support.mosquitto import (
    DeployBroker,
    MosquittoInstance,
    PahoTestClient,
    deploy_mosquitto,
    init_dynsec_state,
    mosquitto_fixture,
    start_mosquitto,
)

pytestmark = pytest.mark.mosquitto

ROOTS = ("telemetra/{device}/", "heatpump/{device}/")
DOWNLINK = ("telemetra/{device}/cmd", "telemetra/{device}/config")
SERVICE_USER, SERVICE_PASSWORD = "telemetra-backend", "service-secret"


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoInstance]:
    yield from mosquitto_fixture(tmp_path_factory)


def make_provisioner(broker: MosquittoInstance, **overrides: object) -> DynsecProvisioner:
    kwargs: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "username": broker.admin_username,
        "password": broker.admin_password,
        "device_roots": ROOTS,
        "downlink": DOWNLINK,
        "timeout": 3.0,
    }
    kwargs.update(overrides)
    return DynsecProvisioner(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def prov(broker: MosquittoInstance) -> AsyncIterator[DynsecProvisioner]:
    async with make_provisioner(broker) as provisioner:
        await provisioner.ensure_service_account(SERVICE_USER, SERVICE_PASSWORD)
        yield provisioner


class Clients:
    """Opens paho clients against the test broker and closes them all at teardown."""

    def __init__(self, broker: MosquittoInstance) -> None:
        self.broker = broker
        self.opened: list[PahoTestClient] = []

    def new(self, username: str, password: str | None, *, protocol: int = mqtt.MQTTv5) -> PahoTestClient:
        client = PahoTestClient(self.broker, username, password, protocol=protocol)
        self.opened.append(client)
        return client

    async def connected(self, username: str, password: str | None, *, protocol: int = mqtt.MQTTv5) -> PahoTestClient:
        client = self.new(username, password, protocol=protocol)
        rc = await client.connect()
        assert not rc.is_failure, f"{username} refused: {rc}"
        return client

    async def refused(self, username: str, password: str | None) -> str:
        rc = await self.new(username, password).connect()
        assert rc.is_failure, f"{username} was accepted"
        return str(rc)

    async def service(self, *filters: str) -> PahoTestClient:
        client = await self.connected(SERVICE_USER, SERVICE_PASSWORD)
        codes = await client.subscribe(*filters)
        assert not any(rc.is_failure for rc in codes), [str(rc) for rc in codes]
        return client


@pytest.fixture
async def clients(broker: MosquittoInstance) -> AsyncIterator[Clients]:
    pool = Clients(broker)
    yield pool
    for client in pool.opened:
        await client.close()


# ---------------------------------------------------------------------------- uplink


async def test_device_publishes_own_topics_and_service_receives(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    shared = await clients.service("$share/telemetra/telemetra/+/telemetry")
    plain = await clients.service("telemetra/+/telemetry", "heatpump/+/data", "telemetra/+/state")
    device = await clients.connected("dev-a", "pw-a")

    assert not (await device.publish("telemetra/dev-a/telemetry", b'{"t":1}')).is_failure
    msg = await shared.next_message()
    assert (msg.topic, msg.payload) == ("telemetra/dev-a/telemetry", b'{"t":1}')
    assert (await plain.next_message()).topic == "telemetra/dev-a/telemetry"

    # Every configured root is granted, not only the first; retained state too.
    await device.publish("heatpump/dev-a/data", b"{}")
    assert (await plain.next_message()).topic == "heatpump/dev-a/data"
    await device.publish("telemetra/dev-a/state", b"online", retain=True)
    assert (await plain.next_message()).topic == "telemetra/dev-a/state"


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
async def test_device_cannot_publish_as_another_device(prov: DynsecProvisioner, clients: Clients, protocol: int):
    await prov.upsert_device("dev-a", "pw-a")
    await prov.upsert_device("dev-b", "pw-b")
    service = await clients.service("telemetra/#", "heatpump/#")
    device = await clients.connected("dev-a", "pw-a", protocol=protocol)

    forged = [
        "telemetra/dev-b/telemetry",  # another device's uplink
        "heatpump/dev-b/data",
        "telemetra/dev-a/cmd",  # its own downlink: it must not forge commands
        "telemetra/dev-a/config",
        "other/dev-a/telemetry",
    ]
    for topic in forged:
        rc = await device.publish(topic, b"forged")
        if protocol == mqtt.MQTTv5:
            assert str(rc) == "Not authorized"
        else:
            # MQTT 3.1.1 has no PUBACK reason code: Mosquitto acks the refused message as if delivered.
            assert not rc.is_failure
    await device.publish("telemetra/dev-a/telemetry", b"control")

    msg = await service.next_message()
    assert (msg.topic, msg.payload) == ("telemetra/dev-a/telemetry", b"control")
    await service.assert_no_message(0.3)


async def test_device_cannot_subscribe_to_another_devices_downlink(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    await prov.upsert_device("dev-b", "pw-b")
    service = await clients.service("telemetra/+/telemetry")
    device = await clients.connected("dev-a", "pw-a")

    codes = await device.subscribe(
        "telemetra/dev-b/cmd", "telemetra/+/cmd", "#", "$share/g/telemetra/dev-b/cmd", "telemetra/dev-b/#"
    )
    assert [str(rc) for rc in codes] == ["Not authorized"] * 5
    codes = await device.subscribe("telemetra/dev-a/cmd", "telemetra/dev-a/config")
    assert not any(rc.is_failure for rc in codes)

    # dev-b's command first, then dev-a's: dev-a must get exactly its own.
    assert not (await service.publish("telemetra/dev-b/cmd", b"for-b")).is_failure
    await service.publish("telemetra/dev-a/cmd", b"for-a")
    msg = await device.next_message()
    assert (msg.topic, msg.payload) == ("telemetra/dev-a/cmd", b"for-a")
    await device.assert_no_message(0.3)


# ---------------------------------------------------------------------------- credentials


async def test_wrong_or_missing_password_refused(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    await clients.refused("dev-a", "wrong")
    await clients.refused("dev-a", None)
    await clients.refused("no-such-device", "pw-a")
    # Created without a password: exists, but nobody can log in as it yet.
    await prov.upsert_device("dev-nopw", None)
    await clients.refused("dev-nopw", "")
    await clients.connected("dev-a", "pw-a")


async def test_password_rotation(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "old-pw")
    session = await clients.connected("dev-a", "old-pw")

    await prov.set_password("dev-a", "new-pw")
    # Mosquitto drops sessions authenticated with the old password.
    await session.wait_disconnected()
    await clients.refused("dev-a", "old-pw")
    await clients.connected("dev-a", "new-pw")

    # The same through upsert_device.
    await prov.upsert_device("dev-a", "newer-pw")
    await clients.refused("dev-a", "new-pw")
    await clients.connected("dev-a", "newer-pw")


async def test_disable_and_enable(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    session = await clients.connected("dev-a", "pw-a")

    await prov.set_enabled("dev-a", False)
    await session.wait_disconnected()
    await clients.refused("dev-a", "pw-a")
    await prov.set_enabled("dev-a", False)  # idempotent

    await prov.set_enabled("dev-a", True)
    await clients.connected("dev-a", "pw-a")

    # upsert_device carries the enabled flag too, for new and existing clients.
    await prov.upsert_device("dev-a", None, enabled=False)
    await clients.refused("dev-a", "pw-a")
    await prov.upsert_device("dev-new", "pw-new", enabled=False)
    await clients.refused("dev-new", "pw-new")
    await prov.upsert_device("dev-new", None, enabled=True)
    await clients.connected("dev-new", "pw-new")


async def test_delete_device(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    session = await clients.connected("dev-a", "pw-a")

    await prov.delete_device("dev-a")
    await session.wait_disconnected()
    await clients.refused("dev-a", "pw-a")
    await prov.delete_device("dev-a")  # already gone: fine
    await prov.delete_device("never-existed")

    # The role went with it: re-creating starts from scratch and works.
    await prov.upsert_device("dev-a", "pw-2")
    await clients.connected("dev-a", "pw-2")


async def test_unknown_device_operations_raise(prov: DynsecProvisioner):
    with pytest.raises(DynsecError) as excinfo:
        await prov.set_password("ghost", "pw")
    assert (excinfo.value.command, excinfo.value.error) == ("setClientPassword", "Client not found")
    with pytest.raises(DynsecError, match="Client not found"):
        await prov.set_enabled("ghost", True)


async def test_refuses_to_touch_accounts_that_are_not_devices(
    broker: MosquittoInstance, prov: DynsecProvisioner, clients: Clients
):
    # Device ids share Mosquitto's client namespace with the admin and service accounts: a device
    # registered as "admin" must not reset the admin's password, disable or delete it.
    for name in (broker.admin_username, SERVICE_USER):
        with pytest.raises(DynsecError, match="not managed by Telemetra"):
            await prov.upsert_device(name, "device-password")
        with pytest.raises(DynsecError, match="not managed by Telemetra"):
            await prov.set_password(name, "device-password")
        with pytest.raises(DynsecError, match="not managed by Telemetra"):
            await prov.set_enabled(name, False)
        with pytest.raises(DynsecError, match="not managed by Telemetra"):
            await prov.delete_device(name)
    with pytest.raises(DynsecError, match="not managed by Telemetra"):
        await prov.ensure_service_account(broker.admin_username, "service-password")
    await clients.connected(SERVICE_USER, SERVICE_PASSWORD)
    async with make_provisioner(broker):  # the admin still logs in with its own password
        pass


# ---------------------------------------------------------------------------- idempotency


async def test_upsert_is_idempotent_and_does_not_disconnect(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    await prov.upsert_device("dev-a", "pw-a")  # password given again: rewritten, still valid
    service = await clients.service("telemetra/+/telemetry")
    device = await clients.connected("dev-a", "pw-a")

    # A registry resync (no password change) must not touch anything, so the device stays online.
    await prov.upsert_device("dev-a", None)
    await prov.upsert_device("dev-a", None, enabled=True)
    await device.publish("telemetra/dev-a/telemetry", b"still-here")
    assert (await service.next_message()).payload == b"still-here"
    assert not device.disconnected.is_set()


async def test_upsert_repairs_role_after_template_change(broker: MosquittoInstance, clients: Clients):
    async with make_provisioner(broker, device_roots=("telemetra/{device}/",)) as narrow:
        await narrow.ensure_service_account(SERVICE_USER, SERVICE_PASSWORD)
        await narrow.upsert_device("dev-a", "pw-a")
    service = await clients.service("heatpump/#", "telemetra/#")
    device = await clients.connected("dev-a", "pw-a")
    assert str(await device.publish("heatpump/dev-a/data", b"x")) == "Not authorized"

    # A later configuration adds a root: the existing role is rewritten in place. Mosquitto 2.0.11
    # checks publish ACLs live and does not disconnect the role's clients, so the open session gains
    # the new root at once.
    async with make_provisioner(broker) as wide:
        await wide.upsert_device("dev-a", None)
    assert not (await device.publish("heatpump/dev-a/data", b"x")).is_failure
    assert not device.disconnected.is_set()
    assert (await service.next_message()).topic == "heatpump/dev-a/data"


async def test_narrowing_downlink_drops_old_subscriptions(broker: MosquittoInstance, clients: Clients):
    # Mosquitto 2.0.11 keeps subscriptions made under a role's old ACLs after modifyRole, so a
    # narrowing upsert must disconnect the device (it then resubscribes under the new ACLs).
    async with make_provisioner(broker, downlink=("telemetra/{device}/cmd",)) as old:
        await old.ensure_service_account(SERVICE_USER, SERVICE_PASSWORD)
        await old.upsert_device("dev-a", "pw-a")
    device = await clients.connected("dev-a", "pw-a")
    assert not (await device.subscribe("telemetra/dev-a/cmd"))[0].is_failure

    async with make_provisioner(broker, downlink=("telemetra/{device}/command",)) as new:
        await new.upsert_device("dev-a", None)
    await device.wait_disconnected()

    device = await clients.connected("dev-a", "pw-a")  # still enabled
    codes = await device.subscribe("telemetra/dev-a/cmd", "telemetra/dev-a/command")
    assert [str(rc) for rc in codes] == ["Not authorized", "Granted QoS 1"]
    # The former downlink is now an ordinary uplink topic under the device's root.
    assert not (await device.publish("telemetra/dev-a/cmd", b"x")).is_failure
    assert str(await device.publish("telemetra/dev-a/command", b"x")) == "Not authorized"


async def test_concurrent_upserts(broker: MosquittoInstance, prov: DynsecProvisioner, clients: Clients):
    # Within one provisioner operations are serialised; two provisioners (two Telemetra processes)
    # racing to create the same devices hit "already exists" and fall back to updating.
    ids = [f"dev-{i}" for i in range(10)]
    async with make_provisioner(broker) as other:
        await asyncio.gather(
            *(prov.upsert_device(i, f"pw-{i}") for i in ids),
            *(other.upsert_device(i, f"pw-{i}") for i in ids),
        )
    for device_id in (ids[0], ids[-1]):
        await clients.connected(device_id, f"pw-{device_id}")


async def test_upsert_reattaches_missing_role(prov: DynsecProvisioner, clients: Clients):
    await prov.upsert_device("dev-a", "pw-a")
    # Someone detached the role by hand (e.g. with mosquitto_ctrl): the next upsert puts it back.
    await prov._run(  # the raw command API is private; this is the test's only way to break state
        [{"command": "removeClientRole", "username": "dev-a", "rolename": device_role_name("dev-a")}]
    )
    await prov.upsert_device("dev-a", None)
    service = await clients.service("telemetra/+/telemetry")
    device = await clients.connected("dev-a", "pw-a")
    assert not (await device.publish("telemetra/dev-a/telemetry", b"x")).is_failure
    assert (await service.next_message()).payload == b"x"


# ---------------------------------------------------------------------------- service account


async def test_service_account_cannot_use_control_topic(prov: DynsecProvisioner, clients: Clients):
    service = await clients.connected(SERVICE_USER, SERVICE_PASSWORD)
    codes = await service.subscribe("$CONTROL/dynamic-security/v1/response", "$CONTROL/#")
    assert [str(rc) for rc in codes] == ["Not authorized", "Not authorized"]
    forged = b'{"commands":[{"command":"createClient","username":"evil","password":"evil"}]}'
    assert str(await service.publish("$CONTROL/dynamic-security/v1", forged)) == "Not authorized"
    await clients.refused("evil", "evil")


async def test_ensure_service_account_keeps_sessions_and_rotates(prov: DynsecProvisioner, clients: Clients):
    session = await clients.connected(SERVICE_USER, SERVICE_PASSWORD)
    # Another Telemetra instance starting with the same credentials must not kick this one.
    await prov.ensure_service_account(SERVICE_USER, SERVICE_PASSWORD)
    await session.publish("telemetra/x/cmd", b"ping")
    assert not session.disconnected.is_set()

    await prov.ensure_service_account(SERVICE_USER, "rotated")
    await session.wait_disconnected()
    await clients.refused(SERVICE_USER, SERVICE_PASSWORD)
    await clients.connected(SERVICE_USER, "rotated")


# ---------------------------------------------------------------------------- validation & errors


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "+", "#", "nul\x00"])
async def test_rejects_ids_special_to_mqtt(bad: str):
    # Validation happens before any I/O, so no broker is needed.
    provisioner = DynsecProvisioner(
        host="127.0.0.1", port=1, username="u", password="p", device_roots=ROOTS, downlink=DOWNLINK
    )
    for call in (
        provisioner.upsert_device(bad, "pw"),
        provisioner.set_password(bad, "pw"),
        provisioner.set_enabled(bad, True),
        provisioner.delete_device(bad),
    ):
        with pytest.raises(ValueError, match="invalid device id"):
            await call


def test_rejects_bad_topic_templates():
    with pytest.raises(ValueError):
        DynsecProvisioner(
            host="h", port=1, username="u", password="p", device_roots=("telemetra/#",), downlink=DOWNLINK
        )
    with pytest.raises(ValueError):
        DynsecProvisioner(
            host="h", port=1, username="u", password="p", device_roots=ROOTS, downlink=("telemetra/+/cmd",)
        )


async def test_wrong_admin_credentials_fail_fast(broker: MosquittoInstance):
    with pytest.raises(DynsecError, match="connection refused"):
        async with make_provisioner(broker, password="wrong"):
            pass


async def test_unreachable_broker_fails_fast(broker: MosquittoInstance):
    broker.stop()
    with pytest.raises(DynsecError, match="connect"):
        async with make_provisioner(broker):
            pass


async def test_non_admin_account_gets_error_not_hang(prov: DynsecProvisioner, broker: MosquittoInstance):
    # The service account may not subscribe to the response topic: connecting reports it at once.
    with pytest.raises(DynsecError, match="refused"):
        async with make_provisioner(broker, username=SERVICE_USER, password=SERVICE_PASSWORD):
            pass


async def test_tls_context_is_used(broker: MosquittoInstance):
    # The harness broker speaks plain MQTT, so a TLS handshake must fail rather than fall back silently.
    context = ssl.create_default_context()
    with pytest.raises(DynsecError, match="connect"):
        async with make_provisioner(broker, tls=context):
            pass


# ---------------------------------------------------------------------------- harness


def test_harness_without_dynsec_allows_anonymous(tmp_path: Path):
    with start_mosquitto(tmp_path, dynsec=False) as instance:
        assert instance.process.poll() is None
        assert "allow_anonymous true" in (instance.workdir / "mosquitto.conf").read_text()


def test_harness_reports_broker_log_on_failure(tmp_path: Path):
    with pytest.raises(RuntimeError, match="Broker log"):
        start_mosquitto(tmp_path, extra_conf="this_is_not_an_option 1")


def test_harness_restart_keeps_dynsec_state(broker: MosquittoInstance):
    async def provision() -> None:
        async with make_provisioner(broker) as provisioner:
            await provisioner.upsert_device("dev-a", "pw-a")

    asyncio.run(provision())
    restarted = broker.restart()
    try:
        assert restarted.port == broker.port

        async def login() -> str:
            client = PahoTestClient(restarted, "dev-a", "pw-a")
            rc = await client.connect()
            await client.close()
            return str(rc)

        assert asyncio.run(login()) == "Success"
    finally:
        restarted.stop()


async def test_state_file_written_without_mosquitto_ctrl(tmp_path: Path):
    # The fallback for installs without mosquitto_ctrl must produce a file the plugin accepts.
    init_dynsec_state(tmp_path / "dynamic-security.json", "admin", "hand-made", use_ctrl=False)
    with start_mosquitto(tmp_path, admin_password="hand-made") as instance:
        async with make_provisioner(instance) as provisioner:
            await provisioner.upsert_device("dev-a", "pw-a")
        client = PahoTestClient(instance, "dev-a", "pw-a")
        assert not (await client.connect()).is_failure
        await client.close()


# ---------------------------------------------------------------------------- deploy config


@pytest.fixture
def deploy_broker() -> Iterator[DeployBroker]:
    with deploy_mosquitto() as broker:
        yield broker


async def test_deploy_config_runs_with_telemetra(deploy_broker: DeployBroker):
    """The production config parses, refuses anonymous clients, serves WebSockets and saves dynsec state."""
    instance = deploy_broker.instance
    anonymous = PahoTestClient(instance, None, None)
    assert (await anonymous.connect()).is_failure

    async with make_provisioner(instance) as provisioner:
        await provisioner.ensure_service_account(SERVICE_USER, SERVICE_PASSWORD)
        await provisioner.upsert_device("dev-ws", "pw-ws")
    service = PahoTestClient(instance, SERVICE_USER, SERVICE_PASSWORD)
    device = PahoTestClient(instance, "dev-ws", "pw-ws", transport="websockets", port=deploy_broker.ws_port)
    try:
        assert not (await service.connect()).is_failure
        await service.subscribe("$share/telemetra/telemetra/+/telemetry")
        assert not (await device.connect()).is_failure
        await device.publish("telemetra/dev-ws/telemetry", b"over-ws")
        assert (await service.next_message()).payload == b"over-ws"
    finally:
        await device.close()
        await service.close()

    instance.stop()  # flushes persistence; a root-owned data dir shows up as "Error saving ..."
    log = instance.log()
    assert "Error saving" not in log, log
    state = (deploy_broker.data / "dynamic-security.json").read_text()
    assert '"dev-ws"' in state
