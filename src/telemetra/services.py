"""The typed container of what one app runs, built by ``app.build_services`` and handed to the API.

It holds plain objects of the layers below the API (storage, ingest, events, MQTT, OTA) and nothing
string-keyed: a capability that starts later (MQTT, realtime) fills its own typed field. ``components``
is what ``/health`` asks, ``failures`` what died.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.alerts.budget import BudgetAlerts
from telemetra.alerts.engine import RulesEngine
from telemetra.config import Settings
from telemetra.domain.principal import AccessPolicy, Role, parse_networks
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent
from telemetra.events.streams import StreamConnections
from telemetra.ingest.queue import IngestQueue
from telemetra.ingest.service import IngestService
from telemetra.metrics import Metrics
from telemetra.mqtt.collector import Collector
from telemetra.mqtt.downlink import CommandService
from telemetra.mqtt.embedded import EmbeddedBroker
from telemetra.ota.capability import Ota
from telemetra.retention import Retention
from telemetra.storage.commands import AlertRepository
from telemetra.storage.devices import DeviceRepository
from telemetra.storage.directory import DeviceDirectory
from telemetra.storage.event_bridge import PgEventBridge, SqliteRegistryFollower, registry_event
from telemetra.storage.faults import DatabaseState
from telemetra.storage.queries import TelemetryQueries
from telemetra.supervise import Failures
from telemetra.webhooks import Webhooks

# Applies a registry change this process made, before its API answers (Mosquitto's accounts, the embedded
# broker's sessions); the new secret comes with it when there is one — secrets never travel as events.
# The same handlers follow other processes' changes as subscribers of the hub.
RegistryHandler = Callable[[ChangeEvent, str | None], Awaitable[None]]


class Component(Protocol):
    """Something ``/health`` reports on: ``health()`` gives at least ``status`` (ok, off, or a failure)."""

    name: str

    def health(self) -> dict[str, Any]: ...


@dataclass
class Probe:
    """A ``Component`` made of a name and a function."""

    name: str
    probe: Callable[[], dict[str, Any]]

    def health(self) -> dict[str, Any]:
        return self.probe()


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    metrics: Metrics
    database: DatabaseState
    hub: EventHub
    bridge: PgEventBridge | SqliteRegistryFollower
    queue: IngestQueue
    directory: DeviceDirectory
    ingest: IngestService
    devices: DeviceRepository
    queries: TelemetryQueries
    admin_keys: list[str]
    commands: CommandService
    alerts: AlertRepository
    failures: Failures
    ota: Ota | None = None
    rules: RulesEngine | None = None  # set by the rules capability while it runs
    retention: Retention | None = None  # set by the retention capability while it runs
    webhooks: Webhooks | None = None  # set by the webhooks capability while it runs
    budget_alerts: BudgetAlerts | None = None  # the storage_budget alert, settled by each retention pass
    # Set by the MQTT capability while it runs (the one in use; the other stays None).
    mqtt_broker: EmbeddedBroker | None = None
    mqtt_collector: Collector | None = None
    streams: StreamConnections = field(default_factory=StreamConnections)
    components: list[Component] = field(default_factory=list)
    registry_handlers: list[RegistryHandler] = field(default_factory=list)

    @cached_property
    def access(self) -> AccessPolicy:
        return access_policy(self.settings, self.admin_keys)

    async def emit(self, events: Sequence[ChangeEvent]) -> None:
        """Changes committed outside the ingest queue: to this process's hub, and to the others."""
        self.hub.publish(events)
        self.bridge.send_later(events)

    async def registry_changed(self, device_id: str, change: str, *, secret: str | None = None) -> None:
        """This process changed a device (``change``: created, updated, rotated, disabled, enabled,
        deleted, claimed, config): its cached credentials go and the handlers apply it before the caller
        answers (with the new secret, which never travels as an event). The ``device`` event itself comes,
        here as in every process, from the database's trigger — the one source of registry events, so a
        change is never published twice or swallowed; the handlers, which also follow those events, are
        idempotent."""
        self.directory.invalidate(device_id)
        event = registry_event(change, device_id, None)
        for handler in self.registry_handlers:
            await handler(event, secret)
        await self.bridge.poll_now()  # SQLite: the trigger's row, as an event, now


def access_policy(settings: Settings, admin_keys: list[str]) -> AccessPolicy:
    return AccessPolicy(
        admin_keys=tuple(admin_keys),
        operator_keys=tuple(settings.operator_keys),
        viewer_keys=tuple(settings.viewer_keys),
        trusted_networks=parse_networks(settings.trusted_networks),
        trusted_role=Role(settings.trusted_role),
    )
