"""The embedded broker over real sockets, driven by real paho-mqtt 2.x clients (MQTT 3.1.1).

paho runs its network loop in a thread while the broker runs in the test's event loop, so every wait
on a paho client goes through `asyncio.to_thread` to keep the broker serving meanwhile.

What devices publish goes to the broker's `DeviceSink` (in the app, the ingest pipeline); here a
`RecordingSink` satisfying the same protocol records it and decides when a QoS 1 message counts as
committed. Downlink goes in through `EmbeddedBroker.publish`, as the app's command service does.

Denials are proven non-vacuously: the denied action is followed by a permitted "control" message on
the same path, which must be the first thing that arrives (one publisher's messages are delivered in
order, so a leaked denied message would have arrived before it).
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from telemetra.mqtt.acl import MqttPrincipal, TopicAcl
from telemetra.mqtt.embedded import BrokerPortInUse, EmbeddedBroker

HOST = "127.0.0.1"
WAIT_S = 2.0
QUIET_S = 0.3  # how long "nothing else arrives" is watched after the control message

USERS: dict[str, tuple[str, MqttPrincipal]] = {
    "svc": ("svc-secret", MqttPrincipal("svc", None, is_service=True)),
    "dev-a": ("a-secret", MqttPrincipal("dev-a", "A")),
    "dev-b": ("b-secret", MqttPrincipal("dev-b", "B")),
}
PASSWORDS = {name: password for name, (password, _principal) in USERS.items()}


async def authenticate(username: str | None, password: str | None) -> MqttPrincipal | None:
    entry = USERS.get(username or "")
    return entry[1] if entry is not None and entry[0] == password else None


class RecordingSink:
    """A ``DeviceSink``: records what devices publish; QoS 1 messages are "committed" at once unless
    ``hold`` is set, in which case the test resolves their futures."""

    def __init__(self) -> None:
        self._room = asyncio.Event()
        self._room.set()
        self.messages: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        self.refused: asyncio.Queue[tuple[str | None, str, bytes]] = asyncio.Queue()
        self.hold = False
        self.held: list[asyncio.Future[None]] = []

    @property
    def room(self) -> asyncio.Event:
        return self._room

    def offer(self, topic: str, payload: bytes, *, acknowledge: bool) -> asyncio.Future[None] | None:
        self.messages.put_nowait((topic, payload, acknowledge))
        if not acknowledge:
            return None
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.held.append(future)
        else:
            future.set_result(None)
        return future

    def refuse(self, device_id: str | None, topic: str, payload: bytes) -> None:
        self.refused.put_nowait((device_id, topic, payload))

    async def next(self) -> tuple[str, bytes, bool]:
        return await asyncio.wait_for(self.messages.get(), WAIT_S)


class Paho:
    """A paho client with awaitable connect / subscribe / publish / receive."""

    def __init__(
        self,
        port: int,
        username: str | None,
        *,
        password: str | None = None,
        client_id: str = "",
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if username is not None:
            self.client.username_pw_set(username, password if password is not None else PASSWORDS[username])
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.connack: ReasonCode | None = None
        self.disconnected = threading.Event()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connacked = threading.Event()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._suback_events: dict[int, threading.Event] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        self.connack = rc
        self._connacked.set()
        if rc.is_failure:
            self.client.disconnect()  # no automatic reconnect attempts

    def _on_disconnect(self, *_args: object) -> None:
        self.disconnected.set()
        self.client.disconnect()  # stops paho's reconnect loop, so loop_stop() returns at once

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, codes: list[ReasonCode], _p: object) -> None:
        self._subacks[mid] = codes
        self._suback_events.setdefault(mid, threading.Event()).set()

    async def connect(self) -> ReasonCode:
        await asyncio.to_thread(self.client.connect, HOST, self.port, 30)
        self.client.loop_start()
        assert await asyncio.to_thread(self._connacked.wait, WAIT_S), "no CONNACK"
        assert self.connack is not None
        return self.connack

    async def subscribe(self, topic_filter: str, qos: int = 1) -> ReasonCode:
        # Registered before sending so a fast SUBACK cannot be missed.
        _result, mid = self.client.subscribe(topic_filter, qos)
        assert mid is not None
        event = self._suback_events.setdefault(mid, threading.Event())
        assert await asyncio.to_thread(event.wait, WAIT_S), f"no SUBACK for {topic_filter}"
        return self._subacks[mid][0]

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, WAIT_S)

    async def next_message(self) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, True, WAIT_S)

    async def assert_quiet(self) -> None:
        with pytest.raises(queue.Empty):
            extra = await asyncio.to_thread(self.messages.get, True, QUIET_S)
            pytest.fail(f"unexpected message on {extra.topic}: {extra.payload!r}")

    async def drop_connection(self) -> None:
        """Vanish without DISCONNECT, as a device losing power does (its will must fire)."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(self.client.loop_stop)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def broker(sink: RecordingSink) -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker(
        host=HOST, port=0, authenticate=authenticate, acl=TopicAcl.for_prefix("telemetra"), sink=sink
    ) as running:
        yield running


