"""paku-iot's OTA service API (CLIENTS.md §4.6–§4.9) over Telemetra's firmware store and rollouts.

Who calls what: the GitHub workflow (releases without a key, upload, rollout, device discovery),
``test_ota_upload.sh`` (upload of ``test-<timestamp>`` builds, then ``/api/device/health``),
``check_esp8266_ota.sh`` (devices) and the edge devices (check and download, without a key).

How paku's words map onto Telemetra's:

- a *release* is a firmware row, keyed by ``(version, device_model)`` (hardware ``ESP32``). Versions are
  stored normalised (``domain.versions``); a version that is not semver (``test-1733100000``) is kept as
  the pre-release ``0.0.0-paku.<version>`` — valid semver, below every real release — and shown, looked up
  and downloaded under paku's own string;
- a *rollout* is a Telemetra rollout (``delivery=devices``) named by paku's unique ``name``: ``full`` /
  ``target_type: all`` targets the model's enabled devices (a ``…-heater`` / ``…-heater-emu`` build's
  also those that report the board's model, as the workflow's device discovery does),
  ``rollout_percentage`` < 100 the same stable SHA-256 share of them, ``target_filter.device_ids`` or
  ``target_device_ids`` exactly those devices;
- an *update status* is a device's state in a rollout: Telemetra's ``pending``/``notified`` read as
  ``pending``, ``downloading``, ``installing``, ``completed`` as ``success``, ``failed``/``timed_out`` as
  ``failed``; paku's ``downloaded`` and ``rolled_back`` are taken as ``installing`` and ``failed``.

Admin reads need a viewer key (or better), admin changes an operator key; the device side needs none
(``TELEMETRA_OTA_REQUIRE_KEY`` puts the download behind a key, as for Telemetra's own).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from telemetra.api.deps import MaybePrincipal, Operator, ServicesDep, Viewer
from telemetra.api.fields import DeviceIdField, DeviceIdPath, DeviceIdQuery, LongText, Name, text
from telemetra.api.firmware import _DOWNLOAD_RESPONSES, _UPLOAD_BODY, OtaDep, base_url, check_download_key
from telemetra.api.firmware_download import firmware_response
from telemetra.api.openapi import answers
from telemetra.domain.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized, Unavailable
from telemetra.domain.ota import (
    COMPLETED,
    DISTRIBUTING,
    DOWNLOADING,
    FAILED,
    INSTALLING,
    NOTIFIED,
    PAUSED,
    PENDING,
    TIMED_OUT,
)
from telemetra.domain.principal import Principal, Role
from telemetra.domain.timeutil import ms_to_iso
from telemetra.domain.versions import normalize_version, parse_version, same_version
from telemetra.ota.firmware import MAX_NOTES, check_model, parse_bool
from telemetra.ota.jobs import JobRequest, NodeReport, NoTargets
from telemetra.storage.schema import FirmwareRow, OtaNodeRow

router = APIRouter(tags=["paku-iot OTA service compatibility"])

PAKU_PREFIX = "0.0.0-paku."
# What paku's own service takes as a version besides semver: a slug (``test-1733100000``). It starts
# with a letter, so that a near-version (``1.2.x``, ``1.2.3.4``) is refused rather than misordered.
_SLUG = re.compile(r"^[A-Za-z][0-9A-Za-z.\-]*$")
MAX_PAKU_VERSION = 64 - len(PAKU_PREFIX)
# Telemetra's device states in paku's words (CLIENTS.md §4.9, §6.10).
PAKU_STATUS = {
    PENDING: "pending",
    NOTIFIED: "pending",
    DOWNLOADING: "downloading",
    INSTALLING: "installing",
    COMPLETED: "success",
    FAILED: "failed",
    TIMED_OUT: "failed",
}
PakuStatus = Literal["pending", "downloading", "downloaded", "installing", "success", "failed", "rolled_back"]
VersionQuery = Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z.+\-]+$")]
ModelQuery = Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


def stored_version(text_: str, field: str = "version") -> str:
    """paku's version as Telemetra stores it: normalised semver, or ``0.0.0-paku.<slug>``."""
    value = text_.strip()
    if parse_version(value) is not None:
        return normalize_version(value, field=field)
    if _SLUG.match(value) and len(value) <= MAX_PAKU_VERSION and parse_version(PAKU_PREFIX + value) is not None:
        return PAKU_PREFIX + value
    raise InvalidInput(
        f"{text_!r} is neither a semantic version (1.4.2, 1.4.2-3-gabcdef) nor a build name: a letter, then "
        f"letters, digits, '.' and '-' (test-1733100000; at most {MAX_PAKU_VERSION} characters, no all-digit "
        "part with a leading zero)",
        field=field,
    )


