"""The embedded MQTT broker: amqtt in-process, authenticating and authorizing through our callables.

What devices publish goes straight from their connections into the ingest pipeline (``DeviceIngest``),
with no loopback client: a QoS 1 PUBLISH is acknowledged once it is committed. Commands and
configuration go down through ``publish``, into the broker itself.

MQTT 3.1.1 only: amqtt 0.12 refuses MQTT 3.1 at CONNECT and cannot parse an MQTT 5 CONNECT at all
(such a client gets no CONNACK and is disconnected after `connect_timeout`). No shared subscriptions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import BrokerError

from telemetra.metrics import Metrics
from telemetra.mqtt._amqtt_broker import AccessGate, Authenticate, DeviceSink, GuardedBroker
from telemetra.mqtt.acl import TopicAcl
from telemetra.mqtt.pipeline import Entry, Interpreter, Pipeline, Queue

logger = logging.getLogger(__name__)

_LIBRARY_LOGGERS = ("amqtt", "transitions")


class BrokerPortInUse(RuntimeError):
    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"cannot start the embedded MQTT broker: {host or '*'}:{port} is already in use "
            "(another broker running?). Stop it or choose another port with TELEMETRA_MQTT_PORT."
        )
        self.host = host
        self.port = port


@dataclass(frozen=True, slots=True)
class TlsListener:
    """MQTT over TLS beside the plain listener (port 0 picks a free one)."""

    port: int
    cert: Path
    key: Path


class EmbeddedBroker:
    """Async context manager running an MQTT listener on `host:port` (port 0 picks a free one)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authenticate: Authenticate,
        acl: TopicAcl,
        sink: DeviceSink,
        session_expiry_s: int | None = 7 * 86_400,
        connect_timeout: float = 10.0,
        amqtt_log_level: int | None = logging.WARNING,
        tls: TlsListener | None = None,
    ) -> None:
        self._host = host
        self._tls = tls
        self._tls_port: int | None = None
        self._sink = sink
        self._session_expiry_s = session_expiry_s
        self._requested_port = port
        self._gate = AccessGate(authenticate, acl)
        self._connect_timeout = connect_timeout
        self._broker: GuardedBroker | None = None
        self._port: int | None = None
        if amqtt_log_level is not None:
            # amqtt (and `transitions`, its state-machine library) log every connection and
            # subscription at INFO; None leaves those loggers as configured.
            for name in _LIBRARY_LOGGERS:
                logging.getLogger(name).setLevel(amqtt_log_level)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the embedded MQTT broker is not running")
        return self._port

    @property
    def tls_port(self) -> int | None:
        """The MQTT-over-TLS listener's port, when there is one."""
        return self._tls_port

    @property
    def connected(self) -> bool:
        """The downlink is up while the broker runs (the ``Publisher`` protocol)."""
        return self._broker is not None

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Downlink (commands, configuration) into the broker: delivered to the device's subscription
        at its QoS, or held for its persistent session; ``retain`` keeps it for later subscribers."""
        broker = self._broker
        if broker is None:
            raise ConnectionError("the embedded MQTT broker is not running")
        if retain:
            await broker.retain_message(None, topic, payload, qos)
        await broker.internal_message_broadcast(topic, payload, None)

    async def disconnect_device(self, device_id: str, *, forget: bool = False) -> int:
        """Close every connection authenticated as `device_id` (its credentials were rotated, or the
        device disabled or deleted); returns how many were open. Credentials are checked only at
        CONNECT, so this is what makes a revocation reach connected clients. `forget` also drops the
        device's persistent sessions (subscriptions, queued messages). A no-op when not running."""
        if self._broker is None:
            return 0
        return await self._broker.disconnect_device(device_id, forget=forget)

    def _config(self) -> BrokerConfig:
        # amqtt splits `bind` on the last ':' so IPv6 hosts need no brackets (brackets break it).
        listener = ListenerConfig(type=ListenerType.TCP, bind=f"{self._host}:{self._requested_port}")
        listeners = {"default": listener}
        if self._tls is not None:
            listeners["tls"] = ListenerConfig(
                type=ListenerType.TCP,
                bind=f"{self._host}:{self._tls.port}",
                ssl=True,
                certfile=self._tls.cert,
                keyfile=self._tls.key,
            )
        return BrokerConfig(
            listeners=listeners,
            # No plugins: replaces amqtt's defaults (anonymous auth, $SYS publisher, packet logger);
            # GuardedBroker authenticates and authorizes itself, see _amqtt_broker for why.
            plugins={},
            # Disconnected persistent sessions (and what they hold) are dropped after this long.
            session_expiry_interval=self._session_expiry_s,
        )

    async def __aenter__(self) -> EmbeddedBroker:
        if self._broker is not None:
            raise RuntimeError("the embedded MQTT broker is already running")
        broker = GuardedBroker(self._config(), self._gate, connect_timeout=self._connect_timeout, sink=self._sink)
        try:
            await broker.start()
        except BrokerError as exc:
            await broker.abort_start()
            if _is_address_in_use(exc):
                raise BrokerPortInUse(self._host, self._requested_port) from exc
            raise
        self._broker = broker
        self._port = broker.bound_port()
        logger.info("embedded MQTT broker listening on %s:%d", self._host or "*", self._port)
        if self._tls is not None:
            self._tls_port = broker.bound_port("tls")
            logger.info("embedded MQTT broker listening for TLS on %s:%d", self._host or "*", self._tls_port)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        broker, self._broker, self._port, self._tls_port = self._broker, None, None, None
        if broker is not None:
            # Stops every session handler, awaits amqtt's broadcast and session-monitor tasks,
            # closes the listener, then closes and awaits connections that never sent CONNECT.
            await broker.shutdown()
            logger.info("embedded MQTT broker stopped")


