"""Firmware: upload (streamed to disk), list, get, star, delete, download (iotmesh's paths and shapes)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from telemetra.api.deps import Admin, MaybePrincipal, ServicesDep
from telemetra.api.firmware_download import firmware_response
from telemetra.api.ota_present import firmware_public
from telemetra.api.ota_schemas import FirmwareDeleted, FirmwareId, FirmwareList, FirmwarePublic
from telemetra.domain.errors import Unauthorized, Unavailable
from telemetra.domain.principal import Principal, Role
from telemetra.ota.capability import Ota

router = APIRouter(tags=["firmware (OTA)"])


async def get_ota(services: ServicesDep) -> Ota:
    ota: Ota | None = services.ota
    if ota is None:
        raise Unavailable("OTA is not running in this process", field=None)
    return ota


OtaDep = Annotated[Ota, Depends(get_ota)]


def base_url(request: Request, ota: Ota) -> str:
    """Where devices download from: TELEMETRA_OTA_BASE_URL, else the address this request came to."""
    return ota.base_url or str(request.base_url).rstrip("/")


def check_download_key(ota: Ota, principal: Principal) -> None:
    if ota.require_key and principal.role is Role.ANONYMOUS:
        raise Unauthorized("an API key is required for OTA downloads (TELEMETRA_OTA_REQUIRE_KEY)", field="X-API-Key")


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "version"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string", "description": "device model (or iotmesh's node_type)"},
                        "node_type": {"type": "string"},
                        "version": {"type": "string", "description": "semantic version; v1.2.3 and 1.2 normalise"},
                        "hardware": {"type": "string", "default": "ESP32"},
                        "release_notes": {"type": "string"},
                        "notes": {"type": "string"},
                        "is_stable": {"type": "string", "enum": ["true", "false"]},
                    },
                }
            }
        },
    }
}


@router.post("/api/v1/firmware/upload", response_model=FirmwarePublic, openapi_extra=_UPLOAD_BODY)
@router.post("/api/v1/firmware", response_model=FirmwarePublic, openapi_extra=_UPLOAD_BODY)
async def upload_firmware(
    request: Request,
    ota: OtaDep,
    _: Admin,
    model: str | None = None,
    node_type: str | None = None,
    version: str | None = None,
    hardware: str | None = None,
    release_notes: str | None = None,
    is_stable: str | None = None,
) -> FirmwarePublic:
    """Multipart ``file`` plus ``model`` (or ``node_type``), ``version``, ``hardware``, ``release_notes``
    (or ``notes``) and ``is_stable``; the fields may also come in the query string. Streamed to disk with
    its size, SHA-256 and MD5 computed on the way; answers 200 (iotmesh's clients check for exactly that)."""
    query = {
        k: v
        for k, v in {
            "model": model,
            "node_type": node_type,
            "version": version,
            "hardware": hardware,
            "release_notes": release_notes,
            "is_stable": is_stable,
        }.items()
        if v is not None
    }
    length = request.headers.get("content-length")
    row = await ota.firmware.upload(
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length and length.isdigit() else None,
        query=query,
    )
    return firmware_public(row, base_url=base_url(request, ota), signature=ota.firmware.signature(row))


@router.get("/api/v1/firmware", response_model=FirmwareList)
async def list_firmware(
    request: Request,
    ota: OtaDep,
    _: Admin,
    model: str | None = None,
    node_type: str | None = None,
    version: str | None = None,
    hardware: str | None = None,
    is_stable: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> FirmwareList:
    """``{items, total}``, newest first (iotmesh's dashboard filters with ``?node_type=``)."""
    page = await ota.firmware.repo.page(
        model=model or node_type, version=version, hardware=hardware, is_stable=is_stable, limit=limit, offset=offset
    )
    url = base_url(request, ota)
    items = [firmware_public(r, base_url=url, signature=ota.firmware.signature(r)) for r in page.items]
    return FirmwareList(items=items, total=page.total)


@router.get("/api/v1/firmware/{firmware_id}", response_model=FirmwarePublic)
async def get_firmware(firmware_id: FirmwareId, request: Request, ota: OtaDep, _: Admin) -> FirmwarePublic:
    row = await ota.firmware.repo.get(firmware_id)
    return firmware_public(row, base_url=base_url(request, ota), signature=ota.firmware.signature(row))


@router.patch("/api/v1/firmware/{firmware_id}/stable", response_model=FirmwarePublic)
async def set_stable(
    firmware_id: FirmwareId, request: Request, ota: OtaDep, _: Admin, is_stable: bool | None = None
) -> FirmwarePublic:
    """Star or unstar (``?is_stable=true|false``); without the parameter the star toggles."""
    row = await ota.firmware.repo.set_stable(firmware_id, is_stable)
    return firmware_public(row, base_url=base_url(request, ota), signature=ota.firmware.signature(row))


@router.delete("/api/v1/firmware/{firmware_id}", response_model=FirmwareDeleted)
async def delete_firmware(firmware_id: FirmwareId, ota: OtaDep, _: Admin) -> FirmwareDeleted:
    """Deletes the image and its pending and finished update jobs; 409 while one of them is running."""
    row = await ota.firmware.delete(firmware_id)
    return FirmwareDeleted(message=f"Firmware {row.model} {row.version} deleted", filename=row.filename, id=row.id)


_DOWNLOAD_RESPONSES = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    206: {
        "description": "the requested byte range",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "If-None-Match matched the ETag"},
    400: {"description": "malformed Range"},
    416: {"description": "Range beyond the end of the file"},
}


@router.get(
    "/api/v1/firmware/{firmware_id}/download",
    response_class=Response,
    responses=_DOWNLOAD_RESPONSES,  # type: ignore[arg-type]
)
async def download_firmware(
    firmware_id: FirmwareId, request: Request, ota: OtaDep, principal: MaybePrincipal
) -> Response:
    """The image: ``Range`` (one range) → 206, ``If-None-Match`` → 304, ``ETag`` = its SHA-256, ``X-MD5``,
    ``X-Checksum-SHA256``; no key needed unless TELEMETRA_OTA_REQUIRE_KEY is on."""
    check_download_key(ota, principal)
    row = await ota.firmware.for_download(firmware_id)
    return firmware_response(request, row, ota.firmware.store.path_of(row.path), ota.firmware.signature(row))


@router.head("/api/v1/firmware/{firmware_id}/download", response_class=Response, include_in_schema=False)
async def download_firmware_head(
    firmware_id: FirmwareId, request: Request, ota: OtaDep, principal: MaybePrincipal
) -> Response:
    """HEAD: the download's headers (size, ETag, digests) without the body."""
    return await download_firmware(firmware_id, request, ota, principal)