@pytest.fixture
def clients() -> Iterator[list[Paho]]:
    made: list[Paho] = []
    yield made
    for client in made:
        client.close()


class Connect(Protocol):
    async def __call__(
        self,
        username: str | None,
        *,
        password: str | None = None,
        client_id: str = "",
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> Paho: ...


@pytest.fixture
def connect(broker: EmbeddedBroker, clients: list[Paho]) -> Connect:
    async def _connect(
        username: str | None,
        *,
        password: str | None = None,
        client_id: str = "",
        clean_session: bool = True,
        will: tuple[str, bytes] | None = None,
    ) -> Paho:
        client = Paho(
            broker.port, username, password=password, client_id=client_id, clean_session=clean_session, will=will
        )
        clients.append(client)
        rc = await client.connect()
        assert not rc.is_failure, f"{username} refused: {rc}"
        return client

    return _connect


async def refused(
    broker: EmbeddedBroker,
    clients: list[Paho],
    username: str | None,
    *,
    password: str | None = None,
    client_id: str = "",
    clean_session: bool = True,
    will: tuple[str, bytes] | None = None,
) -> str:
    client = Paho(broker.port, username, password=password, client_id=client_id, clean_session=clean_session, will=will)
    clients.append(client)
    rc = await client.connect()
    assert rc.is_failure
    return str(rc)


async def test_device_messages_go_to_the_sink_and_qos1_is_acknowledged_only_after_commit(
    connect: Connect, sink: RecordingSink
) -> None:
    sink.hold = True
    device = await connect("dev-a")
    info = device.client.publish("telemetra/A/telemetry", b'{"t":21.5}', qos=1)
    assert await sink.next() == ("telemetra/A/telemetry", b'{"t":21.5}', True)
    # Positive control for "no PUBACK yet": a SUBACK asked for after the PUBLISH has come back, and a PUBACK
    # sent on receipt (as amqtt does) would have been written before it on the same connection.
    await device.subscribe("telemetra/A/cmd")
    assert not info.is_published()
    sink.held.pop().set_result(None)  # committed
    await asyncio.to_thread(info.wait_for_publish, WAIT_S)
    assert info.is_published()
    await device.publish("telemetra/A/event/boot", b"{}", qos=0)
    assert await sink.next() == ("telemetra/A/event/boot", b"{}", False)


@pytest.mark.parametrize(
    "denied_topic",
    ["telemetra/B/telemetry", "telemetra/AB/telemetry", "telemetra/A/cmd", "telemetra/A/config", "other/A/x"],
)
async def test_device_publishes_only_under_its_own_root(
    connect: Connect, sink: RecordingSink, denied_topic: str
) -> None:
    device = await connect("dev-a")
    await device.publish(denied_topic, b"forged", retain=True)
    await device.publish("telemetra/A/telemetry", b"control")
    assert await sink.next() == ("telemetra/A/telemetry", b"control", True)  # the forged one never came
    assert sink.messages.empty()
    assert sink.refused.get_nowait() == ("A", denied_topic, b"forged")  # handed on to be kept as a refusal


@pytest.mark.parametrize(
    "topic_filter",
    ["telemetra/B/cmd", "telemetra/+/cmd", "telemetra/#", "#", "$share/g/telemetra/B/cmd", "telemetra/A/telemetry"],
)
async def test_device_subscribes_only_to_its_own_downlink(
    connect: Connect, broker: EmbeddedBroker, topic_filter: str
) -> None:
    device = await connect("dev-a")
    assert (await device.subscribe(topic_filter)).is_failure
    assert not (await device.subscribe("telemetra/A/cmd")).is_failure
    await broker.publish("telemetra/B/cmd", b"for B", qos=1, retain=False)
    await broker.publish("telemetra/A/cmd", b"control", qos=1, retain=False)
    message = await device.next_message()
    assert (message.topic, message.payload) == ("telemetra/A/cmd", b"control")
    await device.assert_quiet()


async def test_wrong_password_is_refused(broker: EmbeddedBroker, clients: list[Paho]) -> None:
    assert await refused(broker, clients, "dev-a", password="wrong") == "Bad user name or password"
    assert await refused(broker, clients, "nobody", password="x") == "Bad user name or password"


async def test_anonymous_is_refused(broker: EmbeddedBroker, clients: list[Paho]) -> None:
    assert await refused(broker, clients, None) == "Not authorized"


async def test_failing_authenticate_answers_server_unavailable(clients: list[Paho], sink: RecordingSink) -> None:
    async def broken(_username: str | None, _password: str | None) -> MqttPrincipal | None:
        raise ConnectionError("registry down")

    async with EmbeddedBroker(
        host=HOST, port=0, authenticate=broken, acl=TopicAcl.for_prefix("t"), sink=sink
    ) as running:
        assert await refused(running, clients, "dev-a") == "Server unavailable"


async def test_retained_state_and_last_will_go_to_the_sink(connect: Connect, sink: RecordingSink) -> None:
    device = await connect("dev-a", client_id="dev-a", will=("telemetra/A/state", b"offline"))
    await device.publish("telemetra/A/state", b"online", retain=True)
    assert await sink.next() == ("telemetra/A/state", b"online", True)
    await device.drop_connection()
    assert await sink.next() == ("telemetra/A/state", b"offline", False)  # the will, not acknowledged to anyone


async def test_will_on_a_topic_the_device_may_not_publish_is_refused(
    broker: EmbeddedBroker, clients: list[Paho]
) -> None:
    rc = await refused(broker, clients, "dev-a", will=("telemetra/B/state", b"offline"))
    assert rc == "Not authorized"


async def test_retained_messages_of_other_devices_are_not_replayed_on_connect(
    connect: Connect, broker: EmbeddedBroker
) -> None:
    # amqtt 0.12.1 replays, on CONNECT, retained messages for every filter anyone subscribed to.
    device_b = await connect("dev-b")
    await device_b.subscribe("telemetra/B/config")
    await broker.publish("telemetra/B/config", b"B secrets", qos=1, retain=True)
    assert (await device_b.next_message()).payload == b"B secrets"

    device_a = await connect("dev-a")
    await broker.publish("telemetra/A/config", b"A config", qos=1, retain=True)
    await device_a.subscribe("telemetra/A/config")
    message = await device_a.next_message()
    assert (message.topic, message.payload) == ("telemetra/A/config", b"A config")
    await device_a.assert_quiet()


async def test_unauthenticated_client_cannot_disturb_a_session_by_client_id(
    broker: EmbeddedBroker, clients: list[Paho], connect: Connect
) -> None:
    device = await connect("dev-a", client_id="dev-a-session")
    await device.subscribe("telemetra/A/cmd")
    for clean_session in (True, False):
        await refused(
            broker, clients, "dev-a", password="guess", client_id="dev-a-session", clean_session=clean_session
        )
    await broker.publish("telemetra/A/cmd", b"still subscribed", qos=1, retain=False)
    assert (await device.next_message()).payload == b"still subscribed"
    assert not device.disconnected.is_set()


async def test_another_user_cannot_take_over_a_connected_client_id(
    broker: EmbeddedBroker, clients: list[Paho], connect: Connect
) -> None:
    device = await connect("dev-a", client_id="dev-a-session", clean_session=False)
    await device.subscribe("telemetra/A/cmd")
    rc = await refused(broker, clients, "dev-b", client_id="dev-a-session", clean_session=False)
    assert rc == "Client identifier not valid"
    await broker.publish("telemetra/A/cmd", b"to A", qos=1, retain=False)
    assert (await device.next_message()).payload == b"to A"


async def test_reconnect_with_same_client_id_closes_the_old_connection(
    connect: Connect, broker: EmbeddedBroker, sink: RecordingSink
) -> None:
    old = await connect("dev-a", client_id="dev-a", will=("telemetra/A/state", b"offline"))
    new = await connect("dev-a", client_id="dev-a")
    assert await asyncio.to_thread(old.disconnected.wait, WAIT_S)
    assert await sink.next() == ("telemetra/A/state", b"offline", False)
    await new.subscribe("telemetra/A/cmd")
    await broker.publish("telemetra/A/cmd", b"reaches the new connection", qos=1, retain=False)
    assert (await new.next_message()).payload == b"reaches the new connection"


async def test_shared_subscriptions_are_refused_not_silently_empty(connect: Connect) -> None:
    service = await connect("svc")
    assert (await service.subscribe("$share/telemetra/telemetra/+/telemetry")).is_failure


async def test_port_in_use_is_reported_clearly() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        embedded = EmbeddedBroker(
            host=HOST, port=port, authenticate=authenticate, acl=TopicAcl.for_prefix("t"), sink=RecordingSink()
        )
        with pytest.raises(BrokerPortInUse) as caught:
            await embedded.__aenter__()
    assert f"{HOST}:{port}" in str(caught.value)
    assert "TELEMETRA_MQTT_PORT" in str(caught.value)
    assert _other_tasks() == set()
    with pytest.raises(RuntimeError):
        _ = embedded.port


async def test_shutdown_closes_every_connection_and_task(clients: list[Paho], sink: RecordingSink) -> None:
    async with EmbeddedBroker(
        host=HOST, port=0, authenticate=authenticate, acl=TopicAcl.for_prefix("t"), sink=sink
    ) as running:
        device = Paho(running.port, "dev-a")
        clients.append(device)
        assert not (await device.connect()).is_failure
        # A connection that never sends CONNECT is invisible to amqtt's own shutdown.
        silent = await asyncio.open_connection(HOST, running.port)
        await asyncio.sleep(0.05)
    assert _other_tasks() == set()
    assert await asyncio.to_thread(device.disconnected.wait, WAIT_S)
    assert await silent[0].read() == b""  # closed by the broker
    silent[1].close()


async def test_a_connection_that_never_sends_connect_is_closed(sink: RecordingSink) -> None:
    # Also what an MQTT 5 client experiences: amqtt 0.12 cannot parse its CONNECT and waits for more.
    async with EmbeddedBroker(
        host=HOST, port=0, authenticate=authenticate, acl=TopicAcl.for_prefix("t"), connect_timeout=0.2, sink=sink
    ) as running:
        reader, writer = await asyncio.open_connection(HOST, running.port)
        async with asyncio.timeout(WAIT_S):
            assert await reader.read() == b""
        writer.close()


def _other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


def test_deliveries_are_checked_against_the_current_principal() -> None:
    # Second line of defence behind client-id ownership: a session carrying a subscription its
    # current principal could not have made still receives nothing through it.
    from amqtt.contexts import Action
    from amqtt.session import Session

    from telemetra.mqtt._amqtt_broker import _PRINCIPAL_KEY, AccessGate

    gate = AccessGate(authenticate, TopicAcl.for_prefix("telemetra"))
    session = Session()
    session.attributes[_PRINCIPAL_KEY] = USERS["dev-a"][1]
    assert gate.permits(session, "telemetra/A/cmd", Action.RECEIVE)
    assert not gate.permits(session, "telemetra/B/cmd", Action.RECEIVE)
    assert not gate.permits(session, "telemetra/B/telemetry", Action.RECEIVE)
    assert not gate.permits(Session(), "telemetra/A/cmd", Action.RECEIVE)  # never authenticated
