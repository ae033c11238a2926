"""The MQTT collector: subscribes through the route table and feeds every message into the ingest queue.

No loss, no duplicates: QoS 1 on a persistent session (MQTT 5, clean start off, a session expiry), and
manual acknowledgement — PUBACK goes back only after the message's batch is committed, so if Telemetra
dies first the broker redelivers; device-timestamped redeliveries are then stored once by the primary key.
Several processes share the load through ``$share/<group>/…``.

paho runs its network loop in its own thread; that thread only hands messages to the event loop with
``call_soon_threadsafe`` and never touches asyncio objects itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from telemetra.domain.records import Batch, Rejected
from telemetra.domain.timeutil import now_ms
from telemetra.ingest.queue import IngestQueue
from telemetra.metrics import Metrics
from telemetra.mqtt.connection import BrokerAddress, new_client
from telemetra.mqtt.inbound import Inbound

log = logging.getLogger(__name__)

# How many unacknowledged QoS 1 messages the broker may have in flight to us. Acks wait for the commit,
# so this is what lets one commit cover thousands of messages (the broker's default is 20 for MQTT 3).
RECEIVE_MAXIMUM = 5000
# The broker keeps our session (subscriptions and undelivered messages) this long while we are away.
SESSION_EXPIRY_S = 7 * 24 * 3600
RETRY_COMMIT_S = 1.0
PUBLISH_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class _Inbox:
    mid: int
    qos: int
    topic: str
    payload: bytes


class Collector:
    def __init__(
        self,
        *,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        share_group: str | None,
        inbound: Inbound,
        queue: IngestQueue,
        metrics: Metrics,
        tls: Any = None,
        on_connect: Callable[[mqtt.Client], None] | None = None, mqtt5: bool = True,
    ) -> None:
        self._address = address
        self._filters = [f"$share/{share_group}/{f}" if share_group else f for f in subscriptions]
        self._inbound = inbound
        self._queue = queue
        self._metrics = metrics
        self._inbox: asyncio.Queue[_Inbox] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = asyncio.Event()
        self._on_connect_hook = on_connect
        self._consumer: asyncio.Task[None] | None = None
        self._pending_acks: set[asyncio.Task[None]] = set()
        self._published: dict[int, asyncio.Future[None]] = {}
        self._mqtt5 = mqtt5
        self.client = new_client(client_id, address, tls=tls, mqtt5=mqtt5)
        self.client.manual_ack_set(True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, *, connect_wait_s: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._consumer = asyncio.create_task(self._consume(), name="mqtt-collector")
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(
            self._address.host, self._address.port, keepalive=30, clean_start=False, properties=props
        )
        self.client.loop_start()
        try:
            await asyncio.wait_for(self._connected.wait(), connect_wait_s)
        except TimeoutError:
            log.warning(
                "MQTT broker %s:%s not reachable yet; retrying in the background",
                self._address.host,
                self._address.port,
            )

    async def stop(self) -> None:
        """Stop taking messages, let what is queued commit and be acknowledged, then disconnect."""
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
        if self._pending_acks:
            await asyncio.wait(self._pending_acks, timeout=10)
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish and, for QoS 1, wait until the broker has it (PUBACK)."""
        if not self.connected:
            raise ConnectionError("not connected to the MQTT broker")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish refused by the client: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        # Registered before the first await: the PUBACK callback is run on this loop, after us.
        future = asyncio.get_running_loop().create_future()
        self._published[info.mid] = future
        try:
            await asyncio.wait_for(future, PUBLISH_WAIT_S)
        finally:
            self._published.pop(info.mid, None)

    def _published_done(self, mid: int, failure: str | None) -> None:
        future = self._published.get(mid)
        if future is not None and not future.done():
            if failure:
                future.set_exception(ConnectionError(f"broker refused the publish: {failure}"))
            else:
                future.set_result(None)

    # -- paho thread ------------------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        if self._mqtt5:
            client.subscribe([(f, mqtt.SubscribeOptions(qos=1)) for f in self._filters])
        else:
            client.subscribe([(f, 1) for f in self._filters])
        log.info(
            "MQTT collector connected to %s:%s (%d filters)", self._address.host, self._address.port, len(self._filters)
        )
        if self._on_connect_hook is not None:
            self._on_connect_hook(client)
        self._call(self._connected.set)
        self._call(self._metrics.mqtt_connected.set, 1)

    def _on_disconnect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        self._call(self._connected.clear)
        self._call(self._metrics.mqtt_connected.set, 0)
        # Randomise the next reconnect so a fleet of processes does not stampede a restarted broker.
        client.reconnect_delay_set(min_delay=random.uniform(0.5, 2.0), max_delay=30)
        log.warning("MQTT collector disconnected: %s", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._call(self._inbox.put_nowait, _Inbox(message.mid, message.qos, message.topic, message.payload))

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        self._call(self._published_done, mid, str(reason) if reason.is_failure else None)

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- event loop -------------------------------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            item = await self._inbox.get()
            try:
                batch = await self._inbound.to_batch(item.topic, item.payload)
            except Exception:  # one bad message is logged and kept, never stops delivery
                log.exception("could not interpret message on %s", item.topic)
                batch = Batch(
                    rejected=[
                        Rejected(now_ms(), "mqtt", "internal: could not interpret", item.payload, topic=item.topic)
                    ]
                )
            kind = "rejected" if batch.rejected else "accepted"
            self._metrics.mqtt_messages.labels(kind).inc()
            future = await self._queue.put(batch, transport="mqtt")
            task = asyncio.create_task(self._ack_after_commit(item, batch, future), name="mqtt-ack")
            self._pending_acks.add(task)
            task.add_done_callback(self._pending_acks.discard)

    async def _ack_after_commit(self, item: _Inbox, batch: Batch, future: asyncio.Future[Any]) -> None:
        while True:
            try:
                await future
                break
            except Exception as exc:
                # Not stored, so not acknowledged: retry until the database is back (the broker would
                # redeliver only after a reconnect; holding the message here keeps order and loses nothing).
                log.warning("commit of MQTT message failed (%s); retrying", exc)
                await asyncio.sleep(RETRY_COMMIT_S)
                future = await self._queue.put(batch, transport="mqtt")
        if item.qos > 0:
            self.client.ack(item.mid, item.qos)

