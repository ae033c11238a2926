"""Device registry (admin): create with credentials shown once, list, get, update, delete with its data,
rotate credentials, claim codes; and the unauthenticated claim-code exchange for devices."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from telemetra.api.deps import Admin, Caller, Operator, ServicesDep, Viewer, check_reads
from telemetra.api.fields import DeviceIdPath, Offset, TextQuery
from telemetra.api.present import device_public, with_credentials
from telemetra.api.schemas import (
    ClaimCode,
    ClaimCodes,
    ClaimCodesCreate,
    ClaimRequest,
    DeviceCreate,
    DeviceList,
    DevicePublic,
    DeviceUpdate,
    DeviceWithCredentials,
)
from telemetra.domain.errors import InvalidInput
from telemetra.domain.ids import reserved_reason
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.ingest.normalize import valid_device_id
from telemetra.storage.devices import SORTABLE

router = APIRouter(prefix="/api/v1", tags=["devices"])

_SORT_FIELDS = ("id", "name", "model", "kind", "fw_version", "last_seen_at", "created_at")
Sort = Literal[
    "id", "name", "model", "kind", "fw_version", "last_seen_at", "created_at",
    "-id", "-name", "-model", "-kind", "-fw_version", "-last_seen_at", "-created_at",
]  # fmt: skip
assert set(_SORT_FIELDS) == set(SORTABLE)


@router.post("/devices", status_code=201, response_model=DeviceWithCredentials)
async def create_device(body: DeviceCreate, services: ServicesDep, _: Admin) -> DeviceWithCredentials:
    """Register a device. The answer carries its secret once; only a hash is kept."""
    device_id = body.id or f"dev-{secrets.token_hex(6)}"
    now = now_ms()
    device, secret = await services.devices.create(
        device_id,
        now_ms=now,
        name=body.name,
        model=body.model,
        kind=body.kind,
        parent_id=body.parent_id,
        notes=body.notes,
        meta=body.metadata,
    )
    assert secret is not None
    await services.registry_changed(device_id, "created", secret=secret)
    return with_credentials(device, secret, now=now, offline_after_s=services.settings.offline_after_s)


@router.get("/devices", response_model=DeviceList)
async def list_devices(
    services: ServicesDep,
    _: Viewer,
    model: TextQuery = None,
    online: bool | None = None,
    search: TextQuery = None,
    kind: Literal["device", "gateway"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    sort: Annotated[Sort | None, Query(description="a field, `-` first for descending; default id")] = None,
) -> DeviceList:
    now = now_ms()
    page = await services.devices.list(
        model=model,
        online=online,
        search=search,
        kind=kind,
        limit=limit,
        offset=offset,
        now_ms=now,
        offline_after_s=services.settings.offline_after_s,
        sort=sort,
    )
    return DeviceList(
        devices=[device_public(d, now=now, offline_after_s=services.settings.offline_after_s) for d in page.devices],
        total=page.total,
        limit=limit,
        offset=offset,
    )


@router.get("/devices/{device_id}", response_model=DevicePublic)
async def get_device(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> DevicePublic:
    check_reads(principal, device_id)
    device = await services.devices.get(device_id)
    return device_public(device, now=now_ms(), offline_after_s=services.settings.offline_after_s)


@router.patch("/devices/{device_id}", response_model=DevicePublic)
@router.put("/devices/{device_id}", response_model=DevicePublic, include_in_schema=False)
async def update_device(
    device_id: DeviceIdPath, body: DeviceUpdate, services: ServicesDep, _: Operator
) -> DevicePublic:
    fields = body.model_dump(exclude_unset=True)
    if "metadata" in fields:
        fields["meta"] = fields.pop("metadata")
    now = now_ms()
    device = await services.devices.update(device_id, now_ms=now, **fields)
    # The word the database's trigger uses for the same change (a disable or enable wins over an edit).
    change = ("disabled" if device.disabled else "enabled") if "disabled" in fields else "updated"
    await services.registry_changed(device_id, change)
    return device_public(device, now=now, offline_after_s=services.settings.offline_after_s)


@router.delete("/devices/{device_id}", status_code=204)
async def delete_device(device_id: DeviceIdPath, services: ServicesDep, _: Operator) -> None:
    """Delete the device with all its telemetry, state and events."""
    await services.devices.delete(device_id)
    await services.registry_changed(device_id, "deleted")


@router.post("/devices/{device_id}/rotate", response_model=DeviceWithCredentials)
@router.post("/devices/{device_id}/credentials", response_model=DeviceWithCredentials, include_in_schema=False)
async def rotate_credentials(device_id: DeviceIdPath, services: ServicesDep, _: Admin) -> DeviceWithCredentials:
    """New secret for HTTP and MQTT; the old one stops working at once."""
    now = now_ms()
    device, secret = await services.devices.rotate(device_id, now_ms=now)
    await services.registry_changed(device_id, "rotated", secret=secret)
    return with_credentials(device, secret, now=now, offline_after_s=services.settings.offline_after_s)


@router.post("/claim-codes", status_code=201, response_model=ClaimCodes)
async def create_claim_codes(body: ClaimCodesCreate, services: ServicesDep, _: Admin) -> ClaimCodes:
    """Devices without credentials, each with a one-time, expiring code it exchanges for them."""
    if (body.count is None) == (body.device_ids is None):
        raise InvalidInput("give either count or device_ids", field="count")
    device_ids = body.device_ids or [f"{body.prefix}-{secrets.token_hex(5)}" for _ in range(body.count or 0)]
    bad = [d for d in device_ids if not valid_device_id(d)]
    if bad:
        raise InvalidInput(f"invalid device id {bad[0]!r}", field="device_ids")
    reserved = [reason for reason in map(reserved_reason, device_ids) if reason]
    if reserved:
        raise InvalidInput(reserved[0], field="device_ids")
    ttl = body.ttl_s or services.settings.claim_code_ttl_s
    now = now_ms()
    codes = await services.devices.create_claim_codes(
        device_ids, now_ms=now, ttl_s=ttl, model=body.model, kind=body.kind
    )
    expires = ms_to_iso(now + ttl * 1000)
    return ClaimCodes(claim_codes=[ClaimCode(device_id=d, claim_code=c, expires_at=expires) for d, c in codes])


@router.post("/provision/claim", response_model=DeviceWithCredentials, tags=["ingest (device side)"])
async def claim(body: ClaimRequest, services: ServicesDep) -> DeviceWithCredentials:
    """Unauthenticated: a device trades its claim code, once, for its credentials."""
    now = now_ms()
    device, secret = await services.devices.claim(body.claim_code, now_ms=now)
    await services.registry_changed(device.id, "claimed", secret=secret)
    return with_credentials(device, secret, now=now, offline_after_s=services.settings.offline_after_s)
