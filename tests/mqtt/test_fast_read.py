"""BufferedClient's PUBLISH fast path reads what paho would have read.

A byte stream of PUBLISH packets (QoS 0 and 1, DUP and RETAIN, MQTT 5 properties, 1- to 3-byte remaining
lengths, an empty topic, a PINGRESP between them) is fed through a socket pair in pieces of every size;
the messages taken by ``fill`` → ``take_publishes`` → ``loop_read`` must be exactly those paho alone
decodes from the same bytes.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from telemetra.mqtt.connection import BrokerAddress, BufferedClient, Publish, new_client


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(
    topic: str,
    payload: bytes,
    *,
    v5: bool,
    qos: int = 1,
    mid: int = 1,
    dup: bool = False,
    retain: bool = False,
    props: bytes | None = None,
) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + (struct.pack("!H", mid) if qos else b"")
    if v5:
        body += props if props is not None else b"\x00"
    body += payload
    return bytes([0x30 | dup << 3 | qos << 1 | retain]) + varint(len(body)) + body


def user_props() -> bytes:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("source", "gateway-7")
    props.MessageExpiryInterval = 30
    props.ContentType = "application/json"
    props.SubscriptionIdentifier = 300  # a 2-byte variable integer
    packed: bytes = props.pack()
    return packed


def stream(v5: bool) -> bytes:
    parts = [
        publish("telemetra/a/telemetry", b'{"t":1}', v5=v5, mid=1),
        publish("telemetra/a/telemetry", b'{"t":2}', v5=v5, qos=0),
        publish("telemetra/b/state", b'{"online":true}', v5=v5, mid=2, retain=True),
        publish("telemetra/b/state", b'{"online":true}', v5=v5, mid=2, dup=True),
        publish("telemetra/c/telemetry", b"x" * 200, v5=v5, mid=65535),  # 2-byte remaining length
        b"\xd0\x00",  # PINGRESP: paho's
        publish("telemetra/c/telemetry", b"y" * 20_000, v5=v5, mid=3),  # 3-byte remaining length
        publish("telemetra/ü/telemetry", b"", v5=v5, mid=4),  # empty payload, non-ASCII topic
    ]
    if v5:
        parts.append(publish("telemetra/d/telemetry", b'{"p":1}', v5=v5, mid=5, props=user_props()))
        parts.append(publish("", b'{"alias":1}', v5=v5, mid=6, props=b"\x03\x23\x00\x01"))  # topic alias 1
    parts.append(publish("telemetra/e/telemetry", b'{"last":1}', v5=v5, mid=7))
    return b"".join(parts)


class Harness:
    def __init__(self, v5: bool, *, fast: bool) -> None:
        client = new_client(
            "t", BrokerAddress("127.0.0.1", 1, None, None, False), mqtt5=v5, client_class=BufferedClient
        )
        assert isinstance(client, BufferedClient)
        self.client = client
        self.fast = fast
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        client._sock = self.ours  # as after connect: the only state the read path needs
        self.messages: list[Publish] = []
        self.by_paho = 0
        client.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.by_paho += 1
        self.messages.append((message.mid, message.qos, message.topic, message.payload))

    def drain(self) -> None:
        """What Collector._on_readable does, until the socket is drained."""
        client = self.client
        while client.fill():
            if self.fast:
                client.take_publishes(self.messages, 1000)
            if client.buffered:
                assert client.loop_read() == mqtt.MQTT_ERR_SUCCESS

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def feed(data: bytes, *, v5: bool, fast: bool, piece: int) -> Harness:
    harness = Harness(v5, fast=fast)
    try:
        for i in range(0, len(data), piece):
            harness.theirs.sendall(data[i : i + piece])
            harness.drain()
    finally:
        harness.close()
    return harness


@pytest.mark.parametrize("v5", [True, False], ids=["mqtt5", "mqtt311"])
@pytest.mark.parametrize("piece", [1, 2, 3, 5, 7, 64, 1000, 1 << 20])
def test_fast_path_takes_what_paho_takes(v5: bool, piece: int) -> None:
    data = stream(v5)
    reference = feed(data, v5=v5, fast=False, piece=len(data)).messages
    assert len(reference) == (10 if v5 else 8)
    fast = feed(data, v5=v5, fast=True, piece=piece)
    assert fast.messages == reference


def test_whole_reads_mostly_bypass_paho() -> None:
    data = stream(True)
    harness = feed(data, v5=True, fast=True, piece=len(data))
    # Only the aliased publish (empty topic) goes through paho; everything else is taken from the buffer.
    assert harness.by_paho == 1


def test_end_of_stream_reaches_paho() -> None:
    harness = Harness(True, fast=True)
    disconnects: list[Any] = []
    harness.client.on_disconnect = lambda *args: disconnects.append(args)
    try:
        harness.theirs.sendall(publish("telemetra/a/telemetry", b"{}", v5=True))
        harness.theirs.close()
        client = harness.client
        assert client.fill()
        assert client.take_publishes(harness.messages, 10) == 1
        assert client.fill() and client.buffered  # the end of the stream, for paho
        assert client.loop_read() == mqtt.MQTT_ERR_CONN_LOST
        assert len(disconnects) == 1
    finally:
        harness.ours.close()
