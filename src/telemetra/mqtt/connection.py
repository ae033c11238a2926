"""Broker address and TLS from settings, and a paho 2.x client configured the one way we use it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
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


def new_client(
    client_id: str, address: BrokerAddress, *, tls: ssl.SSLContext | None = None, mqtt5: bool = True
) -> mqtt.Client:
    if mqtt5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    else:
        # MQTT 3.1.1 has no session expiry: clean_session=False keeps the session until we ask otherwise.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=False)
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls or ssl.create_default_context())
    return client
