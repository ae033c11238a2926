"""The MQTT collector: subscribes through the route table and feeds every message into the ingest queue.

No loss, no duplicates: QoS 1 on a persistent session (MQTT 5, clean start off, a session expiry), and
manual acknowledgement — PUBACK goes back only after the message's batch is committed, so if Telemetra
dies first the broker redelivers; device-timestamped redeliveries are then stored once by the primary key.
Several processes share the load through ``$share/<group>/…`` when a share group is configured; one process
subscribes plainly, because Mosquitto 2.0 restores a persistent session's plain subscriptions after a
broker restart but not its shared ones.

The paho client runs on the asyncio event loop (paho's "external loop" mode: the loop watches the socket
and calls ``loop_read``/``loop_write``; ``loop_misc`` keeps the connection alive), not in a thread of its
own. Per message that saves the thread hand-off (a wake-up of the loop per message, and one of the paho
thread per PUBACK) and the contention for the GIL between the two. Messages are taken in chunks: every
read drains the socket into an inbox, the consumer turns what is there into one ``Batch`` (one directory
lookup, one queue entry), and once that batch is committed all its PUBACKs go out in one write. Only the
blocking TCP/TLS connect runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from telemetra.metrics import Metrics
from telemetra.mqtt.backoff import Backoff
from telemetra.mqtt.connection import BrokerAddress, BufferedClient, new_client
from telemetra.mqtt.pipeline import Entry, Interpreter, Pipeline, Queue

log = logging.getLogger(__name__)

# How many unacknowledged QoS 1 messages the broker may have in flight to us. Acks wait for the commit,
# so this is what lets one commit cover thousands of messages (the broker's default is 20 for MQTT 3).
RECEIVE_MAXIMUM = 5000
# The broker keeps our session (subscriptions and undelivered messages) this long while we are away.
SESSION_EXPIRY_S = 7 * 24 * 3600
KEEPALIVE_S = 30
PUBLISH_WAIT_S = 10.0
# After a lost connection: retry within 0.05-0.1 s, doubling to at most 2 s. The broker we lost is usually
# one that restarted and is back within a second, and while we are away nothing is consumed: with a shared
# subscription Mosquitto 2.0 drops what arrives meanwhile, and even with a plain one its queue (and what a
# SIGKILL of the broker could lose) grows. A collector per process, so no herd to spread out beyond jitter.
RECONNECT_FIRST_S, RECONNECT_CAP_S = 0.1, 2.0
# Messages read per callback before the loop gets a turn (HTTP requests, commits).
READ_MESSAGES_PER_TURN = 2000
# Without a receive maximum (MQTT 3.1.1) the broker may send faster than we commit: past this many
# messages waiting to be interpreted, stop reading the socket (TCP holds the rest in the broker).
INBOX_PAUSE = 4 * RECEIVE_MAXIMUM

# Unsubscribed from (never subscribed) as a round trip before DISCONNECT; see Collector._barrier.
BARRIER_FILTER = "telemetra-barrier/none"
_PUBACK = struct.Struct("!BBH")  # PUBACK, remaining length 2, packet id (MQTT 3.1.1 and 5: reason "success")


class Collector:
    def __init__(
        self,
        *,
        address: BrokerAddress,
        client_id: str,
        subscriptions: list[str],
        share_group: str | None,
        inbound: Interpreter,
        queue: Queue,
        metrics: Metrics,
        tls: Any = None,
        on_connect: Callable[[mqtt.Client], None] | None = None,
        mqtt5: bool = True,
    ) -> None:
        self._address = address
        self._filters = [f"$share/{share_group}/{f}" if share_group else f for f in subscriptions]
        self._metrics = metrics
        # (mid, qos, topic, payload) of each received PUBLISH go into the pipeline's inbox during a read.
        self._pipeline: Pipeline[int] = Pipeline(
            inbound,
            queue,
            metrics,
            on_stored=self._acknowledge,
            on_room=self._resume_reading,
            room_below=INBOX_PAUSE // 2,
        )
        self._paused = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._sock: Any = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._closed = asyncio.Event()
        self._stopping = False
        self._was_connected = False
        self._subscribe_mid: int | None = None
        self._barrier_mid: int | None = None
        self._unsubscribed: asyncio.Future[None] | None = None
        self._on_connect_hook = on_connect
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting: asyncio.Future[Any] | None = None
        self._published: dict[int, asyncio.Future[None]] = {}
        self._mqtt5 = mqtt5
        client = new_client(client_id, address, tls=tls, mqtt5=mqtt5, client_class=BufferedClient)
        assert isinstance(client, BufferedClient)
        self.client = client
        client.manual_ack_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, *, connect_wait_s: float = 10.0) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        props: Properties | None = None
        if self._mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect_async(
            self._address.host, self._address.port, keepalive=KEEPALIVE_S, clean_start=False, properties=props
        )
        self._tasks = [
            asyncio.create_task(self._pipeline.run(), name="mqtt-collector"),
            asyncio.create_task(self._keep_connected(), name="mqtt-connection"),
            asyncio.create_task(self._keep_alive(), name="mqtt-keepalive"),
        ]
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
        self._stopping = True
        consumer, *others = self._tasks or [None]
        if consumer is not None:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        await self._pipeline.drain(10)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if self._connecting is not None:
            await asyncio.wait([self._connecting], timeout=30)
        if self._sock is not None:
            await self._barrier()
            self.client.disconnect()  # queued after the last PUBACKs; the socket closes once it is written
            try:
                await asyncio.wait_for(self._closed.wait(), 5)
            except TimeoutError:
                log.warning("MQTT collector: DISCONNECT not written in 5 s; closing")
        if self._sock is not None:
            sock = self._sock
            self._unwatch(sock)
            sock.close()

    async def _barrier(self) -> None:
        """One round trip, so the broker has read every PUBACK written before it. Without it, a process
        that restarts at once reconnects under the same client id while the broker still reads the old
        connection, and the takeover discards the PUBACKs not yet read: acknowledged messages would be
        delivered again."""
        if not self.client.is_connected():
            return
        done = asyncio.get_running_loop().create_future()
        self._unsubscribed = done
        rc, self._barrier_mid = self.client.unsubscribe(BARRIER_FILTER)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return
        try:
            await asyncio.wait_for(done, 5)
        except TimeoutError:
            log.warning("MQTT collector: the broker did not answer before disconnecting")

    def _on_unsubscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, *_args: Any) -> None:
        if mid == self._barrier_mid and self._unsubscribed is not None and not self._unsubscribed.done():
            self._unsubscribed.set_result(None)

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish and, for QoS 1, wait until the broker has it (PUBACK)."""
        if not self.connected:
            raise ConnectionError("not connected to the MQTT broker")
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish refused by the client: {mqtt.error_string(info.rc)}")
        if qos == 0:
            return
        # Registered before the first await: the PUBACK is read on this loop, after us.
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

    # -- connection (event loop; the blocking connect in a worker thread) ------------------------------
    async def _keep_connected(self) -> None:
        backoff = Backoff(RECONNECT_FIRST_S, RECONNECT_CAP_S)
        failed = 0  # attempts of this outage: said once when it starts, and once when it ends
        while not self._stopping:
            self._lost.clear()
            self._was_connected = False
            # Shielded: a thread cannot be cancelled, and stop() waits for it before closing the socket.
            self._connecting = asyncio.ensure_future(asyncio.to_thread(self.client.reconnect))
            try:
                await asyncio.shield(self._connecting)
            except Exception as exc:
                where = f"{self._address.host}:{self._address.port}"
                if failed == 0:
                    log.warning("MQTT broker %s: %s; retrying every %.0f s at most", where, exc, RECONNECT_CAP_S)
                else:
                    log.debug("MQTT broker %s: %s (attempt %d)", where, exc, failed + 1)
                failed += 1
                self._lost.set()
            else:
                if failed:
                    log.info("MQTT broker reachable again after %d failed attempts", failed)
                failed = 0
            await self._lost.wait()
            if self._was_connected:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self._sock is not None:
                self.client.loop_misc()

    # -- paho callbacks (event loop, except socket open/register from the connecting thread) ------------
    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch, sock)

    def _on_socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch, sock)

    def _on_socket_register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_write, sock)

    def _on_socket_unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_write, sock)

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop now; from another thread, wait until it has run there (a socket
        must be unregistered before paho closes it, and registered in the order paho asked)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(timeout=10)

    def _watch(self, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        self._closed.clear()
        self._paused = False
        self._loop.add_reader(sock, self._on_readable)

    def _unwatch(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None
            self._closed.set()

    def _watch_write(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.add_writer(sock, self._on_writable)

    def _unwatch_write(self, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    def _on_readable(self) -> None:
        client, inbox = self.client, self._pipeline.inbox
        room = READ_MESSAGES_PER_TURN
        while room > 0:
            if not client.fill():
                break  # drained: the loop calls again when the socket is readable
            room -= client.take_publishes(inbox, room)
            if client.buffered:  # the next packet is for paho (or only partly read)
                if client.loop_read():
                    break  # connection lost: paho has closed the socket and told us
        else:
            # Stopped for the loop's other work; the rest may be in the read buffer, which the socket's
            # readiness does not show, so ask again.
            if self._sock is not None and not self._paused:
                assert self._loop is not None
                self._loop.call_soon(self._on_readable)
        if inbox:
            self._pipeline.wake()
            if len(inbox) >= INBOX_PAUSE and self._sock is not None and not self._paused:
                self._paused = True
                assert self._loop is not None
                self._loop.remove_reader(self._sock)

    def _resume_reading(self) -> None:
        if self._paused and self._sock is not None:
            assert self._loop is not None
            self._paused = False
            self._loop.add_reader(self._sock, self._on_readable)
            self._loop.call_soon(self._on_readable)  # what is already in the read buffer

    def _on_writable(self) -> None:
        self.client.loop_write()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        if self._mqtt5:
            _, self._subscribe_mid = client.subscribe([(f, mqtt.SubscribeOptions(qos=1)) for f in self._filters])
        else:
            _, self._subscribe_mid = client.subscribe([(f, 1) for f in self._filters])
        self._was_connected = True
        if self._on_connect_hook is not None:
            self._on_connect_hook(client)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        # Connected counts from the SUBACK, not the CONNACK: until the broker has the subscriptions, what
        # devices publish on a first start would reach no one.
        if mid != self._subscribe_mid:
            return
        refused = [f for f, reason in zip(self._filters, reasons, strict=False) if reason.is_failure]
        if refused:
            log.error("MQTT broker refused the collector's subscriptions %s", refused)
        log.info(
            "MQTT collector connected to %s:%s (%d filters)", self._address.host, self._address.port, len(self._filters)
        )
        self._connected.set()
        self._metrics.mqtt_connected.set(1)

    def _on_disconnect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any) -> None:
        self._connected.clear()
        self._metrics.mqtt_connected.set(0)
        self._lost.set()
        if not self._stopping:
            log.warning("MQTT collector disconnected: %s", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        # What BufferedClient.take_publishes leaves to paho (a packet split across reads, an odd one).
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # not valid UTF-8 (brokers refuse those): matches no route, kept as rejected
        self._pipeline.offer(message.mid, message.qos, topic, message.payload)

    def _on_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason: ReasonCode, _props: Any) -> None:
        self._published_done(mid, str(reason) if reason.is_failure else None)

    # -- messages → ingest queue → acknowledgements ------------------------------------------------------
    def _acknowledge(self, entries: list[Entry[int]]) -> None:
        """PUBACK every message of a committed chunk, in one write."""
        if not self.client.is_connected():
            # Not connected: the broker redelivers these on the next session (stored once by their key).
            # (Connected from the CONNACK: a resumed session delivers what it held before our SUBACK.)
            return
        pack = _PUBACK.pack
        packet = b"".join([pack(mqtt.PUBACK, 2, mid) for mid, qos, _, _ in entries if qos])
        if packet:
            # paho writes queued packets in order, and a queued packet may hold several MQTT packets.
            self.client._packet_queue(mqtt.PUBACK, packet, 0, 0)
