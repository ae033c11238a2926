"""The capability every app runs: the ingest writer, the event bridge between processes, and the
followers of the event hub that keep this process in step (the registry cache, command wake-ups and
expiry). App layer: it wires storage, ingest, events and the command service."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from telemetra.events import model
from telemetra.events.model import Gap
from telemetra.services import Services
from telemetra.storage.event_bridge import PgEventBridge
from telemetra.supervise import Supervisor

log = logging.getLogger(__name__)


class Core:
    name = "ingest"

    def __init__(self, services: Services) -> None:
        self._services = services
        self.supervisor = Supervisor("core", services.failures)

    async def __aenter__(self) -> Core:
        services = self._services
        await self.supervisor.__aenter__()
        spawn = self.supervisor.spawn
        spawn("ingest-writer", services.queue.run)
        spawn("event-bridge", services.bridge.run)
        await services.bridge.ready()
        if isinstance(services.bridge, PgEventBridge):
            spawn("event-sender", services.bridge.run_sender)
        spawn("registry-cache", self._follow_registry)
        spawn("commands", lambda: services.commands.follow(services.hub))
        spawn("command-expiry", services.commands.run_expiry)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.supervisor.__aexit__(exc_type, exc, tb)
        finally:
            await self._services.commands.close()

    def health(self) -> dict[str, Any]:
        status = self._services.queue.status()
        body: dict[str, Any] = {"status": status.status, "depth": status.depth, "capacity": status.capacity}
        if status.detail:
            body["detail"] = status.detail
        bridge = self._services.bridge
        body["events"] = {
            "published": self._services.hub.published,
            "subscribers": self._services.hub.subscribers,
            "listener": "ok" if bridge.connected else "down",
            "peers": bridge.peers,
        }
        return body

    async def _follow_registry(self) -> None:
        """Registry changes from any process drop this process's cached credentials of the device."""
        directory = self._services.directory
        async with self._services.hub.subscribe(types=(model.DEVICE,), maxsize=10_000) as events:
            async for event in events:
                if isinstance(event, Gap) or event.data.get("change") == "resync" or event.device_id is None:
                    directory.invalidate()
                else:
                    directory.invalidate(event.device_id)
