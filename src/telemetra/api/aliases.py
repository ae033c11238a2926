"""Seed 003's dashboard read paths, as thin aliases over the same code as ``/api/v1``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from telemetra.api import devices as devices_api
from telemetra.api import telemetry as telemetry_api
from telemetra.api.deps import Admin, Caller, ServicesDep
from telemetra.api.fields import DeviceIdPath, KeysQuery, Offset, TextQuery
from telemetra.api.schemas import DeviceList, DevicePublic

router = APIRouter(prefix="/api", tags=["seed 003 aliases"], include_in_schema=False)


@router.get("/devices", response_model=DeviceList)
async def devices(
    services: ServicesDep,
    admin: Admin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> DeviceList:
    return await devices_api.list_devices(services, admin, limit=limit, offset=offset)


@router.get("/devices/{device_id}", response_model=DevicePublic)
@router.get("/devices/{device_id}/status", response_model=DevicePublic)
async def status(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> DevicePublic:
    return await devices_api.get_device(device_id, services, principal)


@router.get("/devices/{device_id}/readings")
async def readings(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    keys: KeysQuery = None,
    start: TextQuery = None,
    end: TextQuery = None,
    range_: Annotated[str | None, Query(alias="range", max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> dict[str, Any]:
    return await telemetry_api.history(
        device_id,
        services,
        principal,
        keys=keys,
        start=start,
        end=end,
        range_=range_,
        limit=limit,
        cursor=None,
        order="desc",
    )


@router.get("/devices/{device_id}/readings/latest")
async def readings_latest(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    return await telemetry_api.latest(device_id, services, principal, keys=None)
