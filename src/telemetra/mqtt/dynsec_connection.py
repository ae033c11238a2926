"""One connection to Mosquitto's dynamic-security control topic: command batches in, responses out.

Behaviour of Mosquitto 2.0.11 this relies on (checked against the real broker, tests/mqtt/test_dynsec.py):

* a control message is ``{"commands": [...]}``; the broker answers with one message on
  ``$CONTROL/dynamic-security/v1/response`` holding ``{"responses": [...]}`` in command order, each with
  ``"command"``, an optional ``"error"`` string and the ``"correlationData"`` string we sent;
* all commands of one message are applied in one go in the broker's main loop, so e.g. ``createClient``
  followed by ``disableClient`` leaves no window for a connection.

paho runs its network loop (and its reconnects) in a thread of its own; every callback hops to the event
loop, so the state here is only touched there. After each (re)connect the response topic is subscribed
again, and only once that SUBACK is in is the connection *ready*: a batch sent before it could be answered
to nobody. ``on_ready`` is called then, every time — the account reconciler starts from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["CONTROL_TOPIC", "RESPONSE_TOPIC", "Command", "DynsecConnection", "DynsecError", "Response"]

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
# paho's reconnect back-off (it doubles from the first to the cap). A restarted broker is usually back in
# well under a second, and until this connection is back, revocations cannot reach it: retry fast.
RECONNECT_FIRST_S, RECONNECT_CAP_S = 0.25, 2.0

Command = dict[str, Any]
Response = dict[str, Any]


class DynsecError(RuntimeError):
    """A dynamic-security command failed, timed out or could not be sent."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynsec {command}: {error}")
        self.command = command
        self.error = error


def _redacted(commands: Sequence[Command]) -> list[Command]:
    return [{k: ("***" if k == "password" else v) for k, v in cmd.items()} for cmd in commands]


