"""The embedded MQTT broker: amqtt in-process, authenticating and authorizing through our callables.

MQTT 3.1.1 only: amqtt 0.12 refuses MQTT 3.1 at CONNECT and cannot parse an MQTT 5 CONNECT at all
(such a client gets no CONNACK and is disconnected after `connect_timeout`). No shared subscriptions.
"""

from __future__ import annotations

import errno
import logging
from types import TracebackType

from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import BrokerError

from telemetra.mqtt._amqtt_broker import AccessGate, Authenticate, GuardedBroker, RefusedPublish
from telemetra.mqtt.acl import TopicAcl

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


class EmbeddedBroker:
    """Async context manager running an MQTT listener on `host:port` (port 0 picks a free one)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        authenticate: Authenticate,
        acl: TopicAcl,
        on_refused: RefusedPublish | None = None,
        connect_timeout: float = 10.0,
        amqtt_log_level: int | None = logging.WARNING,
    ) -> None:
        """``on_refused`` hears of each publish the ACL refuses (to keep it as a rejected message)."""
        self._host = host
        self._requested_port = port
        self._gate = AccessGate(authenticate, acl, on_refused)
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
        return BrokerConfig(
            listeners={"default": listener},
            # No plugins: replaces amqtt's defaults (anonymous auth, $SYS publisher, packet logger);
            # GuardedBroker authenticates and authorizes itself, see _amqtt_broker for why.
            plugins={},
        )

    async def __aenter__(self) -> EmbeddedBroker:
        if self._broker is not None:
            raise RuntimeError("the embedded MQTT broker is already running")
        broker = GuardedBroker(self._config(), self._gate, connect_timeout=self._connect_timeout)
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
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        broker, self._broker, self._port = self._broker, None, None
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