def family(model: str) -> str:
    """The board a build runs on, as paku's workflow finds its devices: the model without a trailing
    ``-heater`` or ``-heater-emu`` (devices report the board's model)."""
    for suffix in ("-heater-emu", "-heater"):
        if model.endswith(suffix) and len(model) > len(suffix):
            return model[: -len(suffix)]
    return model


def _also(model: str) -> tuple[str, ...]:
    board = family(model)
    return (board,) if board != model else ()


def paku_version(stored: str) -> str:
    return stored[len(PAKU_PREFIX) :] if stored.startswith(PAKU_PREFIX) else stored


def _download_path(row: FirmwareRow) -> str:
    # Host-relative, as paku's service answers (its devices prefix their OTA base URL).
    return f"/api/firmware/download/{paku_version(row.version)}?device_model={row.model}"


# paku's shapes, for the OpenAPI document (each answer is built as a dict; see ``api.openapi.answers``).
class PakuRelease(BaseModel):
    version: str
    device_model: str
    file_size: int
    checksum_sha256: str
    is_signed: bool
    created_at: str
    release_notes: str | None
    firmware_id: int
    stored_version: str = Field(description="the version as Telemetra stores it")
    download_url: str


class PakuReleases(BaseModel):
    releases: list[PakuRelease]


class PakuUploaded(BaseModel):
    status: str
    message: str
    version: str
    file_size: int
    checksum_sha256: str
    device_model: str
    firmware_id: int


class PakuRolloutCreated(BaseModel):
    status: str
    message: str
    rollout_id: int | None = Field(description="null when no enabled device matched: nothing to roll out")
    devices: int
    rollout_status: str | None


class PakuDevice(BaseModel):
    device_id: str
    device_model: str | None
    current_firmware_version: str | None
    last_seen: str | None
    created_at: str


class PakuDevices(BaseModel):
    devices: list[PakuDevice]


class PakuUpdate(BaseModel):
    device_id: str
    firmware_version: str
    status: str
    error_message: str | None
    progress_percent: int | None
    started_at: str | None
    completed_at: str | None
    reported_at: str | None
    rollout_id: int
    telemetra_status: str


class PakuUpdates(BaseModel):
    updates: list[PakuUpdate]


class PakuCheck(BaseModel):
    update_available: bool
    current_version: str
    latest_version: str | None
    download_url: str | None
    file_size: int | None
    checksum_sha256: str | None
    release_notes: str | None
    rollout_id: int | None = None


class PakuStatusRecorded(BaseModel):
    status: str
    message: str
    rollout_id: int
    telemetra_status: str
    retry: bool


class PakuHealth(BaseModel):
    status: str
    service: str


def release_out(row: FirmwareRow, *, signed: bool) -> dict[str, Any]:
    return {
        "version": paku_version(row.version),
        "device_model": row.model,
        "file_size": row.size_bytes,
        "checksum_sha256": row.sha256,
        "is_signed": signed,
        "created_at": ms_to_iso(row.created_at),
        "release_notes": row.release_notes,
        # Telemetra's own beside paku's
        "firmware_id": row.id,
        "stored_version": row.version,
        "download_url": _download_path(row),
    }


# -- admin: firmware ----------------------------------------------------------------------------------


@router.post("/api/admin/firmware/upload", openapi_extra=_UPLOAD_BODY, **answers(PakuUploaded))
async def upload(
    request: Request,
    ota: OtaDep,
    _: Operator,
    version: VersionQuery,
    device_model: ModelQuery,
    is_signed: Annotated[str, Query(max_length=8)] = "false",
    release_notes: Annotated[str | None, Query(max_length=MAX_NOTES)] = None,
) -> dict[str, Any]:
    """Metadata in the query string, only ``file`` in the multipart body; exactly 200 with
    ``{status:"ok", message, version, file_size, checksum_sha256}``. A duplicate ``(version,
    device_model)`` is 409 (paku's service answered 500)."""
    parse_bool(is_signed, "is_signed")
    model = check_model(device_model, "device_model")
    stored = stored_version(version)
    query = {"model": model, "version": stored}
    if release_notes:
        if "\x00" in release_notes:
            raise InvalidInput("release_notes must not contain NUL characters", field="release_notes")
        query["release_notes"] = release_notes
    length = request.headers.get("content-length")
    row = await ota.firmware.upload(
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=int(length) if length and length.isdigit() else None,
        query=query,
    )
    return {
        "status": "ok",
        "message": f"Firmware {paku_version(row.version)} for {row.model} uploaded",
        "version": paku_version(row.version),
        "file_size": row.size_bytes,
        "checksum_sha256": row.sha256,
        "device_model": row.model,
        "firmware_id": row.id,
    }


