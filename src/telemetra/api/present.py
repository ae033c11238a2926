"""Table rows → answer shapes (SPEC §5). Timestamps out are ISO 8601 UTC with ``Z`` and milliseconds."""

from __future__ import annotations

from typing import Any

from telemetra.api.schemas import Credentials, DevicePublic, DeviceWithCredentials, MqttCredentials
from telemetra.domain import presence
from telemetra.domain.timeutil import ms_to_iso
from telemetra.storage.queries import PointOut
from telemetra.storage.schema import Device


def is_online(device: Device, *, now: int, offline_after_s: int) -> bool:
    """Online while the device says so and was heard from recently (seed 000 marks nodes offline after
    ~120 s of silence)."""
    return presence.is_online(device.online, device.last_seen_at, now=now, offline_after_s=offline_after_s)


def device_public(device: Device, *, now: int, offline_after_s: int) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        model=device.model,
        kind=device.kind,
        parent_id=device.parent_id,
        role=device.role,
        fw_version=device.fw_version,
        online=is_online(device, now=now, offline_after_s=offline_after_s),
        rssi=device.rssi,
        last_seen_at=ms_to_iso(device.last_seen_at) if device.last_seen_at is not None else None,
        notes=device.notes,
        metadata=device.meta or {},
        disabled=bool(device.disabled),
        auto_registered=bool(device.auto_registered),
        created_at=ms_to_iso(device.created_at),
        updated_at=ms_to_iso(device.updated_at),
    )


def with_credentials(device: Device, secret: str, *, now: int, offline_after_s: int) -> DeviceWithCredentials:
    return DeviceWithCredentials(
        device=device_public(device, now=now, offline_after_s=offline_after_s),
        credentials=Credentials(api_key=secret, mqtt=MqttCredentials(username=device.id, password=secret)),
    )


def reading_id(device_id: str, ts: int) -> str:
    """A reading — one message's values, all at one time — is identified by its device and time."""
    return f"{device_id}:{ts}"


def point(p: PointOut) -> dict[str, Any]:
    return {"ts": ms_to_iso(p.ts), "value": p.value}


def series(points: list[PointOut]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        out.setdefault(p.key, []).append(point(p))
    return out
