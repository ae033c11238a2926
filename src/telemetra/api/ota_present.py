"""OTA rows → answer shapes (iotmesh's fields, Telemetra's beside them)."""

from __future__ import annotations

import math
from typing import Literal

from telemetra.api.ota_schemas import (
    FirmwarePublic,
    ManifestEntry,
    NodeOut,
    PendingUpdate,
    Progress,
    UpdateDetail,
    UpdateJob,
    WaveOut,
)
from telemetra.domain.ota import COMPLETED, DEVICE_FINAL, DEVICE_STATUSES, DEVICES, FAILED, TIMED_OUT
from telemetra.domain.timeutil import ms_to_iso
from telemetra.ota.engine import download_url
from telemetra.storage.ota_jobs import NodeCounts
from telemetra.storage.schema import FirmwareRow, OtaJobRow, OtaNodeRow

WaveStatus = Literal["pending", "running", "completed"]
PART_BYTES = 1024  # the iotmesh gateway's fixed part size


def _iso(ms: int | None) -> str | None:
    return ms_to_iso(ms) if ms is not None else None


def num_parts(size_bytes: int) -> int:
    return math.ceil(size_bytes / PART_BYTES)


def firmware_public(row: FirmwareRow, *, base_url: str, signature: str | None) -> FirmwarePublic:
    return FirmwarePublic(
        id=row.id,
        model=row.model,
        node_type=row.model,
        version=row.version,
        hardware=row.hardware,
        filename=row.filename,
        size_bytes=row.size_bytes,
        md5_hash=row.md5,
        md5=row.md5,
        sha256=row.sha256,
        signature=signature,
        release_notes=row.release_notes,
        is_stable=bool(row.is_stable),
        prerelease=bool(row.prerelease),
        created_at=ms_to_iso(row.created_at),
        download_url=download_url(base_url, row.id),
        num_parts=num_parts(row.size_bytes),
    )


def manifest_entry(row: FirmwareRow, *, base_url: str, signature: str | None) -> ManifestEntry:
    return ManifestEntry(
        model=row.model,
        version=row.version,
        url=download_url(base_url, row.id),
        sha256=row.sha256,
        size=row.size_bytes,
        md5=row.md5,
        hardware=row.hardware,
        id=row.id,
        prerelease=bool(row.prerelease),
        signature=signature,
    )


def pending_update(job: OtaJobRow, firmware: FirmwareRow, *, base_url: str) -> PendingUpdate:
    return PendingUpdate(
        update_id=job.id,
        firmware_id=firmware.id,
        node_type=job.target_node_type or firmware.model,
        version=firmware.version,
        hardware=firmware.hardware,
        md5=firmware.md5,
        num_parts=num_parts(firmware.size_bytes),
        size_bytes=firmware.size_bytes,
        target_node_id=job.target_node_id,
        force=bool(job.force_update),
        sha256=firmware.sha256,
        url=download_url(base_url, firmware.id),
    )


def _waves(job: OtaJobRow, counts: NodeCounts | None) -> list[WaveOut]:
    if job.delivery != DEVICES:
        return []
    out = []
    for index, percent in enumerate(job.waves or [100]):
        statuses = counts.total(index) if counts else {}
        devices = sum(statuses.values())
        done = all(s in DEVICE_FINAL for s in statuses)
        status: WaveStatus = "pending"
        if index <= job.current_wave:
            status = "completed" if done else "running"
        out.append(
            WaveOut(
                percent=int(percent),
                devices=devices,
                completed=statuses.get(COMPLETED, 0),
                failed=statuses.get(FAILED, 0) + statuses.get(TIMED_OUT, 0),
                status=status,
            )
        )
    return out


def _progress(counts: NodeCounts | None) -> Progress:
    totals = counts.total() if counts else {}
    by_status = {s: totals.get(s, 0) for s in DEVICE_STATUSES}
    return Progress(total=sum(totals.values()), **by_status)


def update_job(job: OtaJobRow, firmware: FirmwareRow | None, counts: NodeCounts | None) -> UpdateJob:
    return UpdateJob(
        id=job.id,
        firmware_id=job.firmware_id,
        status=job.status,  # type: ignore[arg-type]
        delivery=job.delivery,  # type: ignore[arg-type]
        name=job.name,
        node_type=firmware.model if firmware else job.target_node_type,
        version=firmware.version if firmware else None,
        target_node_id=job.target_node_id,
        target_node_type=job.target_node_type,
        force_update=bool(job.force_update),
        target_model=job.target_model,
        target_device_ids=job.target_device_ids,
        target_filter=job.target_filter,
        target_percentage=job.target_percentage,
        waves=_waves(job, counts),
        current_wave=job.current_wave if job.delivery == DEVICES else None,
        rate_per_minute=job.rate_per_minute,
        device_timeout_s=job.device_timeout_s,
        max_retries=job.max_retries,
        pause_failure_percent=job.pause_failure_percent,
        pause_min_finished=job.pause_min_finished,
        paused_reason=job.paused_reason,
        error_message=job.error_message,
        progress=_progress(counts),
        created_at=ms_to_iso(job.created_at),
        started_at=_iso(job.started_at),
        completed_at=_iso(job.completed_at),
    )


def node_out(node: OtaNodeRow) -> NodeOut:
    return NodeOut(
        node_id=node.node_id,
        status=node.status,
        current_part=node.current_part or 0,
        total_parts=node.total_parts,
        progress=node.progress,
        error_message=node.error_message,
        wave=node.wave,
        attempts=node.attempts,
        started_at=ms_to_iso(node.started_at),
        updated_at=ms_to_iso(node.updated_at),
        notified_at=_iso(node.notified_at),
        completed_at=_iso(node.completed_at),
    )


def update_detail(
    job: OtaJobRow, firmware: FirmwareRow | None, counts: NodeCounts | None, nodes: list[OtaNodeRow]
) -> UpdateDetail:
    base = update_job(job, firmware, counts)
    return UpdateDetail(**base.model_dump(), nodes=[node_out(n) for n in nodes])
