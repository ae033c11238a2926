"""Broker address and TLS from settings, and a paho 2.x client configured the one way we use it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from telemetra.config import Settings


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    def __repr__(self) -> str:  # never show the password
        return f"BrokerAddress({self.host}:{self.port}, user={self.username!r}, tls={self.tls})"


def parse_broker_url(url: str) -> BrokerAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"MQTT URL scheme must be mqtt:// or mqtts://, not {parts.scheme!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError("MQTT URL needs a host")
    return BrokerAddress(
        host=parts.hostname,
        port=parts.port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def tls_context(settings: Settings) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None)
    if settings.mqtt_tls_cert:
        context.load_cert_chain(
            str(settings.mqtt_tls_cert), str(settings.mqtt_tls_key) if settings.mqtt_tls_key else None
        )
    if settings.mqtt_tls_insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# (packet id, QoS, topic, payload) of a received PUBLISH
Publish = tuple[int, int, str, bytes]


class BufferedClient(mqtt.Client):
    """paho's client, for an event loop of the caller's (paho's "external loop" mode), with a fast path for
    received PUBLISH packets — the only packets that come by the thousand.

    paho reads every packet with three ``recv`` calls (the command byte, the length bytes one by one, then
    the rest) and decodes it through general-purpose code: on MQTT 5 a ``Properties`` object per message
    (a dict of 27 names built, then scanned), an ``MQTTMessage``, a topic-filter match for callbacks. On
    this project's 2-core machines that was most of the collector's time per message. Here:

    - ``fill`` reads the socket in chunks of up to ``READ_CHUNK`` bytes, and ``_sock_recv`` (paho's one
      read primitive) serves paho's small reads from that buffer;
    - ``take_publishes`` decodes the complete QoS 0/1 PUBLISH packets at the head of the buffer itself
      (fixed header, topic, packet id; MQTT 5 properties are skipped: the collector uses none, and topic
      aliases, the one that would change the topic, are off as we never announce a Topic Alias Maximum);
    - everything else — CONNACK, SUBACK, PUBACK of our own publishes, PINGRESP, a packet split across reads,
      anything unusual — stays in the buffer for paho's ``loop_read``, exactly as it would have read it.

    The caller loops ``fill`` → ``take_publishes`` → ``loop_read`` while something is buffered, and stops
    when ``fill`` reports the socket drained (paho's threaded loop would not see what is buffered).
    """

    READ_CHUNK = 256 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None
        self._rerror: BaseException | None = None  # met by fill(), raised to paho at its next read
        self._reof = False

    @property
    def buffered(self) -> bool:
        """Something read from the socket (data, end of stream or an error) is waiting for paho or us."""
        if self._rsock is not self._sock:
            return False
        return self._rpos < len(self._rbuf) or self._reof or self._rerror is not None

    def fill(self) -> bool:
        """Make sure something is buffered: False when there is nothing to read (the socket is drained)."""
        if self.buffered:
            return True
        try:
            data = super()._sock_recv(self.READ_CHUNK)  # paho's: TLS "want read/write" → BlockingIOError
        except BlockingIOError:
            return False
        except OSError as exc:
            data, self._rerror = b"", exc
        self._rsock, self._rbuf, self._rpos = self._sock, data, 0
        self._reof = not data and self._rerror is None
        return True

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self.fill():
            raise BlockingIOError
        if self._rerror is not None:
            exc, self._rerror = self._rerror, None
            raise exc
        if self._reof:
            self._reof = False
            return b""
        pos = self._rpos
        self._rpos = pos + bufsize
        return self._rbuf[pos : pos + bufsize]

    def take_publishes(self, out: list[Publish], limit: int) -> int:
        """Append up to ``limit`` complete QoS 0/1 PUBLISH packets from the head of the buffer to ``out``;
        stop at anything else. Returns how many were taken."""
        if self._in_packet["command"] or self._rsock is not self._sock:
            return 0  # paho is in the middle of a packet (or the buffer is a closed socket's)
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        v5 = self._protocol == mqtt.MQTTv5
        taken = 0
        while taken < limit and pos + 4 <= end:
            header = buf[pos]
            if header & 0xF6 not in (0x30, 0x32):  # PUBLISH with QoS 0 or 1 (any DUP and RETAIN)
                break
            # Remaining length: 1 to 4 bytes, 7 bits each, least significant first.
            length, shift, i = 0, 0, pos + 1
            while i < end and shift < 28:
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if byte < 0x80:
                    break
                shift += 7
            else:
                break  # incomplete (or malformed: paho will say so)
            stop = i + length
            if stop > end or length < 2:
                break
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            p = topic_end
            mid = 0
            qos = (header >> 1) & 3
            if qos:
                mid = buf[p] << 8 | buf[p + 1] if p + 2 <= stop else 0
                p += 2
            if v5:  # property length, then the properties: skipped
                plen, shift = 0, 0
                while True:
                    if p >= stop or shift >= 28:
                        p = stop + 1  # malformed
                        break
                    byte = buf[p]
                    plen |= (byte & 0x7F) << shift
                    p += 1
                    if byte < 0x80:
                        break
                    shift += 7
                p += plen
            if p > stop or topic_end == i + 2 or (qos and not mid):
                break  # a field runs past the packet, an empty topic (alias) or packet id 0: paho decides
            try:
                topic = buf[i + 2 : topic_end].decode()
            except UnicodeDecodeError:
                break
            out.append((mid, qos, topic, buf[p:stop]))
            pos = stop
            taken += 1
        self._rpos = pos
        return taken


def new_client(
    client_id: str,
    address: BrokerAddress,
    *,
    tls: ssl.SSLContext | None = None,
    mqtt5: bool = True,
    client_class: type[mqtt.Client] = mqtt.Client,
) -> mqtt.Client:
    if mqtt5:
        client = client_class(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        # MQTT 3.1.1 has no session expiry: clean_session=False keeps the session until we ask otherwise.
        client = client_class(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls or ssl.create_default_context())
    return client
