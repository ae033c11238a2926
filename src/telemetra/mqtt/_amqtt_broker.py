"""amqtt 0.12.1 glue for the embedded broker: the access gate and a hardened `Broker` subclass.

We hook in by overriding `Broker` methods, not through amqtt's plugin API, because both plugin hooks
are unsafe for us in 0.12.1:
- auth plugins (`BaseAuthPlugin`) run only after amqtt has acted on the CONNECT's client id (deleted
  the existing session of that id, or adopted it with its subscriptions), so anyone who knows a client
  id could strip a connected client of its subscriptions without credentials;
- topic plugins (`BaseTopicPlugin`) are awaited through a gather of new tasks while the broadcast loop
  iterates the live subscription dict, so a concurrent (un)subscribe or disconnect makes that
  broadcast fail with "dictionary changed size during iteration" and the message is lost.
Revoking a device (`GuardedBroker.disconnect_device`) likewise goes through amqtt's private session
table, `Broker._sessions`.

What devices publish does not go through amqtt's broadcast to a subscriber (a loopback client, as it
once did): it is handed in process to a `DeviceSink`, the ingest path. A QoS 1 PUBLISH is answered with
PUBACK only once the sink has committed it (`_DeviceHandler._handle_qos1_message_flow`), so a crash
loses nothing a device was told was received; the device's connection stops being read while the sink
is full (`_GatedReader`), which is TCP backpressure instead of an unbounded backlog. QoS 0, the QoS 2
flow (acknowledged by amqtt on receipt) and Last Wills reach the sink through `_broadcast_message`.

The overridden methods are private API of the pinned amqtt version; tests/mqtt covers each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from enum import IntEnum
from typing import Any, Protocol

from amqtt.adapters import ReaderAdapter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, BrokerConfig, ListenerConfig
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import INCOMING, ApplicationMessage, Session
from amqtt.utils import gen_client_id

from telemetra.mqtt.acl import MqttPrincipal, TopicAcl

logger = logging.getLogger(__name__)

Authenticate = Callable[[str | None, str | None], Awaitable[MqttPrincipal | None]]

# amqtt reserves `Session.attributes` for extensions, keyed by a namespaced string. Keeping the
# principal on the session (rather than in a dict keyed by client id) means it disappears with the
# session, and adopting a persistent session always overwrites it.
_PRINCIPAL_KEY = "telemetra.principal"

_SHARED_PREFIX = "$share/"

# How long shutdown waits for connections to end after closing their sockets, before cancelling.
_SHUTDOWN_GRACE_S = 2.0
# Messages kept for one disconnected persistent session (commands, configuration); past this the oldest
# are dropped (amqtt would keep them without bound).
MAX_OFFLINE_MESSAGES = 1000


class DeviceSink(Protocol):
    """Where the broker hands what devices publish."""

    @property
    def room(self) -> asyncio.Event:
        """Set while the sink takes more; device connections are not read while it is clear."""
        ...

    def offer(self, topic: str, payload: bytes, *, acknowledge: bool) -> asyncio.Future[None] | None:
        """Take a message; with ``acknowledge``, a future that resolves once it is committed."""
        ...

    def refuse(self, device_id: str | None, topic: str, payload: bytes) -> None:
        """A publish the ACL did not allow: counted and kept as a rejected message."""
        ...


class Connack(IntEnum):
    """MQTT 3.1.1 CONNACK return codes (§3.2.2.3) that the gate answers with."""

    ACCEPTED = 0
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_PASSWORD = 4
    NOT_AUTHORIZED = 5


def principal_of(session: Session | None) -> MqttPrincipal | None:
    if session is None:
        return None
    principal = session.attributes.get(_PRINCIPAL_KEY)
    return principal if isinstance(principal, MqttPrincipal) else None


class AccessGate:
    """Connect-time authentication and per-packet authorization."""

    def __init__(self, authenticate: Authenticate, acl: TopicAcl) -> None:
        self._authenticate = authenticate
        self._acl = acl

    async def admit(self, session: Session) -> Connack:
        """Authenticate a fresh CONNECT; on success the principal is stored on the session."""
        if not session.username:
            logger.info("MQTT connection refused: anonymous (client id %r)", session.client_id)
            return Connack.NOT_AUTHORIZED
        try:
            principal = await self._authenticate(session.username, session.password)
        except Exception:
            # "Server unavailable" tells the device to retry later, unlike "bad credentials".
            logger.exception("MQTT authentication failed with an error for user %r", session.username)
            return Connack.SERVER_UNAVAILABLE
        if principal is None:
            logger.info("MQTT connection refused: bad credentials for user %r", session.username)
            return Connack.BAD_USERNAME_PASSWORD
        # amqtt publishes the Last Will without consulting topic plugins, so a will on a topic the
        # principal may not publish to would bypass the ACL; refuse it at CONNECT like Mosquitto does.
        will_topic = session.will_topic if session.will_flag else None
        if will_topic is not None and not self._acl.may_publish(principal, will_topic):
            logger.info("MQTT connection refused: user %r may not publish its will to %r", session.username, will_topic)
            return Connack.NOT_AUTHORIZED
        session.attributes[_PRINCIPAL_KEY] = principal
        return Connack.ACCEPTED

    def permits(self, session: Session | None, topic: str | None, action: Action | None) -> bool:
        principal = principal_of(session)
        if principal is None or topic is None:
            return False
        if action == Action.PUBLISH:
            return self._acl.may_publish(principal, topic)
        if action == Action.SUBSCRIBE:
            return self._acl.may_subscribe(principal, topic)
        if action == Action.RECEIVE:
            # Checked per delivery. A device subscribes only to exact topics, so "may receive" is
            # "may subscribe to that topic"; a second line of defence should a session ever carry a
            # subscription its current principal could not have made.
            return self._acl.may_subscribe(principal, topic)
        return False


class _KeySnapshotDict(dict[str, list[tuple[Session, int]]]):
    """A dict whose plain iteration walks a copy of its keys.

    Upstream loops `for topic in self._subscriptions:` with an await inside (retained-message replay
    on CONNECT); any subscribe or disconnect during that await would otherwise end the loop with
    "dictionary changed size during iteration" and crash the connecting client's task.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(self.keys()))


