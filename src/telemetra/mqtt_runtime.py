"""MQTT as a capability of the app (app layer: it wires mqtt/, storage/ and the services): the embedded
broker (default) or an external one (with Mosquitto dynamic-security provisioning), the collector, and
the downlink publisher. ``MqttCapability`` is an async context manager; its background tasks run under
a ``Supervisor``, and registry changes reach the brokers as ``device`` events from the hub."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

from telemetra.config import Settings
from telemetra.domain.errors import Overloaded
from telemetra.events import model
from telemetra.events.model import ChangeEvent, Gap
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
from telemetra.services import Probe, RegistryHandler, Services
from telemetra.storage.event_bridge import registry_event
from telemetra.supervise import Supervisor

log = logging.getLogger(__name__)

# Registry changes after which a connected device must connect again (credentials no longer valid).
_REVOKING = frozenset({"rotated", "disabled", "deleted"})


def route_table(settings: Settings) -> RouteTable:
    """The enabled presets' routes and downlinks (``ValueError`` when they would let devices overlap)."""
    return build_table(settings.mqtt_prefix, settings.mqtt_presets, settings.mqtt_routes)


class MqttCapability:
    name = "mqtt"

    def __init__(self, services: Services) -> None:
        self._services = services
        self._stack = AsyncExitStack()
        self._supervisor = Supervisor("mqtt", services.failures)
        self._health: dict[str, Any] = {"status": "off"}
        self._probe: Any = None
        self.accounts: MosquittoAccounts | None = None

    def health(self) -> dict[str, Any]:
        return self._probe() if self._probe is not None else dict(self._health)

    async def __aenter__(self) -> MqttCapability:
        settings = self._services.settings
        if not settings.mqtt_url and settings.mqtt_port == 0:
            return self
        await self._stack.__aenter__()
        try:
            await self._stack.enter_async_context(self._supervisor)
            table = route_table(settings)
            acl = TopicAcl(device_roots=table.publish_filters, downlink=table.downlink)
            services = self._services
            gate = RejectionGate(RejectionLimiter(settings.rejected_per_minute), services.metrics)
            inbound = Inbound(
                table, services.ingest, services.directory, max_payload_bytes=settings.max_payload_bytes, gate=gate
            )
            if settings.mqtt_url:
                await self._start_external(inbound, table)
            else:
                await self._start_embedded(inbound, acl)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        services = self._services
        services.commands.publisher = None
        services.mqtt_broker = None
        services.mqtt_collector = None
        await self._stack.__aexit__(exc_type, exc, tb)

    # -- embedded --------------------------------------------------------------------------------------
    async def _start_embedded(self, inbound: Inbound, acl: TopicAcl) -> None:
        """The in-process broker: devices' messages go from their connections straight into the ingest
        pipeline (acknowledged after commit), and the downlink publishes into the broker itself."""
        services, stack = self._services, self._stack
        settings = services.settings
        sink = DeviceIngest(inbound, services.queue, services.metrics, on_refused=_keep_refused(services, inbound))
        broker = EmbeddedBroker(
            host=settings.mqtt_host, port=settings.mqtt_port, authenticate=_registry_auth(services), acl=acl, sink=sink
        )
        self._supervisor.spawn("embedded-ingest", sink.run)
        await stack.enter_async_context(broker)
        # Unwound first: stop reading devices and acknowledge what was taken in, then close the broker.
        stack.push_async_callback(sink.finish, 10.0)
        self._follow("sessions", lambda event, _secret: _close_revoked(broker, event))
        services.commands.publisher = broker
        services.mqtt_broker = broker
        supervisor = self._supervisor

        def probe() -> dict[str, Any]:
            running = supervisor.alive("embedded-ingest") and supervisor.alive("sessions")
            return {
                "status": "ok" if running else "down",
                "mode": "embedded",
                "broker": f"{settings.mqtt_host}:{broker.port}",
                "waiting": sink.pipeline.waiting,
            }

        self._probe = probe

    def _follow(self, name: str, handler: RegistryHandler) -> None:
        """``handler`` applies this process's registry changes inline (``Services.registry_changed``, with
        the new secret) and follows every registry event through the hub — this process's own again
        (handlers are idempotent), the other processes' and the CLI's."""
        services = self._services
        services.registry_handlers.append(handler)
        self._stack.callback(services.registry_handlers.remove, handler)
        self._supervisor.spawn(name, lambda: self._follow_hub(handler))

    async def _follow_hub(self, handler: RegistryHandler) -> None:
        async with self._services.hub.subscribe(types=(model.DEVICE,), maxsize=10_000) as events:
            async for event in events:
                if isinstance(event, Gap):
                    event = registry_event("resync", None, None)
                try:
                    await handler(event, None)
                except Exception:
                    log.exception("could not apply the registry change %s of %s", event.data, event.device_id)

    # -- external --------------------------------------------------------------------------------------
    async def _start_external(self, inbound: Inbound, table: RouteTable) -> None:
        services, stack = self._services, self._stack
        settings = services.settings
        assert settings.mqtt_url
        address = parse_broker_url(settings.mqtt_url)
        tls = tls_context(settings) if address.tls else None
        if settings.mqtt_dynsec_username and settings.mqtt_dynsec_password:
            await self._provision_mosquitto(address, table, tls)
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
        services.mqtt_collector = collector
        self._probe = lambda: {
            "status": "ok" if collector.connected else "down",
            "mode": "external",
            "broker": f"{address.host}:{address.port}",
        }

    async def _provision_mosquitto(self, address: BrokerAddress, table: RouteTable, tls: Any) -> None:
        services, stack = self._services, self._stack
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
        self.accounts = accounts
        component = Probe("mqtt_accounts", accounts.health)
        services.components.append(component)
        stack.callback(services.components.remove, component)

        async def mirror(event: ChangeEvent, secret: str | None) -> None:
            """Every registry change, whichever process made it, mirrored into Mosquitto (the account is
            read afresh from the registry); after a lost listener, everything is reconciled."""
            change = event.data.get("change")
            if change == "config":
                return  # desired configuration is no part of a broker account
            if change == "resync" or event.device_id is None:
                await accounts.reconcile()
            else:
                await accounts.registry_changed(event.device_id, secret, None, event.data.get("change") == "deleted")

        self._follow("accounts", mirror)


async def _close_revoked(broker: EmbeddedBroker, event: ChangeEvent) -> None:
    """The embedded broker checks credentials only at CONNECT: close the connections of a device whose
    credentials stop being valid (the registry cache has already dropped them, so a reconnect with the
    old secret is refused)."""
    change = event.data.get("change")
    if event.device_id is not None and change in _REVOKING:
        await broker.disconnect_device(event.device_id, forget=change == "deleted")


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
