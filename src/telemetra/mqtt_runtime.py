"""MQTT inside the app's lifespan — app layer, since it wires mqtt/, storage/ and the API's services:
the embedded broker (default) or an external one (with Mosquitto dynamic-security provisioning), the
collector, and the downlink publisher."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

from telemetra.api.deps import Services
from telemetra.config import Settings
from telemetra.domain.errors import Overloaded
from telemetra.mqtt.acl import MqttPrincipal, TopicAcl
from telemetra.mqtt.broker_accounts import MosquittoAccounts
from telemetra.mqtt.client_id import CollectorClientId
from telemetra.mqtt.collector import Collector
from telemetra.mqtt.connection import BrokerAddress, parse_broker_url, tls_context
from telemetra.mqtt.embedded import DeviceIngest, EmbeddedBroker
from telemetra.mqtt.inbound import Inbound
from telemetra.mqtt.presets import build_table
from telemetra.mqtt.rejections import RejectionGate, RejectionLimiter
from telemetra.mqtt.routes import RouteTable

log = logging.getLogger(__name__)


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
    if not settings.mqtt_url:
        await _start_embedded(services, stack, inbound, acl, probes)
        return
    address = parse_broker_url(settings.mqtt_url)
    tls = tls_context(settings) if address.tls else None
    if settings.mqtt_dynsec_username and settings.mqtt_dynsec_password:
        await _provision_mosquitto(services, stack, address, table, tls, probes)
    collector = Collector(
        address=address,
        client_id=_client_id(settings.mqtt_client_id, stack, settings.data_dir),
        subscriptions=table.subscriptions,
        share_group=settings.mqtt_share_group,
        inbound=inbound,
        queue=services.queue,
        metrics=services.metrics,
        tls=tls,
        mqtt5=True,
    )
    await collector.start()
    stack.push_async_callback(collector.stop)
    services.commands.publisher = collector
    services.extras["mqtt_collector"] = collector
    services.extras["mqtt_routes"] = table
    probes["mqtt"] = lambda: {
        "status": "ok" if collector.connected else "down",
        "mode": "external",
        "broker": f"{address.host}:{address.port}",
    }


async def _start_embedded(
    services: Services, stack: AsyncExitStack, inbound: Inbound, acl: TopicAcl, probes: dict[str, Any]
) -> None:
    """The in-process broker: devices' messages go from their connections straight into the ingest
    pipeline (acknowledged after commit), and the downlink publishes into the broker itself."""
    settings = services.settings
    sink = DeviceIngest(inbound, services.queue, services.metrics, on_refused=_keep_refused(services, inbound))
    broker = EmbeddedBroker(
        host=settings.mqtt_host, port=settings.mqtt_port, authenticate=_registry_auth(services), acl=acl, sink=sink
    )
    consumer = asyncio.create_task(sink.run(), name="mqtt-embedded-ingest")

    async def stop_consumer() -> None:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)

    stack.push_async_callback(stop_consumer)
    await stack.enter_async_context(broker)
    # Unwound first: stop reading devices and acknowledge what was taken in, then close the broker.
    stack.push_async_callback(sink.finish, 10.0)
    _follow_registry_embedded(services, stack, broker)
    services.commands.publisher = broker
    services.extras["mqtt_broker"] = broker
    probes["mqtt"] = lambda: {
        "status": "ok" if not consumer.done() else "down",
        "mode": "embedded",
        "broker": f"{settings.mqtt_host}:{broker.port}",
        "waiting": sink.pipeline.waiting,
    }


def _client_id(configured: str | None, stack: AsyncExitStack, data_dir: Any) -> str:
    """Stable across restarts (the broker keeps our session under it), unguessable, one per process."""
    if configured:
        return configured
    return stack.enter_context(CollectorClientId(data_dir)).client_id


def _registry_auth(services: Services) -> Any:
    async def authenticate(username: str | None, password: str | None) -> MqttPrincipal | None:
        if not username or not password:
            return None
        info = await services.directory.by_secret(password)
        if info is None or info.id != username or info.disabled:
            return None
        return MqttPrincipal(username=username, device_id=info.id)

    return authenticate


def _keep_refused(services: Services, inbound: Inbound) -> Any:
    """The embedded broker's ACL refusals, into the rejected-messages store (within the device's allowance).
    Without waiting for the commit: the broker's connection loop must not stall on storage."""

    def keep(device_id: str | None, topic: str, payload: bytes) -> None:
        batch = inbound.refused_publish(device_id, topic, payload)
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
    services: Services,
    stack: AsyncExitStack,
    address: BrokerAddress,
    table: RouteTable,
    tls: Any,
    probes: dict[str, Any],
) -> None:
    settings = services.settings
    assert settings.mqtt_dynsec_username and settings.mqtt_dynsec_password
    accounts = MosquittoAccounts(
        host=address.host,
        port=address.port,
        admin_username=settings.mqtt_dynsec_username,
        admin_password=settings.mqtt_dynsec_password,
        device_roots=table.publish_filters,
        downlink=table.downlink,
        devices=services.devices,
        metrics=services.metrics,
        service_username=address.username,
        service_password=address.password,
        bind_client_id=settings.mqtt_bind_client_id,
        tls=tls,
    )
    await stack.enter_async_context(accounts)
    services.registry_hooks.append(accounts.registry_changed)
    stack.callback(services.registry_hooks.remove, accounts.registry_changed)
    probes["mqtt_accounts"] = accounts.health
    services.extras["dynsec"] = accounts.provisioner
