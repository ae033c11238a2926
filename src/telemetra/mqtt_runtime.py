"""MQTT inside the app's lifespan — app layer, since it wires mqtt/, storage/ and the API's services:
the embedded broker (default) or an external one (with Mosquitto dynamic-security provisioning), the
collector, and the downlink publisher."""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
from contextlib import AsyncExitStack
from typing import Any

from telemetra.api.deps import Services
from telemetra.config import Settings
from telemetra.domain.errors import Overloaded
from telemetra.mqtt.acl import MqttPrincipal, TopicAcl
from telemetra.mqtt.collector import Collector
from telemetra.mqtt.connection import BrokerAddress, parse_broker_url, tls_context
from telemetra.mqtt.dynsec import DynsecProvisioner
from telemetra.mqtt.embedded import EmbeddedBroker
from telemetra.mqtt.inbound import Inbound
from telemetra.mqtt.presets import build_table
from telemetra.mqtt.rejections import RejectionGate, RejectionLimiter
from telemetra.mqtt.routes import RouteTable

log = logging.getLogger(__name__)

SERVICE_USERNAME = "telemetra-service"


def route_table(settings: Settings) -> RouteTable:
    """The enabled presets' routes and downlinks (``ValueError`` when they would let devices overlap)."""
    return build_table(settings.mqtt_prefix, settings.mqtt_presets, settings.mqtt_routes)


async def start_mqtt(services: Services, stack: AsyncExitStack) -> None:
    settings = services.settings
    probes: dict[str, Any] = services.extras.setdefault("health_probes", {})
    if not settings.mqtt_url and settings.mqtt_port == 0:
        probes["mqtt"] = lambda: {"status": "off"}
        return
    table = route_table(settings)
    acl = TopicAcl(device_roots=table.publish_filters, downlink=table.downlink)
    gate = RejectionGate(RejectionLimiter(settings.rejected_per_minute), services.metrics)
    inbound = Inbound(
        table, services.ingest, services.directory, max_payload_bytes=settings.max_payload_bytes, gate=gate
    )
    if settings.mqtt_url:
        address = parse_broker_url(settings.mqtt_url)
        tls = tls_context(settings) if address.tls else None
        if settings.mqtt_dynsec_username and settings.mqtt_dynsec_password:
            await _provision_mosquitto(services, stack, address, table, tls)
        share_group: str | None = settings.mqtt_share_group
        mode = "external"
    else:
        password = secrets.token_urlsafe(24)
        broker = EmbeddedBroker(
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            authenticate=_registry_auth(services, password),
            acl=acl,
            on_refused=_keep_refused(services, inbound),
        )
        await stack.enter_async_context(broker)
        _follow_registry_embedded(services, stack, broker)
        address = BrokerAddress("127.0.0.1", broker.port, SERVICE_USERNAME, password, False)
        tls = None
        # amqtt has no shared subscriptions; with an embedded broker there is one Telemetra process anyway.
        share_group = None
        mode = "embedded"
        services.extras["mqtt_broker"] = broker
    collector = Collector(
        address=address,
        client_id=_client_id(settings.mqtt_client_id, settings.port),
        subscriptions=table.subscriptions,
        share_group=share_group,
        inbound=inbound,
        queue=services.queue,
        metrics=services.metrics,
        tls=tls,
        mqtt5=mode == "external",
    )
    await collector.start()
    stack.push_async_callback(collector.stop)
    services.commands.publisher = collector
    services.extras["mqtt_collector"] = collector
    services.extras["mqtt_routes"] = table
    probes["mqtt"] = lambda: {
        "status": "ok" if collector.connected else "down",
        "mode": mode,
        "broker": f"{address.host}:{address.port}",
    }


def _client_id(configured: str | None, http_port: int) -> str:
    """Stable across restarts (the broker keeps our session under it), distinct per process on a host."""
    return configured or f"telemetra-{socket.gethostname()}-{http_port}"[:64]


def _registry_auth(services: Services, service_password: str) -> Any:
    async def authenticate(username: str | None, password: str | None) -> MqttPrincipal | None:
        if not username or not password:
            return None
        if username == SERVICE_USERNAME:
            if hmac.compare_digest(password.encode(), service_password.encode()):
                return MqttPrincipal(username=username, device_id=None, is_service=True)
            return None
        info = await services.directory.by_secret(password)
        if info is None or info.id != username or info.disabled:
            return None
        return MqttPrincipal(username=username, device_id=info.id)

    return authenticate


def _keep_refused(services: Services, inbound: Inbound) -> Any:
    """The embedded broker's ACL refusals, into the rejected-messages store (within the device's allowance).
    Without waiting for the commit: the broker's connection loop must not stall on storage."""

    def keep(principal: MqttPrincipal | None, topic: str, payload: bytes) -> None:
        batch = inbound.refused_publish(principal.device_id if principal else None, topic, payload)
        if not batch.rejected:
            return
        try:
            future = services.queue.submit_nowait(batch, transport="mqtt")
        except Overloaded:
            services.metrics.rejected_unkept.labels("mqtt").inc()  # the queue is full: counted, not kept
            return
        future.add_done_callback(lambda done: done.cancelled() or done.exception())

    return keep


def _follow_registry_embedded(services: Services, stack: AsyncExitStack, broker: EmbeddedBroker) -> None:
    """The embedded broker checks credentials only at CONNECT: close the connections of a device whose
    credentials stop being valid. registry_changed() has already dropped them from the directory cache,
    so a reconnect with the old secret is refused."""

    async def close_revoked_sessions(device_id: str, secret: str | None, enabled: bool | None, deleted: bool) -> None:
        # A new secret (rotation; also creation and claiming, where nothing is connected yet), a
        # disable, or a delete. `enabled=True` comes with every PATCH and revokes nothing.
        if not (deleted or secret is not None or enabled is False):
            return
        try:
            await broker.disconnect_device(device_id, forget=deleted)
        except Exception:
            log.exception("could not close the embedded MQTT connections of device %s", device_id)

    services.registry_hooks.append(close_revoked_sessions)
    stack.callback(services.registry_hooks.remove, close_revoked_sessions)


async def _provision_mosquitto(
    services: Services, stack: AsyncExitStack, address: BrokerAddress, table: RouteTable, tls: Any
) -> None:
    settings = services.settings
    assert settings.mqtt_dynsec_username and settings.mqtt_dynsec_password
    provisioner = DynsecProvisioner(
        host=address.host,
        port=address.port,
        username=settings.mqtt_dynsec_username,
        password=settings.mqtt_dynsec_password,
        device_roots=table.publish_filters,
        downlink=table.downlink,
        tls=tls,
    )
    await stack.enter_async_context(provisioner)
    if address.username and address.password:
        await provisioner.ensure_service_account(address.username, address.password)

    async def follow_registry(device_id: str, secret: str | None, enabled: bool | None, deleted: bool) -> None:
        try:
            if deleted:
                await provisioner.delete_device(device_id)
            elif secret is not None:
                await provisioner.upsert_device(device_id, secret, enabled=True if enabled is None else enabled)
            elif enabled is not None:
                await provisioner.upsert_device(device_id, None, enabled=enabled)
        except Exception:
            # The registry is the source of truth; the broker catches up on the next change or rotation.
            log.exception("could not mirror device %s into Mosquitto dynamic security", device_id)

    services.registry_hooks.append(follow_registry)
    services.extras["dynsec"] = provisioner
