"""The services an app owns, and ``Annotated`` dependencies so endpoint signatures read like sentences."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.config import Settings
from telemetra.domain.errors import Forbidden, Unauthorized
from telemetra.domain.principal import ADMIN, ANONYMOUS, FLEET, Principal, Role
from telemetra.ingest.queue import IngestQueue
from telemetra.ingest.service import IngestService
from telemetra.metrics import Metrics
from telemetra.mqtt.downlink import CommandService
from telemetra.ota.capability import Ota
from telemetra.storage.commands import AlertRepository
from telemetra.storage.devices import DeviceRepository
from telemetra.storage.directory import DeviceDirectory
from telemetra.storage.queries import TelemetryQueries

# (device_id, new secret or None, enabled or None, deleted)
RegistryHook = Callable[[str, str | None, bool | None, bool], Awaitable[None]]


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    metrics: Metrics
    queue: IngestQueue
    directory: DeviceDirectory
    ingest: IngestService
    devices: DeviceRepository
    queries: TelemetryQueries
    admin_keys: list[str]
    commands: CommandService
    alerts: AlertRepository
    ota: Ota | None = None  # issue 8: firmware, gateway jobs, rollouts
    extras: dict[str, Any] = field(default_factory=dict)  # later capabilities (MQTT, realtime) hang here
    registry_hooks: list[RegistryHook] = field(default_factory=list)

    async def registry_changed(
        self, device_id: str, *, secret: str | None = None, enabled: bool | None = None, deleted: bool = False
    ) -> None:
        """A device was created, re-keyed, enabled/disabled or deleted: drop cached credentials, and let
        the hooks (e.g. Mosquitto dynamic security) follow the registry."""
        self.directory.invalidate(device_id)
        for hook in self.registry_hooks:
            await hook(device_id, secret, enabled, deleted)


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain ``def`` dependency in the thread pool, a thread hop per request.
    services: Services = request.app.state.services
    return services


async def principal_of(request: Request, services: Services) -> Principal:
    """The caller, read straight from the headers (for hot paths that skip dependency resolution)."""
    headers = request.headers
    return await resolve_principal(services, _presented_key(headers.get("x-api-key"), headers.get("authorization")))


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


def _matches_any(key: str, candidates: list[str]) -> bool:
    # Compare against every candidate so timing does not tell which one (or whether any) matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


async def resolve_principal(services: Services, key: str | None) -> Principal:
    if key is None:
        return ANONYMOUS
    if _matches_any(key, services.admin_keys):
        return ADMIN
    if services.settings.device_api_keys and _matches_any(key, services.settings.device_api_keys):
        return FLEET
    info = await services.directory.by_secret(key)
    if info is None:
        raise Unauthorized("invalid API key", field="X-API-Key")
    if info.disabled:
        raise Forbidden(f"device {info.id!r} is disabled", field="X-API-Key")
    return Principal(Role.GATEWAY if info.kind == "gateway" else Role.DEVICE, info.id)


async def get_principal(
    services: ServicesDep,
    x_api_key: Annotated[str | None, Header(description="admin, device, gateway or fleet key")] = None,
    authorization: Annotated[str | None, Header(description="Bearer <key>")] = None,
) -> Principal:
    return await resolve_principal(services, _presented_key(x_api_key, authorization))


async def require_caller(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if principal.role is Role.ANONYMOUS:
        raise Unauthorized("an API key is required (X-API-Key or Authorization: Bearer)", field="X-API-Key")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if principal.role is Role.ANONYMOUS:
        raise Unauthorized("an admin API key is required", field="X-API-Key")
    if not principal.is_admin:
        raise Forbidden("this endpoint needs an admin key", field="X-API-Key")
    return principal


MaybePrincipal = Annotated[Principal, Depends(get_principal)]
Caller = Annotated[Principal, Depends(require_caller)]
Admin = Annotated[Principal, Depends(require_admin)]


def check_reads(principal: Principal, device_id: str) -> None:
    """Admin reads everything; a device (or gateway) reads only its own data."""
    if not principal.owns(device_id):
        raise Forbidden(f"this key may not read device {device_id!r}", field="device_id")