def _is_address_in_use(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Messages taken in but not yet committed and acknowledged, across all device connections, past which
# the connections stop being read (devices then wait for their PUBACKs; TCP holds what they send).
HIGH_WATER = 20_000

# A publish the ACL refused: (device id, topic, payload), to be counted and kept (within the device's
# allowance) without waiting for storage.
RefusedPublish = Callable[[str | None, str, bytes], None]


class DeviceIngest:
    """The embedded broker's ``DeviceSink``: device messages into the ingest pipeline in process."""

    def __init__(
        self,
        inbound: Interpreter,
        queue: Queue,
        metrics: Metrics,
        *,
        on_refused: RefusedPublish,
        high_water: int = HIGH_WATER,
    ) -> None:
        self._on_refused = on_refused
        self._high = high_water
        self._room = asyncio.Event()
        self._room.set()
        self.pipeline: Pipeline[asyncio.Future[None] | None] = Pipeline(inbound, queue, metrics, on_stored=self._stored)
        self._closing = False

    @property
    def room(self) -> asyncio.Event:
        return self._room

    async def run(self) -> None:
        await self.pipeline.run()

    def offer(self, topic: str, payload: bytes, *, acknowledge: bool) -> asyncio.Future[None] | None:
        future = asyncio.get_running_loop().create_future() if acknowledge else None
        self.pipeline.offer(future, 1 if acknowledge else 0, topic, payload)
        if self.pipeline.waiting >= self._high:
            self._room.clear()
        return future

    def refuse(self, device_id: str | None, topic: str, payload: bytes) -> None:
        try:
            self._on_refused(device_id, topic, payload)
        except Exception:  # keeping the record must never break the connection
            logger.exception("could not keep the refused publish to %r", topic)

    def _stored(self, entries: list[Entry[asyncio.Future[None] | None]]) -> None:
        for future, _, _, _ in entries:
            if future is not None and not future.done():
                future.set_result(None)
        if not self._room.is_set() and not self._closing and self.pipeline.waiting - len(entries) < self._high // 2:
            self._room.set()

    async def finish(self, wait_s: float) -> None:
        """Stop reading device connections, then wait (up to ``wait_s``) until what was taken in is
        committed and acknowledged — before the broker closes the connections."""
        self._closing = True
        self._room.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.pipeline.waiting and loop.time() < deadline:
            await self.pipeline.drain(max(0.0, deadline - loop.time()))
            await asyncio.sleep(0.01)  # the consumer's turn to take what is left in the inbox
