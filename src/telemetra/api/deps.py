"""``Annotated`` dependencies so endpoint signatures read like sentences: the app's services (the
container lives in ``telemetra.services``) and the caller, with the role each endpoint needs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import Depends, Header, Request

from telemetra.config import Settings
from telemetra.domain.errors import Forbidden, Unauthorized
from telemetra.domain.principal import FLEET, Principal, Role, matches_any
from telemetra.services import Services

log = logging.getLogger(__name__)


async def get_services(request: Request) -> Services:
    # async: FastAPI runs a plain ``def`` dependency in the thread pool, a thread hop per request.
    services: Services = request.app.state.services
    return services


def warn_open_access(settings: Settings) -> None:
    """Said at every start while trusted networks are on: key-less requests from them are let in."""
    if settings.trusted_networks:
        log.warning(
            "TELEMETRA_TRUSTED_NETWORKS is set: requests without a key from %s are treated as %s. "
            "Use it only for networks you control, behind a proxy that sets X-Forwarded-For.",
            ", ".join(settings.trusted_networks),
            settings.trusted_role,
        )


def _client_host(request: Request) -> str | None:
    # uvicorn has already replaced it with X-Forwarded-For's when the peer is a trusted proxy
    # (--forwarded-allow-ips, 127.0.0.1 by default).
    client = request.client
    return client.host if client is not None else None


async def principal_of(request: Request, services: Services) -> Principal:
    """The caller, read straight from the headers (for hot paths that skip dependency resolution)."""
    headers = request.headers
    key = _presented_key(headers.get("x-api-key"), headers.get("authorization"))
    return await resolve_principal(services, key, _client_host(request))


ServicesDep = Annotated[Services, Depends(get_services)]


def _presented_key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


async def resolve_principal(services: Services, key: str | None, client_host: str | None = None) -> Principal:
    if key is None:
        return services.access.keyless(client_host)
    staff = services.access.staff(key)
    if staff is not None:
        return staff
    if services.settings.device_api_keys and matches_any(key, services.settings.device_api_keys):
        return FLEET
    info = await services.directory.by_secret(key)
    if info is None:
        raise Unauthorized("invalid API key", field="X-API-Key")
    if info.disabled:
        raise Forbidden(f"device {info.id!r} is disabled", field="X-API-Key")
    return Principal(Role.GATEWAY if info.kind == "gateway" else Role.DEVICE, info.id)


async def get_principal(
    request: Request,
    services: ServicesDep,
    x_api_key: Annotated[str | None, Header(description="admin, operator, viewer, device, gateway or fleet key")] = (
        None
    ),
    authorization: Annotated[str | None, Header(description="Bearer <key>")] = None,
) -> Principal:
    return await resolve_principal(services, _presented_key(x_api_key, authorization), _client_host(request))


def _known_caller(principal: Principal, what: str) -> None:
    if principal.role is Role.ANONYMOUS:
        raise Unauthorized(f"{what} is required (X-API-Key or Authorization: Bearer)", field="X-API-Key")


async def require_caller(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    _known_caller(principal, "an API key")
    return principal


async def require_viewer(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    _known_caller(principal, "an admin, operator or viewer key")
    if not principal.reads_everything:
        raise Forbidden("this endpoint needs an admin, operator or viewer key", field="X-API-Key")
    return principal


async def require_operator(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    _known_caller(principal, "an admin or operator key")
    if not principal.operates:
        raise Forbidden("this endpoint needs an admin or operator key", field="X-API-Key")
    return principal


async def require_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    _known_caller(principal, "an admin API key")
    if not principal.is_admin:
        raise Forbidden("this endpoint needs an admin key", field="X-API-Key")
    return principal


MaybePrincipal = Annotated[Principal, Depends(get_principal)]
Caller = Annotated[Principal, Depends(require_caller)]  # anyone with a key (or a trusted network)
Viewer = Annotated[Principal, Depends(require_viewer)]  # reads of every device: admin, operator, viewer
Operator = Annotated[Principal, Depends(require_operator)]  # changes other than credentials: admin, operator
Admin = Annotated[Principal, Depends(require_admin)]  # credentials and keys
Reader = Viewer
Writer = Operator


def check_reads(principal: Principal, device_id: str) -> None:
    """Admin reads everything; a device (or gateway) reads only its own data."""
    if not principal.owns(device_id):
        raise Forbidden(f"this key may not read device {device_id!r}", field="device_id")
