"""OTA update jobs (iotmesh's gateway flow and Telemetra's rollouts), the manifest and the public key.

Who may call what: admins everything; a gateway (or fleet key) the gateway flow — poll, start, report
node progress, complete, fail; a device only its own progress; without a key, the gateway flow only when
TELEMETRA_ALLOW_ANONYMOUS_NODES is on (iotmesh gateways send no key by default). The manifest, the
downloads and the public key need no key unless TELEMETRA_OTA_REQUIRE_KEY is on.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request

from telemetra.api.deps import Admin, MaybePrincipal, ServicesDep
from telemetra.api.firmware import OtaDep, base_url, check_download_key
from telemetra.api.ota_present import manifest_entry, pending_update, update_detail, update_job
from telemetra.api.ota_schemas import (
    MAX_ID,
    Manifest,
    PendingUpdate,
    ProgressAnswer,
    ProgressBody,
    PublicKey,
    TransitionAnswer,
    UpdateCreate,
    UpdateDeleted,
    UpdateDetail,
    UpdateId,
    UpdateJob,
)
from telemetra.domain.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from telemetra.domain.ids import DEVICE_ID_PATTERN
from telemetra.domain.ota import DEVICES, check_waves, exponential_waves
from telemetra.domain.principal import Principal, Role
from telemetra.ota import manifest
from telemetra.ota.firmware import check_model
from telemetra.ota.jobs import JobRequest, NodeReport, TargetFilter

router = APIRouter(tags=["OTA updates"])

_NODE_ID = re.compile(DEVICE_ID_PATTERN)


def _gateway(principal: Principal, services: ServicesDep) -> Principal:
    if principal.role is Role.ANONYMOUS and not services.settings.allow_anonymous_nodes:
        raise Unauthorized(
            "a gateway or admin key is required (or TELEMETRA_ALLOW_ANONYMOUS_NODES for key-less gateways)",
            field="X-API-Key",
        )
    if principal.role is Role.DEVICE:
        raise Forbidden("this endpoint is for gateways and admins", field="X-API-Key")
    return principal


def _holder(principal: Principal, request: Request) -> str:
    """Who holds a gateway lease: the gateway's device id, else (admin, fleet key, no key) its address."""
    if principal.device_id is not None:
        return f"device:{principal.device_id}"
    host = request.client.host if request.client else "unknown"
    return f"addr:{host}"


async def _job_out(ota: OtaDep, job_id: int, *, nodes_limit: int | None = None) -> UpdateDetail | UpdateJob:
    job = await ota.jobs_repo.get(job_id)
    try:
        firmware = await ota.firmware.repo.get(job.firmware_id)
    except NotFound:
        firmware = None
    counts = (await ota.jobs_repo.counts([job.id])).get(job.id)
    if nodes_limit is None:
        return update_job(job, firmware, counts)
    return update_detail(job, firmware, counts, await ota.jobs_repo.nodes(job.id, limit=nodes_limit))


# -- jobs ---------------------------------------------------------------------------------------------


@router.post("/api/v1/ota/updates", response_model=UpdateJob)
async def create_update(body: UpdateCreate, request: Request, ota: OtaDep, _: Admin) -> UpdateJob:
    """iotmesh's job, or — with ``target_model``, ``target_device_ids``, ``target_filter``,
    ``target_percentage`` or ``waves`` — a rollout that starts at once. Answers 200 (iotmesh checks)."""
    if isinstance(body.waves, list):
        waves: list[int] | None = check_waves(body.waves)
    elif body.waves is not None:
        waves = exponential_waves(body.waves.start_percent, body.waves.factor)
    else:
        waves = None
    flt = body.target_filter
    request_ = JobRequest(
        firmware_id=body.firmware_id,
        target_node_id=body.target_node_id,
        target_node_type=body.target_node_type,
        force_update=body.force_update,
        name=body.name,
        target_model=check_model(body.target_model, "target_model") if body.target_model is not None else None,
        target_device_ids=body.target_device_ids,
        target_filter=TargetFilter(**flt.model_dump()) if flt is not None else None,
        target_percentage=body.target_percentage,
        waves=waves,
        rate_per_minute=body.rate_per_minute,
        device_timeout_s=body.device_timeout_s,
        max_retries=body.max_retries,
        pause_failure_percent=body.pause_failure_percent,
        pause_min_finished=body.pause_min_finished,
    )
    job = await ota.jobs.create(request_, base_url=base_url(request, ota))
    if job.delivery == DEVICES:
        ota.scheduler.wake()
    out = await _job_out(ota, job.id)
    assert isinstance(out, UpdateJob)
    return out