@router.get("/api/admin/firmware/releases", **answers(PakuReleases))
async def releases(
    ota: OtaDep,
    _: Viewer,
    device_model: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> dict[str, Any]:
    """``{releases:[{version, device_model, file_size, checksum_sha256, is_signed, created_at,
    release_notes}]}``, newest upload first. Without a key: 401 (the workflow reads that as "not found")."""
    page = await ota.firmware.repo.page(model=device_model, limit=limit)
    signed = ota.signer is not None
    return {"releases": [release_out(r, signed=signed) for r in page.items]}


# -- admin: rollouts ----------------------------------------------------------------------------------


class PakuTargetFilter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    device_ids: list[DeviceIdField] | None = Field(None, max_length=100_000)


class RolloutCreate(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "name": "heater-2.1.0",
                    "firmware_version": "2.1.0",
                    "device_model": "esp32-heater",
                    "target_type": "all",
                }
            ]
        },
    )
    name: Name = Field(..., min_length=1)
    firmware_version: Annotated[str, text(64)] = Field(..., min_length=1)
    device_model: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
    target_type: Literal["all", "group", "canary", "specific"] = "all"
    target_filter: PakuTargetFilter | None = None
    target_device_ids: list[DeviceIdField] | None = Field(None, max_length=100_000)
    rollout_percentage: int = Field(100, ge=0, le=100)
    is_active: bool = True


@router.post("/api/admin/rollout/create", **answers(PakuRolloutCreated))
async def create_rollout(body: RolloutCreate, request: Request, ota: OtaDep, _: Operator) -> dict[str, Any]:
    """A Telemetra rollout under paku's unique ``name`` (409 when taken); exactly 200 with
    ``{status:"ok", message}``. A rollout that matches no enabled device yet is answered 200 with
    ``rollout_id: null`` and ``devices: 0``: there is nothing to roll out (paku's workflow creates the
    rollout before it looks for devices)."""
    model = check_model(body.device_model, "device_model")
    firmware = await ota.firmware.repo.by_version(stored_version(body.firmware_version, "firmware_version"), model)
    if firmware is None:
        raise NotFound(
            f"no firmware {body.firmware_version!r} for {model!r}: upload it first", field="firmware_version"
        )
    if await ota.jobs_repo.named(body.name) is not None:
        raise Conflict(f"a rollout named {body.name!r} already exists", field="name")
    ids = body.target_device_ids
    if body.target_filter is not None and body.target_filter.device_ids is not None:
        ids = body.target_filter.device_ids
    if body.target_type == "specific" and not ids:
        raise InvalidInput("target_type 'specific' needs target_filter.device_ids", field="target_filter.device_ids")
    if body.target_type == "group" and not ids:
        raise InvalidInput(
            "group targets are not kept here: list the devices in target_filter.device_ids", field="target_filter"
        )
    percentage = body.rollout_percentage if body.rollout_percentage < 100 else None
    if percentage == 0:
        return _nothing(body.name, "rollout_percentage is 0")
    job_request = JobRequest(
        firmware_id=firmware.id,
        name=body.name,
        target_model=model if ids is None else None,
        target_device_ids=list(dict.fromkeys(ids)) if ids else None,
        also_models=_also(model),
        target_percentage=percentage,
    )
    try:
        job = await ota.jobs.create(job_request, base_url=base_url(request, ota))
    except NoTargets as exc:
        return _nothing(body.name, exc.reason)
    if not body.is_active:
        job = await ota.jobs.pause(job.id, reason="created inactive (is_active: false)")
    ota.scheduler.wake()
    devices = sum((await ota.jobs_repo.counts([job.id]))[job.id].total().values())
    return {
        "status": "ok",
        "message": f"Rollout {body.name} created for {devices} device(s)",
        "rollout_id": job.id,
        "devices": devices,
        "rollout_status": job.status,
    }


