"""Where clients reach this server, from the server's own settings: the one source of truth the CLI,
``telemetra simulate`` and the README's examples share (``TELEMETRA_HOST``/``PORT``, ``TELEMETRA_MQTT_*``),
so a broker moved off 1883 moves them all."""

from __future__ import annotations

from dataclasses import dataclass

from telemetra.config import Settings

_ANY = ("0.0.0.0", "::", "")


def _reachable(host: str) -> str:
    """A bind address as an address to connect to: "all interfaces" is this machine."""
    if host in _ANY:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def http_url(settings: Settings) -> str:
    scheme = "https" if settings.tls_cert else "http"
    return f"{scheme}://{_reachable(settings.host)}:{settings.port}"


@dataclass(frozen=True)
class MqttEndpoint:
    host: str
    port: int
    tls: bool


def mqtt_endpoint(settings: Settings) -> MqttEndpoint | None:
    """The broker devices connect to: the external one of TELEMETRA_MQTT_URL, else the embedded one (its
    TLS listener when it has one); None when MQTT is off."""
    if settings.mqtt_url:
        from telemetra.mqtt.connection import parse_broker_url

        address = parse_broker_url(settings.mqtt_url)
        return MqttEndpoint(address.host, address.port, address.tls)
    if settings.mqtt_port == 0:
        return None
    host = _reachable(settings.mqtt_host).strip("[]")
    if settings.tls_cert and settings.mqtt_tls_port:
        return MqttEndpoint(host, settings.mqtt_tls_port, True)
    return MqttEndpoint(host, settings.mqtt_port, False)