@router.get("/api/v1/ota/updates", response_model=list[UpdateJob])
async def list_updates(
    ota: OtaDep,
    _: Admin,
    status: str | None = None,
    firmware_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> list[UpdateJob]:
    """A bare array, newest first (iotmesh's dashboard calls ``.filter`` on it)."""
    jobs = await ota.jobs_repo.recent(status=status, firmware_id=firmware_id, limit=limit, offset=offset)
    counts = await ota.jobs_repo.counts([j.id for j in jobs])
    firmware = {}
    for fw_id in {j.firmware_id for j in jobs}:
        try:
            firmware[fw_id] = await ota.firmware.repo.get(fw_id)
        except NotFound:
            continue
    return [update_job(j, firmware.get(j.firmware_id), counts.get(j.id)) for j in jobs]


@router.get("/api/v1/ota/updates/pending", response_model=list[PendingUpdate])
async def pending_updates(
    request: Request, ota: OtaDep, services: ServicesDep, principal: MaybePrincipal
) -> list[PendingUpdate]:
    """The gateway's poll: a bare array with at most the oldest pending job — leased to this gateway,
    so a second gateway polling at the same time does not get it too."""
    caller = _gateway(principal, services)
    url = base_url(request, ota)
    return [pending_update(j, f, base_url=url) for j, f in await ota.jobs.pending(_holder(caller, request))]


@router.get("/api/v1/ota/updates/{update_id}", response_model=UpdateDetail)
async def get_update(
    update_id: UpdateId, ota: OtaDep, _: Admin, nodes_limit: Annotated[int, Query(ge=0, le=100_000)] = 10_000
) -> UpdateDetail:
    """The job with ``waves`` and its devices as iotmesh's ``nodes[]``."""
    out = await _job_out(ota, update_id, nodes_limit=nodes_limit)
    assert isinstance(out, UpdateDetail)
    return out


@router.delete("/api/v1/ota/updates/{update_id}", response_model=UpdateDeleted)
async def delete_update(update_id: UpdateId, ota: OtaDep, _: Admin) -> UpdateDeleted:
    """Removes a pending or finished job; a running one must be cancelled first (409)."""
    job = await ota.jobs.delete(update_id)
    return UpdateDeleted(message=f"Update {job.id} deleted", update_id=job.id)


@router.post("/api/v1/ota/updates/{update_id}/start", response_model=TransitionAnswer)
async def start_update(
    update_id: UpdateId, request: Request, ota: OtaDep, services: ServicesDep, principal: MaybePrincipal
) -> TransitionAnswer:
    """pending → distributing (by the gateway that holds the job's lease, or an admin)."""
    caller = _gateway(principal, services)
    job = await ota.jobs.start(update_id, holder=_holder(caller, request), privileged=caller.is_admin)
    return TransitionAnswer(status=job.status, update_id=job.id)  # type: ignore[arg-type]


@router.post("/api/v1/ota/updates/{update_id}/complete", response_model=TransitionAnswer)
async def complete_update(
    update_id: UpdateId, ota: OtaDep, services: ServicesDep, principal: MaybePrincipal
) -> TransitionAnswer:
    """The job is done (reported by its gateway or an admin)."""
    _gateway(principal, services)
    job = await ota.jobs.complete(update_id)
    return TransitionAnswer(status=job.status, update_id=job.id)  # type: ignore[arg-type]


@router.post("/api/v1/ota/updates/{update_id}/fail", response_model=TransitionAnswer)
async def fail_update(
    update_id: UpdateId,
    ota: OtaDep,
    services: ServicesDep,
    principal: MaybePrincipal,
    error_message: Annotated[str | None, Query(max_length=1000)] = None,
) -> TransitionAnswer:
    """The job failed (reported by its gateway or an admin; the message is kept in ``error_message``)."""
    _gateway(principal, services)
    job = await ota.jobs.fail(update_id, error_message)
    return TransitionAnswer(status=job.status, update_id=job.id, error=error_message)  # type: ignore[arg-type]


@router.post("/api/v1/ota/updates/{update_id}/node/{node_id}/progress", response_model=ProgressAnswer)
async def node_progress(
    update_id: UpdateId,
    node_id: str,
    ota: OtaDep,
    services: ServicesDep,
    principal: MaybePrincipal,
    body: Annotated[ProgressBody | None, Body()] = None,
) -> ProgressAnswer:
    """A node's (or device's) progress: by its gateway, an admin, or the device itself with its own key."""
    if not _valid_node_id(node_id):
        raise InvalidInput(f"{node_id!r} is not a device id", field="node_id")
    device_only = None
    if principal.role is Role.DEVICE:
        device_only = principal.device_id
    else:
        _gateway(principal, services)
    body = body or ProgressBody.model_validate({})
    report = NodeReport(
        status=body.status,
        current_part=body.current_part,
        total_parts=body.total_parts,
        progress=body.progress,
        error_message=body.error_message or body.error,
    )
    outcome = await ota.jobs.report(update_id, node_id, report, device_only=device_only)
    node = outcome.node
    total = node.total_parts if node.total_parts is not None else "?"
    return ProgressAnswer(
        node_id=node.node_id, progress=f"{node.current_part or 0}/{total}", node_status=node.status, retry=outcome.retry
    )


def _valid_node_id(node_id: str) -> bool:
    return _NODE_ID.match(node_id) is not None


@router.post("/api/v1/ota/updates/{update_id}/pause", response_model=UpdateJob)
async def pause_update(update_id: UpdateId, ota: OtaDep, _: Admin) -> UpdateJob:
    """distributing → paused: no device is notified until resumed (devices already told carry on)."""
    await ota.jobs.pause(update_id)
    out = await _job_out(ota, update_id)
    assert isinstance(out, UpdateJob)
    return out


@router.post("/api/v1/ota/updates/{update_id}/resume", response_model=UpdateJob)
async def resume_update(update_id: UpdateId, ota: OtaDep, _: Admin) -> UpdateJob:
    """paused → distributing; the pause criteria count failures from now on."""
    await ota.jobs.resume(update_id)
    ota.scheduler.wake()
    out = await _job_out(ota, update_id)
    assert isinstance(out, UpdateJob)
    return out


@router.post("/api/v1/ota/updates/{update_id}/cancel", response_model=UpdateJob)
async def cancel_update(update_id: UpdateId, ota: OtaDep, _: Admin) -> UpdateJob:
    """→ cancelled: no more notifications; those still queued for offline devices are withdrawn."""
    await ota.jobs.cancel(update_id)
    out = await _job_out(ota, update_id)
    assert isinstance(out, UpdateJob)
    return out


# -- device side: manifest and public key ------------------------------------------------------------


@router.get("/ota/manifest.json", response_model=Manifest, tags=["OTA (device side)"])
async def ota_manifest(
    request: Request,
    ota: OtaDep,
    principal: MaybePrincipal,
    model: Annotated[str | None, Query(max_length=128)] = None,
    current: Annotated[str | None, Query(max_length=64)] = None,
    prerelease: bool = False,
    stable: bool = False,
    hardware: Annotated[str | None, Query(max_length=32)] = None,
) -> Manifest:
    """paku's manifest. With ``model`` and ``current``: only the newest version newer than ``current``
    (semantic-version order; pre-releases only to a device running one, or with ``prerelease=true``)."""
    check_download_key(ota, principal)
    if current is not None and model is None:
        raise InvalidInput("current needs model (?model=<m>&current=<v>)", field="model")
    rows = await ota.firmware.repo.for_model(model)
    if model is not None and not rows:
        raise NotFound(f"no firmware for model {model!r}", field="model")
    chosen = manifest.select(rows, current=current, prerelease=prerelease, stable_only=stable, hardware=hardware)
    url = base_url(request, ota)
    return Manifest(firmware=[manifest_entry(r, base_url=url, signature=ota.firmware.signature(r)) for r in chosen])


@router.get("/ota/public-key", response_model=PublicKey, tags=["OTA (device side)"])
async def ota_public_key(ota: OtaDep, principal: MaybePrincipal) -> PublicKey:
    """The Ed25519 key that verifies firmware signatures; 404 when no signing key is configured."""
    check_download_key(ota, principal)
    if ota.signer is None:
        raise NotFound("no signing key is configured (TELEMETRA_OTA_SIGNING_KEY)", field=None)
    return PublicKey(public_key=ota.signer.public_b64, public_key_pem=ota.signer.public_pem)
