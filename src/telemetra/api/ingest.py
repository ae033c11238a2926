"""Device-side HTTP ingest (SPEC §3). The body is read raw and decoded with orjson: on this path
FastAPI's own body parsing costs more than the storage does (ARCHITECTURE.md); the schema is declared
separately for the OpenAPI page."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from telemetra.api.answers import NodeTelemetryAccepted
from telemetra.api.deps import Services, principal_of
from telemetra.api.fields import DeviceIdPath
from telemetra.api.openapi import KEY_OPTIONAL, KEY_REQUIRED, answers
from telemetra.api.present import reading_id
from telemetra.api.schemas import IngestAccepted, NodeTelemetry, TelemetryMessage
from telemetra.domain.errors import Forbidden, InvalidInput, MalformedPayload, PayloadTooLarge, Unauthorized
from telemetra.domain.principal import Principal, Role
from telemetra.domain.records import Batch
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.ingest.decode import decode_json
from telemetra.ingest.normalize import valid_device_id

router = APIRouter(tags=["ingest (device side)"])

# Served by api/fastpath.py ahead of FastAPI's routing; their endpoints take only the Request.
FAST_PATHS = ("/api/v1/ingest", "/api/v1/ingest/batch")


async def _caller(request: Request, *, anonymous_ok: bool = False) -> tuple[Services, Principal]:
    """Services and caller without FastAPI's dependency resolution: on these paths it cost more per
    request than normalising the payload does."""
    services: Services = request.app.state.services
    principal = await principal_of(request, services)
    if principal.role is Role.ANONYMOUS and not anonymous_ok:
        raise Unauthorized("an API key is required (X-API-Key or Authorization: Bearer)", field="X-API-Key")
    if principal.role is not Role.ANONYMOUS and not principal.writes_telemetry:
        raise Forbidden("a viewer key only reads; sending data needs another key", field="X-API-Key")
    return services, principal


def _body_schema(model: type[Any], *, array: bool = False, key_optional: bool = False) -> dict[str, Any]:
    """The body and the key (these endpoints read both themselves, so FastAPI cannot see them)."""
    schema = model.model_json_schema()
    if array:
        schema = {
            "oneOf": [
                {"type": "array", "items": schema},
                {"type": "object", "properties": {"readings": {"type": "array", "items": schema}}},
            ]
        }
    return {
        "security": KEY_OPTIONAL if key_optional else KEY_REQUIRED,
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
    }


async def _read_json(request: Request, services: Services) -> Any:
    limit = services.settings.max_payload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"payload is {declared} bytes; the limit is {limit}", field="body")
    if declared:
        try:
            body = await request.body()
        except ClientDisconnect:
            raise MalformedPayload("the client went away before its body arrived", field="body") from None
        return decode_json(body, max_bytes=limit)
    # Chunked upload without a length: stop reading as soon as it passes the limit.
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"payload is over the limit of {limit} bytes", field="body")
            chunks.append(chunk)
    except ClientDisconnect:
        raise MalformedPayload("the client went away before its body arrived", field="body") from None
    return decode_json(b"".join(chunks), max_bytes=limit)


def _accepted(batch: Batch, points: int) -> Response:
    """201, stored: Telemetra's counts, and telemetry_app's ``{id, device_id, timestamp, accepted}`` (its ESP32
    sample counts only a 201 as success) for the first reading, with every reading's id."""
    telemetry = batch.telemetry
    body: dict[str, Any] = {
        "status": "accepted",
        "accepted": True,
        "device_ids": sorted({t.device_id for t in telemetry}),
        "messages": len(telemetry),
        "points": points,
    }
    if telemetry:
        first = telemetry[0]
        body.update(id=reading_id(first.device_id, first.ts), device_id=first.device_id, timestamp=ms_to_iso(first.ts))
        if len(telemetry) > 1:
            body["ids"] = [reading_id(t.device_id, t.ts) for t in telemetry]
    return Response(orjson.dumps(body), status_code=201, media_type="application/json")


@router.post(
    "/api/v1/ingest",
    status_code=201,
    response_model=IngestAccepted,
    openapi_extra=_body_schema(TelemetryMessage, array=False),
)
async def ingest(request: Request) -> Response:
    """One telemetry message (Telemetra's or telemetry_app's shape) — or an array of them — with a device,
    gateway or fleet key."""
    return await _ingest(request, array_only=False)


@router.post(
    "/api/v1/ingest/batch",
    status_code=201,
    response_model=IngestAccepted,
    openapi_extra=_body_schema(TelemetryMessage, array=True),
)
async def ingest_batch(request: Request) -> Response:
    """A JSON array of messages, or ``{"readings": [...]}``; stored together, answered after commit."""
    return await _ingest(request, array_only=True)


async def _ingest(request: Request, *, array_only: bool) -> Response:
    services, principal = await _caller(request)
    doc = await _read_json(request, services)
    if array_only and not (isinstance(doc, list) or (isinstance(doc, dict) and isinstance(doc.get("readings"), list))):
        raise InvalidInput('expected a JSON array of messages or {"readings": [...]}', field="body")
    batch = await services.ingest.telemetry_batch(doc, principal)
    result = await services.queue.submit(batch, transport="http")
    return _accepted(batch, result.points)


def _node_principal(principal: Principal, services: Services) -> Principal:
    # (A viewer was refused in _caller.)
    if principal.role is Role.ANONYMOUS and not services.settings.allow_anonymous_nodes:
        raise Unauthorized(
            "an API key is required (anonymous node posts are off: TELEMETRA_ALLOW_ANONYMOUS_NODES)", field="X-API-Key"
        )
    return principal


async def _post_for_device(device_id: str, request: Request, services: Services, principal: Principal) -> Response:
    if not valid_device_id(device_id):
        raise InvalidInput(
            "device id must be 1-128 characters of letters, digits, '-', '_', '.', ':'", field="device_id"
        )
    if principal.role is Role.DEVICE and principal.device_id != device_id:
        raise Forbidden(f"this key belongs to device {principal.device_id!r}, not {device_id!r}", field="device_id")
    doc = await _read_json(request, services)
    batch = await services.ingest.node_batch(doc, principal, device_id)
    await services.queue.submit(batch, transport="http")
    body = {
        "status": "ok",
        "node_id": device_id,
        "device_id": device_id,
        "timestamp": ms_to_iso(now_ms()),
        "points": batch.point_count,
    }
    return Response(orjson.dumps(body), status_code=200, media_type="application/json")


@router.post(
    "/api/v1/devices/{device_id}/telemetry",
    openapi_extra=_body_schema(NodeTelemetry, key_optional=True),
    **answers(NodeTelemetryAccepted),
)
async def post_device_telemetry(device_id: DeviceIdPath, request: Request) -> Response:
    """A gateway (for its children) or an admin posts for a device; the iotmesh gateway's node shape is accepted."""
    services, principal = await _caller(request, anonymous_ok=True)
    return await _post_for_device(device_id, request, services, _node_principal(principal, services))


@router.post(
    "/api/v1/nodes/{device_id}/telemetry",
    openapi_extra=_body_schema(NodeTelemetry, key_optional=True),
    **answers(NodeTelemetryAccepted),
)
async def post_node_telemetry(device_id: DeviceIdPath, request: Request) -> Response:
    """The iotmesh gateway's path: ``{"name","uptime","heap_free","peer_count","role","firmware","state":{…}}``."""
    services, principal = await _caller(request, anonymous_ok=True)
    return await _post_for_device(device_id, request, services, _node_principal(principal, services))