async def _close_quietly(writer: WriterAdapter) -> None:
    with contextlib.suppress(OSError):
        await writer.close()


async def _end_connection(session: Session, handler: BrokerProtocolHandler) -> None:
    """Have a connected session's own message loop disconnect it (it stops the handler, closing the
    socket, and marks the session disconnected), without publishing its Last Will."""
    session.will_flag = False
    # Sets the handler's disconnect waiter, which the message loop waits on; unlike handler.stop()
    # from this task, nothing here can block on the connection (a full socket buffer, a reader task
    # that never started).
    await handler.handle_connection_closed()


class _GatedReader(ReaderAdapter):  # type: ignore[misc]
    """Reads a connection only while the sink has room."""

    def __init__(self, inner: ReaderAdapter, room: asyncio.Event) -> None:
        self._inner = inner
        self._room = room

    async def read(self, n: int = -1) -> bytes:
        if not self._room.is_set():
            await self._room.wait()
        data: bytes = await self._inner.read(n)
        return data

    def feed_eof(self) -> None:
        self._inner.feed_eof()


class _DeviceHandler(BrokerProtocolHandler):  # type: ignore[misc]
    """A connection's protocol handler whose device PUBLISHes go to the sink, QoS 1 acknowledged after commit."""

    broker: GuardedBroker | None = None

    def attach(self, session: Session, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        sink = self.broker.sink if self.broker is not None else None
        super().attach(session, _GatedReader(reader, sink.room) if sink is not None else reader, writer)

    async def _handle_qos1_message_flow(self, app_message: ApplicationMessage) -> None:
        broker = self.broker
        if broker is None or broker.sink is None or getattr(app_message, "direction", None) != INCOMING:
            await super()._handle_qos1_message_flow(app_message)
            return
        if not await broker.take_from_device(self, app_message, acknowledge=True):
            return
        puback = PubackPacket.build(app_message.packet_id)
        await self._send_packet(puback)
        app_message.puback_packet = puback

    async def _handle_qos0_message_flow(self, app_message: ApplicationMessage) -> None:
        broker = self.broker
        if broker is None or broker.sink is None or getattr(app_message, "direction", None) != INCOMING:
            await super()._handle_qos0_message_flow(app_message)
            return
        await broker.take_from_device(self, app_message, acknowledge=False)


def _valid_publish_topic(topic: str | None) -> bool:
    # What upstream's delivery closes the connection for ([MQTT-4.7.3-1], [MQTT-3.3.2-2], [MQTT-4.7.2-1]).
    return bool(topic) and "#" not in topic and "+" not in topic and not topic.startswith("$")  # type: ignore[union-attr]


class GuardedBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's Broker authenticating before session handling, authorizing through the gate."""

    def __init__(
        self, config: BrokerConfig, gate: AccessGate, *, connect_timeout: float, sink: DeviceSink | None = None
    ) -> None:
        super().__init__(config)
        self._subscriptions: dict[str, list[tuple[Session, int]]] = _KeySnapshotDict()
        self._gate = gate
        self.sink = sink
        self.offline_dropped = 0
        self._connect_timeout = connect_timeout
        # asyncio's server runs each connection in its own task; amqtt tracks only connections that
        # completed CONNECT, so we keep all of them to close and await them on shutdown.
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        # Per connection not yet in its message loop: the device ids revoked meanwhile. Such a
        # connection may have authenticated with the revoked credentials without being in `_sessions`
        # yet, out of `disconnect_device`'s reach; it checks this set before serving its client.
        self._admitting: dict[asyncio.Task[Any], set[str]] = {}

    async def stream_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio always runs this callback in a task
            raise RuntimeError("stream_connected must run in a task")
        task.set_name(f"mqtt-connection {writer.get_extra_info('peername')}")
        self._connections[task] = writer
        self._admitting[task] = set()
        try:
            await super().stream_connected(reader, writer, listener_name)
        finally:
            del self._connections[task]
            self._admitting.pop(task, None)

    async def shutdown(self) -> None:
        await super().shutdown()
        # Left over: connections that never completed CONNECT. Closing the socket ends their read.
        for writer in self._connections.values():
            writer.close()
        tasks = list(self._connections)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        peer = f"{remote_address}:{remote_port}"
        try:
            # Upstream waits forever for the CONNECT (an MQTT 5 CONNECT, which it misparses, hangs it).
            async with asyncio.timeout(self._connect_timeout):
                handler, session = await _DeviceHandler.init_from_connect(reader, writer, self.plugins_manager)
                handler.broker = self
        except (AMQTTError, MQTTError, NoDataError, TimeoutError, OSError) as exc:
            await _close_quietly(writer)
            # Broker._client_connected handles these three types (releases the listener slot).
            if isinstance(exc, AMQTTError | MQTTError | NoDataError):
                raise
            raise NoDataError(f"no valid CONNECT from {peer} ({type(exc).__name__})") from exc

        verdict = await self._gate.admit(session)
        if verdict == Connack.ACCEPTED:
            verdict = await self._claim_client_id(session)
        if verdict == Connack.ACCEPTED and self._revoked_while_admitting(session):
            # Authenticated against credentials revoked while that was under way.
            logger.info("MQTT connection refused: the credentials of user %r were just revoked", session.username)
            verdict = Connack.NOT_AUTHORIZED
        if verdict != Connack.ACCEPTED:
            with contextlib.suppress(OSError):
                await ConnackPacket.build(0, int(verdict)).to_stream(writer)
            await _close_quietly(writer)
            raise MQTTError(f"connection from {peer} refused: {verdict.name}")

        # From here on as upstream, now that the client id is known to be used by its owner.
        if session.clean_session:
            if session.client_id:
                await self._disconnect_previous(session.client_id)
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(existing, name, getattr(session, name))
            existing.attributes[_PRINCIPAL_KEY] = session.attributes[_PRINCIPAL_KEY]
            session = existing
            session.parent = 1
        else:
            session.parent = 0

        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _disconnect_previous(self, client_id: str) -> None:
        # Upstream drops the old session of a clean-session reconnect without closing its connection,
        # leaving it open but deaf; close it the way upstream's persistent-session takeover does.
        entry = self._sessions.get(client_id)
        if entry is not None and entry[0].transitions.is_connected():
            await entry[1].handle_connection_closed()
            await entry[1].stop()

    async def disconnect_device(self, device_id: str, *, forget: bool = False) -> int:
        """Close every connection authenticated as `device_id`; returns how many were open.

        For credentials that stopped being valid (rotated, device disabled or deleted). As Mosquitto's
        dynamic security does, the Last Will is not published. A persistent session survives, for the
        device to resume with its new credentials, unless `forget` (the device is gone): then its
        subscriptions and queued messages are dropped too.
        """
        for revoked in self._admitting.values():
            revoked.add(device_id)
        closed = 0
        for client_id, (session, handler) in list(self._sessions.items()):
            principal = principal_of(session)
            if principal is None or principal.device_id != device_id:
                continue
            if forget:
                # No principal: no more subscribing or receiving, should the connection still be
                # handling a packet; and no adoption by a later device of the same id.
                del session.attributes[_PRINCIPAL_KEY]
            if session.transitions.is_connected():
                closed += 1
                logger.info("MQTT connection of %r (client id %r) closed: credentials revoked", device_id, client_id)
                await _end_connection(session, handler)
            if forget and self._sessions.get(client_id, (None, None))[0] is session:
                await self._delete_session(client_id)
        return closed

    def _revoked_while_admitting(self, session: Session) -> bool:
        principal = principal_of(session)
        task = asyncio.current_task()
        revoked = self._admitting.get(task) if task is not None else None
        return principal is not None and revoked is not None and principal.device_id in revoked

    async def _client_message_loop(self, session: Session, handler: BrokerProtocolHandler) -> None:
        # The connection is now in `_sessions`, where `disconnect_device` finds it; a revocation that
        # happened since its authentication was not yet able to.
        if self._revoked_while_admitting(session):
            logger.info("MQTT connection of user %r closed: credentials revoked while connecting", session.username)
            await _end_connection(session, handler)
        task = asyncio.current_task()
        if task is not None:
            self._admitting.pop(task, None)
        try:
            await super()._client_message_loop(session, handler)
        finally:
            # Upstream leaves the loop without disconnecting after a protocol violation (a PUBLISH to
            # a wildcard, `$` or empty topic) or a cancellation, leaving a connection that is still
            # delivered to but that no loop would ever notice a revocation on. End it.
            if session.transitions.is_connected() and self._sessions.get(session.client_id, (None, None))[1] is handler:
                await self._stop_handler(handler)
                session.transitions.disconnect()

    async def _claim_client_id(self, session: Session) -> Connack:
        """Keep one principal from taking over, or inheriting, another principal's client id."""
        entry = self._sessions.get(session.client_id) if session.client_id else None
        if entry is None:
            return Connack.ACCEPTED
        existing: Session = entry[0]
        if principal_of(existing) == principal_of(session):
            return Connack.ACCEPTED
        if existing.transitions.is_connected():
            logger.info("MQTT connection refused: client id %r is in use by another user", session.client_id)
            return Connack.IDENTIFIER_REJECTED
        # A disconnected session of someone else: its subscriptions and queued messages are not the
        # newcomer's to inherit.
        await self._delete_session(session.client_id)
        return Connack.ACCEPTED

    async def _authenticate(self, session: Session, _: ListenerConfig) -> bool:
        # Called by upstream after _initialize_client_session, which already authenticated.
        return principal_of(session) is not None

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # Deliberately free of awaits: upstream calls this inside loops over live dicts (see the
        # module docstring), which must not yield to other tasks mid-iteration.
        if action == Action.SUBSCRIBE and topic.startswith(_SHARED_PREFIX):
            # amqtt has no shared subscriptions: it would store `$share/...` as a literal filter
            # that never matches, so a granted SUBACK would silently deliver nothing. Refuse it.
            logger.warning(
                "MQTT subscription to %r refused: the embedded broker has no shared "
                "subscriptions; subscribe to the plain topic filter",
                topic,
            )
            return False
        return self._gate.permits(session, topic, action)

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # What reaches this (a QoS 2 flow; QoS 0/1 go to the sink at once): upstream only logs a publish the
        # ACL refuses; the sink keeps it as a rejected message. Malformed topics (empty, wildcards, `$`)
        # are left to upstream, which disconnects.
        message = wait_deliver.result()
        topic = getattr(message, "topic", None)
        if self.sink is not None and _valid_publish_topic(topic):
            if not self._gate.permits(client_session, topic, Action.PUBLISH):
                principal = principal_of(client_session)
                self.sink.refuse(principal.device_id if principal else None, topic, bytes(message.data or b""))
        result: bool = await super()._handle_message_delivery(client_session, handler, wait_deliver)
        return result

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Upstream replays, on every CONNECT, the retained messages matching *every* filter any
        # client has subscribed to (its loop walks self._subscriptions), handing a device the
        # retained state and config of other devices. Replay only the session's own filters.
        holders = self._subscriptions.get(subscription[0], ())
        if any(holder.client_id == session.client_id for holder, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def take_from_device(
        self, handler: _DeviceHandler, message: ApplicationMessage, *, acknowledge: bool
    ) -> bool:
        """A device's QoS 0/1 PUBLISH, checked as upstream's delivery does, into the sink. True when it
        is to be acknowledged (after commit, for QoS 1)."""
        assert self.sink is not None
        session: Session = handler.session
        topic = message.topic
        if not _valid_publish_topic(topic):
            logger.info("MQTT connection of %r closed: invalid topic %r in PUBLISH", session.client_id, topic)
            await handler.handle_connection_closed()
            return False
        payload = bytes(message.data or b"")
        if not self._gate.permits(session, topic, Action.PUBLISH):
            principal = principal_of(session)
            self.sink.refuse(principal.device_id if principal else None, topic, payload)
            return True  # MQTT 3.1.1 has no negative PUBACK; Mosquitto acknowledges a refused publish too
        future = self.sink.offer(topic, payload, acknowledge=acknowledge and message.qos == QOS_1)
        if future is not None:
            await future  # a closed connection cancels this: then no PUBACK, and the device sends it again
        return True

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # What a device publishes (QoS 2 after upstream's flow, its Last Will) is for the ingest path, not
        # for other clients: no device may subscribe to another device's topics anyway.
        principal = principal_of(session)
        if self.sink is not None and principal is not None and not principal.is_service:
            if topic and data is not None:
                self.sink.offer(topic, bytes(data), acknowledge=False)
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def retain_message(
        self,
        source_session: Session | None,
        topic_name: str | None,
        data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        principal = principal_of(source_session)
        if self.sink is not None and principal is not None and not principal.is_service:
            return  # a device's retained state went to the sink; nobody could subscribe to it here
        await super().retain_message(source_session, topic_name, data, qos)

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Session) -> None:
        # Held for a disconnected persistent session: bounded, the oldest go first.
        queue = target_session.retained_messages
        while queue.qsize() >= MAX_OFFLINE_MESSAGES:
            queue.get_nowait()
            self.offline_dropped += 1
        await queue.put(RetainedApplicationMessage(broadcast["session"], broadcast["topic"], broadcast["data"], qos))

    def bound_port(self, listener: str = "default") -> int:
        server = self._servers[listener].instance
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def abort_start(self) -> None:
        """Release what a failed `start()` may have acquired (listeners, plugins)."""
        for server in self._servers.values():
            await server.close_instance()
        self._servers.clear()
        await self.plugins_manager.close()