def _nothing(name: str, why: str) -> dict[str, Any]:
    return {
        "status": "ok",
        "message": f"Rollout {name}: no device to update ({why})",
        "rollout_id": None,
        "devices": 0,
        "rollout_status": None,
    }


# -- admin: devices and update status ----------------------------------------------------------------


@router.get("/api/admin/devices", **answers(PakuDevices))
async def admin_devices(
    services: ServicesDep,
    _: Viewer,
    device_model: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """``{devices:[{device_id, device_model, current_firmware_version, last_seen, created_at}]}``, most
    recently seen first (never seen last). ``last_seen`` is UTC ``YYYY-MM-DDTHH:MM:SS.mmmZ`` or null: the
    workflow compares it as a string with its own 7-days-ago."""
    page = await services.devices.list(model=device_model, limit=limit, recent_first=True)
    return {
        "devices": [
            {
                "device_id": d.id,
                "device_model": d.model,
                "current_firmware_version": d.fw_version,
                "last_seen": ms_to_iso(d.last_seen_at) if d.last_seen_at is not None else None,
                "created_at": ms_to_iso(d.created_at),
            }
            for d in page.devices
        ]
    }


def update_out(node: OtaNodeRow, version: str) -> dict[str, Any]:
    return {
        "device_id": node.node_id,
        "firmware_version": paku_version(version),
        "status": PAKU_STATUS.get(node.status, node.status),
        "error_message": node.error_message,
        "progress_percent": node.progress,
        "started_at": ms_to_iso(node.notified_at or node.started_at),
        "completed_at": ms_to_iso(node.completed_at) if node.completed_at is not None else None,
        "reported_at": ms_to_iso(node.updated_at),
        # Telemetra's own beside paku's
        "rollout_id": node.job_id,
        "telemetra_status": node.status,
    }


@router.get("/api/admin/update-status", **answers(PakuUpdates))
async def admin_update_status(
    ota: OtaDep,
    _: Viewer,
    device_id: DeviceIdQuery = None,
    firmware_version: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z.+\-]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """``{updates:[{device_id, firmware_version, status, error_message, progress_percent, started_at,
    completed_at, reported_at}]}`` from the rollouts' device states, most recent first."""
    version = stored_version(firmware_version, "firmware_version") if firmware_version is not None else None
    rows = await ota.jobs_repo.device_updates(device_id=device_id, version=version, limit=limit)
    return {"updates": [update_out(node, v) for node, v in rows]}


# -- device side --------------------------------------------------------------------------------------


@router.get("/api/firmware/check", **answers(PakuCheck))
async def check(
    ota: OtaDep,
    principal: MaybePrincipal,
    device_id: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")],
    device_model: ModelQuery,
    current_version: Annotated[str, Query(min_length=1, max_length=64, pattern=r"^[^\x00]*$")],
) -> dict[str, Any]:
    """``{update_available, current_version, latest_version, download_url, file_size, checksum_sha256,
    release_notes}``. An update is offered when a running (not paused) rollout lists the device, it has
    not finished it, and its target differs from ``current_version``. ``latest_version`` is the newest
    upload for the model. No key needed."""
    check_download_key(ota, principal)
    newest = (await ota.firmware.repo.page(model=device_model, limit=1)).items
    answer: dict[str, Any] = {
        "update_available": False,
        "current_version": current_version,
        "latest_version": paku_version(newest[0].version) if newest else None,
        "download_url": None,
        "file_size": None,
        "checksum_sha256": None,
        "release_notes": None,
    }
    for job in await ota.jobs_repo.jobs_of_device(device_id, statuses=(DISTRIBUTING,)):
        node = await ota.jobs_repo.node(job.id, device_id)
        if node is None or node.status in (COMPLETED, FAILED, TIMED_OUT):
            continue
        try:
            firmware = await ota.firmware.repo.get(job.firmware_id)
        except NotFound:
            continue
        if device_model not in (firmware.model, family(firmware.model)):
            continue
        if same_version(paku_version(firmware.version), current_version):
            continue
        answer.update(
            update_available=True,
            latest_version=paku_version(firmware.version),
            download_url=_download_path(firmware),
            file_size=firmware.size_bytes,
            checksum_sha256=firmware.sha256,
            release_notes=firmware.release_notes,
            rollout_id=job.id,
        )
        break
    return answer


async def _download(
    version: str, request: Request, ota: OtaDep, principal: Principal, device_model: str | None
) -> Response:
    check_download_key(ota, principal)
    try:
        stored = stored_version(version)
    except InvalidInput:
        raise NotFound(f"no firmware {version!r}", field="version") from None
    row = await ota.firmware.repo.by_version(stored, device_model)
    if row is None:
        where = f" for {device_model!r}" if device_model else ""
        raise NotFound(f"no firmware {version!r}{where}", field="version")
    row = await ota.firmware.for_download(row.id)
    response = firmware_response(request, row, ota.firmware.store.path_of(row.path), ota.firmware.signature(row))
    response.headers["X-Firmware-Version"] = paku_version(row.version)
    return response


@router.get(
    "/api/firmware/download/{version}",
    response_class=Response,
    responses=_DOWNLOAD_RESPONSES,  # type: ignore[arg-type]
)
async def download(
    version: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[^\x00/]*$")],
    request: Request,
    ota: OtaDep,
    principal: MaybePrincipal,
    device_model: Annotated[str | None, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")] = None,
) -> Response:
    """The image by paku's version (and model): ``X-Firmware-Version``, ``X-Checksum-SHA256``,
    ``Content-Length``, ``ETag``; ``Range`` → 206 and ``If-None-Match`` → 304 as for Telemetra's own
    download. No key needed unless TELEMETRA_OTA_REQUIRE_KEY is on."""
    return await _download(version, request, ota, principal, device_model)


@router.head("/api/firmware/download/{version}", response_class=Response, include_in_schema=False)
async def download_head(
    version: str,
    request: Request,
    ota: OtaDep,
    principal: MaybePrincipal,
    device_model: Annotated[str | None, Query(max_length=128)] = None,
) -> Response:
    return await _download(version, request, ota, principal, device_model)


class UpdateStatusBody(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [{"firmware_version": "2.1.0", "status": "downloading", "progress_percent": 40}]
        },
    )
    device_id: DeviceIdField | None = None
    firmware_version: Annotated[str, text(64)] = Field(..., min_length=1)
    status: PakuStatus
    error_message: LongText | None = None
    progress_percent: int | None = Field(None, ge=0, le=100)


@router.post("/api/device/{device_id}/update-status", **answers(PakuStatusRecorded))
async def update_status(
    device_id: DeviceIdPath, body: UpdateStatusBody, ota: OtaDep, principal: MaybePrincipal
) -> dict[str, Any]:
    """A device's progress in paku's words, recorded on its rollout of that firmware version: by the
    device itself (its key), a fleet key, an operator or an admin. 404 when no running rollout of that
    version lists the device."""
    _may_report(principal, device_id)
    if body.device_id is not None and body.device_id != device_id:
        raise InvalidInput(f"body device_id {body.device_id!r} is not the path's {device_id!r}", field="device_id")
    version = stored_version(body.firmware_version, "firmware_version")
    jobs = await ota.jobs_repo.jobs_of_device(device_id, statuses=(DISTRIBUTING, PAUSED))
    matching = []
    for job in jobs:
        try:
            firmware = await ota.firmware.repo.get(job.firmware_id)
        except NotFound:
            continue
        if same_version(firmware.version, version):
            matching.append(job)
    if not matching:
        raise NotFound(
            f"device {device_id!r} is in no running rollout of firmware {body.firmware_version!r}",
            field="firmware_version",
        )
    report = NodeReport(status=body.status, progress=body.progress_percent, error_message=body.error_message)
    outcome = await ota.jobs.report(matching[0].id, device_id, report, device_only=None)
    return {
        "status": "ok",
        "message": f"Update status for {device_id} recorded: {body.status}",
        "rollout_id": matching[0].id,
        "telemetra_status": outcome.node.status,
        "retry": outcome.retry,
    }


def _may_report(principal: Principal, device_id: str) -> None:
    if principal.role is Role.ANONYMOUS:
        raise Unauthorized("an API key is required (X-API-Key)", field="X-API-Key")
    if principal.role in (Role.ADMIN, Role.OPERATOR, Role.FLEET):
        return
    if principal.role is Role.DEVICE and principal.device_id == device_id:
        return
    raise Forbidden(f"this key may not report for device {device_id!r}", field="X-API-Key")


@router.get("/api/device/health", **answers(PakuHealth))
async def device_health(ota: OtaDep) -> dict[str, Any]:
    """``{status:"healthy"}`` while OTA runs in this process (503 otherwise)."""
    if not ota.alive:
        raise Unavailable("the OTA scheduler is not running", field=None)
    return {"status": "healthy", "service": "telemetra-ota"}