class DynsecConnection:
    """``async with DynsecConnection(...)``: connect (failing fast when refused or unreachable), then
    :meth:`run` command batches, one at a time. paho reconnects by itself after a loss."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        client_id: str | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._tls = tls
        self._timeout = timeout
        # Unique per process: several Telemetra instances may provision through the same admin account,
        # and Mosquitto disconnects an older session when a new one reuses its client id.
        self._client_id = client_id or f"telemetra-dynsec-{uuid.uuid4().hex[:12]}"
        self._on_ready = on_ready

        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._connected: asyncio.Future[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._sub_mid: int | None = None
        self._ready = False
        # The one batch in flight: its correlation prefix and result future.
        self._pending_id: str | None = None
        self._pending: asyncio.Future[list[Response]] | None = None

    @property
    def ready(self) -> bool:
        """Connected, and subscribed to the responses on this connection."""
        return self._ready

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._connected = self._loop.create_future()
        self._subscribed = self._loop.create_future()

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self._username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.reconnect_delay_set(min_delay=RECONNECT_FIRST_S, max_delay=RECONNECT_CAP_S)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        try:
            # The first connect is blocking (in a worker thread) so an unreachable broker fails at once
            # instead of after the timeout; reconnects are left to paho's loop.
            try:
                await asyncio.to_thread(client.connect, self._host, self._port, 30)
            except OSError as exc:
                raise DynsecError("connect", f"{self._host}:{self._port}: {exc}") from exc
            client.loop_start()
            async with asyncio.timeout(self._timeout):
                await self._connected
                await self._subscribed
        except TimeoutError:
            await self.close()
            raise DynsecError(
                "connect", f"no CONNACK/SUBACK from {self._host}:{self._port} within {self._timeout}s"
            ) from None
        except BaseException:
            await self.close()
            raise
        logger.info("dynsec provisioner connected to %s:%s as %s", self._host, self._port, self._username)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._ready = False
        if client is None:
            return
        self._fail_pending(DynsecError("close", "provisioner closed"))
        client.disconnect()
        # loop_stop joins paho's thread; do not block the event loop while it winds down.
        await asyncio.to_thread(client.loop_stop)

    def _post(self, handler: Any, *args: Any) -> None:
        """From paho's thread: run ``handler(*args)`` on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
            loop.call_soon_threadsafe(handler, *args)

    # paho callbacks (paho thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if not reason_code.is_failure:
            # Subscribing on every (re)connect: a clean session forgets the subscription. The broker
            # handles packets of one connection in order, so a command published after this
            # SUBSCRIBE is answered to the subscription.
            _rc, mid = client.subscribe(RESPONSE_TOPIC, qos=1)
            self._post(self._connect_result, reason_code.is_failure, str(reason_code), mid)
        else:
            if self._connected is not None and not self._connected.done():
                # Refused on the first connect: stop paho from retrying credentials the broker
                # rejected. Done here in paho's thread so its loop exits instead of sleeping in the
                # reconnect back-off (which would delay close() by up to a second).
                client.disconnect()
            self._post(self._connect_result, True, str(reason_code), None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._post(self._disconnected, str(reason_code))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        self._post(self._subscribe_result, mid, ", ".join(failed) or None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._post(self._response_received, bytes(message.payload))

    # event-loop side of the callbacks ----------------------------------------------

    def _connect_result(self, failed: bool, reason: str, sub_mid: int | None) -> None:
        if failed:
            logger.warning("dynsec provisioner connection refused by broker: %s", reason)
            if self._connected is not None and not self._connected.done():
                self._connected.set_exception(DynsecError("connect", f"connection refused: {reason}"))
            return
        self._sub_mid = sub_mid
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(None)

    def _subscribe_result(self, mid: int, failure: str | None) -> None:
        if mid != self._sub_mid:
            return
        if failure is not None:
            logger.error("dynsec provisioner may not subscribe to %s: %s", RESPONSE_TOPIC, failure)
            error = DynsecError("subscribe", f"{RESPONSE_TOPIC} refused: {failure}")
            self._fail_pending(error)
            if self._subscribed is not None and not self._subscribed.done():
                self._subscribed.set_exception(error)
            return
        first = self._subscribed is not None and not self._subscribed.done()
        self._ready = True
        if first:
            assert self._subscribed is not None
            self._subscribed.set_result(None)
        else:
            logger.info("dynsec provisioner reconnected to %s:%s", self._host, self._port)
        if self._on_ready is not None and self._client is not None:
            self._on_ready()

    def _disconnected(self, reason: str) -> None:
        was_ready, self._ready = self._ready, False
        if self._client is not None and was_ready:
            logger.warning("dynsec provisioner disconnected (%s); reconnecting", reason)
        # Whether the broker applied the batch is unknown; every operation reads state before writing,
        # so the caller can simply retry.
        self._fail_pending(DynsecError("connection", f"disconnected while waiting for a response: {reason}"))

    def _response_received(self, payload: bytes) -> None:
        try:
            document = json.loads(payload)
            responses = document["responses"]
            if not isinstance(responses, list):
                raise TypeError("'responses' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring malformed dynsec response: %s", exc)
            return
        pending_id, future = self._pending_id, self._pending
        if pending_id is None or future is None or future.done() or not responses:
            return
        first = responses[0]
        correlation = first.get("correlationData") if isinstance(first, dict) else None
        if not isinstance(correlation, str) or not correlation.startswith(pending_id + ":"):
            # A late answer to a batch that already timed out, or (2.0.x) the uncorrelated reply to a
            # payload the broker could not parse.
            logger.debug("ignoring dynsec response for another batch: %s", correlation)
            return
        future.set_result(responses)

    def _fail_pending(self, error: DynsecError) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(error)

    # ------------------------------------------------------------------ batches

    async def _send(self, commands: Sequence[Command]) -> list[Response]:
        """Send one batch and return the broker's responses, in command order. Caller holds the lock."""
        client = self._client
        if client is None or self._loop is None:
            raise DynsecError("send", "provisioner is not connected (use 'async with')")
        names = ",".join(str(cmd["command"]) for cmd in commands)
        if not self._ready:
            # Fail at once rather than after the timeout: the caller keeps the change for the
            # reconciliation that follows the reconnect.
            raise DynsecError(names, f"not connected to {self._host}:{self._port}")
        batch_id = uuid.uuid4().hex
        payload = {"commands": [{**cmd, "correlationData": f"{batch_id}:{i}"} for i, cmd in enumerate(commands)]}
        logger.debug("dynsec batch %s: %s", batch_id, _redacted(commands))
        future: asyncio.Future[list[Response]] = self._loop.create_future()
        self._pending_id, self._pending = batch_id, future
        try:
            # QoS 0 on purpose. With QoS 1 Mosquitto writes the PUBACK and then the response as two
            # small segments, and without `set_tcp_nodelay` Nagle holds the second until our delayed
            # ACK: ~44 ms per batch instead of <1 ms. The response is the acknowledgement that
            # matters, and a connection lost before it fails the batch below (callers retry).
            info = client.publish(CONTROL_TOPIC, json.dumps(payload), qos=0)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecError(names, f"publish failed: {mqtt.error_string(info.rc)}")
            try:
                async with asyncio.timeout(self._timeout):
                    responses = await future
            except TimeoutError:
                raise DynsecError(
                    names,
                    f"no response within {self._timeout}s (may {self._username!r} publish to {CONTROL_TOPIC}?)",
                ) from None
        finally:
            self._pending_id = self._pending = None
        if len(responses) != len(commands):
            raise DynsecError(names, f"expected {len(commands)} responses, got {len(responses)}")
        for cmd, resp in zip(commands, responses, strict=True):
            if resp.get("command") != cmd["command"]:
                raise DynsecError(names, f"response order mismatch: {resp.get('command')!r} for {cmd['command']!r}")
        return responses

    async def _run(self, commands: Sequence[Command], *, tolerate: Sequence[str] = ()) -> list[Response]:
        """Send a batch; raise DynsecError for the first error not listed in ``tolerate``. Caller holds
        the lock (or uses :meth:`run`)."""
        if not commands:
            return []
        responses = await self._send(commands)
        for resp in responses:
            error = resp.get("error")
            if error and error not in tolerate:
                raise DynsecError(str(resp.get("command")), str(error))
        return responses

    async def run(self, commands: Sequence[Command], *, tolerate: Sequence[str] = ()) -> list[Response]:
        async with self._lock:
            return await self._run(commands, tolerate=tolerate)
