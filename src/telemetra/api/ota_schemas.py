"""OTA request and answer models. Names follow iotmesh (CLIENTS.md §1.6) where its clients read them,
with Telemetra's rollout fields added beside them (the issue's names, so scripts and the dashboard can
rely on them)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from telemetra.domain.ids import DEVICE_ID_PATTERN
from telemetra.domain.ota import DEVICE_STATUSES, JOB_STATUSES

_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns: a larger one is a 422, not a database error

FirmwareId = Annotated[int, Path(ge=1, le=MAX_ID, description="firmware id")]
UpdateId = Annotated[int, Path(ge=1, le=MAX_ID, description="update (job) id")]

JobStatus = Literal["pending", "distributing", "paused", "completed", "failed", "cancelled"]
assert set(JobStatus.__args__) == set(JOB_STATUSES)  # type: ignore[attr-defined]


class FirmwarePublic(BaseModel):
    id: int
    model: str
    node_type: str = Field(description="iotmesh's name for the model")
    version: str
    hardware: str
    filename: str
    size_bytes: int
    md5_hash: str = Field(description="lowercase hex MD5 (iotmesh)")
    md5: str
    sha256: str
    signature: str | None = Field(description="base64 Ed25519 signature over the 32 raw bytes of sha256")
    release_notes: str | None
    is_stable: bool
    prerelease: bool
    created_at: str
    download_url: str
    num_parts: int = Field(description="1024-byte parts (iotmesh gateways)")


class FirmwareList(BaseModel):
    items: list[FirmwarePublic]
    total: int


class FirmwareDeleted(BaseModel):
    message: str
    filename: str
    id: int


class ManifestEntry(BaseModel):
    model: str
    version: str
    url: str
    sha256: str
    size: int
    md5: str
    hardware: str
    id: int
    prerelease: bool
    signature: str | None


class Manifest(BaseModel):
    firmware: list[ManifestEntry]


class PublicKey(BaseModel):
    algorithm: Literal["ed25519"] = "ed25519"
    public_key: str = Field(description="the 32-byte raw public key, base64")
    public_key_pem: str
    signs: str = "the image's SHA-256 digest (32 raw bytes); the signature is base64"


class TargetFilterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=128)
    search: str | None = Field(None, max_length=128, description="substring of the device id or name")
    kind: Literal["device", "gateway"] | None = None
    parent_id: str | None = Field(None, pattern=DEVICE_ID_PATTERN)
    fw_version: str | None = Field(None, max_length=64, description="devices now running this version")


class ExponentialWaves(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_percent: float = Field(1.0, gt=0, le=100)
    factor: float = Field(2.0, gt=1, le=100)


class UpdateCreate(BaseModel):
    """iotmesh's job (``firmware_id``, ``target_node_id``, ``target_node_type``, ``force_update``: a gateway
    polls for it) or, with any ``target_*``/``waves`` field, a rollout the server delivers to devices."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"firmware_id": 1, "force_update": False, "target_node_id": None},
                {
                    "firmware_id": 2,
                    "target_model": "env-v1",
                    "waves": [5, 25, 100],
                    "rate_per_minute": 120,
                    "device_timeout_s": 900,
                    "max_retries": 1,
                    "pause_failure_percent": 20,
                    "pause_min_finished": 10,
                },
            ]
        },
    )
    firmware_id: int = Field(..., ge=1, le=2**31 - 1)
    target_node_id: str | None = Field(None, max_length=128)
    target_node_type: str | None = Field(None, max_length=128)
    force_update: bool = False
    name: str | None = Field(None, max_length=128)
    target_model: str | None = Field(None, max_length=128)
    target_device_ids: list[str] | None = Field(None, min_length=1, max_length=100_000)
    target_filter: TargetFilterBody | None = None
    target_percentage: int | None = Field(None, ge=1, le=100, description="stable by device-id hash")
    waves: list[int] | ExponentialWaves | None = Field(
        None, description="cumulative percentages, e.g. [5, 25, 100], or {start_percent, factor}"
    )
    rate_per_minute: int = Field(600, ge=1, le=1_000_000, description="devices notified per minute")
    device_timeout_s: int = Field(3600, ge=1, le=30 * 86400, description="per device, from its notification")
    max_retries: int = Field(0, ge=0, le=10)
    pause_failure_percent: float | None = Field(20.0, gt=0, le=100)
    pause_min_finished: int = Field(10, ge=1, le=1_000_000)

    @field_validator("target_device_ids")
    @classmethod
    def _device_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        bad = [d for d in value if not _DEVICE_ID.match(d)]
        if bad:
            raise ValueError(f"not device ids: {bad[:5]}")
        return list(dict.fromkeys(value))


class WaveOut(BaseModel):
    percent: int
    devices: int
    completed: int
    failed: int
    status: Literal["pending", "running", "completed"]


class Progress(BaseModel):
    total: int
    pending: int
    notified: int
    downloading: int
    installing: int
    completed: int
    failed: int
    timed_out: int


assert set(Progress.model_fields) - {"total"} == set(DEVICE_STATUSES)


class UpdateJob(BaseModel):
    id: int
    firmware_id: int
    status: JobStatus
    delivery: Literal["gateway", "devices"]
    name: str | None
    node_type: str | None
    version: str | None
    target_node_id: str | None
    target_node_type: str | None
    force_update: bool
    target_model: str | None
    target_device_ids: list[str] | None
    target_filter: dict[str, Any] | None
    target_percentage: int | None
    waves: list[WaveOut]
    current_wave: int | None
    rate_per_minute: int
    device_timeout_s: int
    max_retries: int
    pause_failure_percent: float | None
    pause_min_finished: int
    paused_reason: str | None
    error_message: str | None
    progress: Progress
    created_at: str
    started_at: str | None
    completed_at: str | None


class NodeOut(BaseModel):
    node_id: str
    status: str
    current_part: int
    total_parts: int | None
    progress: int | None
    error_message: str | None
    wave: int
    attempts: int
    started_at: str
    updated_at: str
    notified_at: str | None
    completed_at: str | None


class UpdateDetail(UpdateJob):
    nodes: list[NodeOut]


class PendingUpdate(BaseModel):
    """The gateway's poll answer: it reads the first element only."""

    update_id: int
    firmware_id: int
    node_type: str
    version: str
    hardware: str
    md5: str
    num_parts: int
    size_bytes: int
    target_node_id: str | None
    force: bool
    sha256: str
    url: str


class TransitionAnswer(BaseModel):
    status: JobStatus
    update_id: int
    error: str | None = None


class UpdateDeleted(BaseModel):
    message: str
    update_id: int


class ProgressBody(BaseModel):
    """iotmesh's node progress (``current_part``, ``total_parts``, ``status``, ``error_message``) or a
    device's own report (``status``, ``progress`` in percent, ``error``)."""

    model_config = ConfigDict(extra="ignore")
    current_part: int | None = Field(None, ge=0, le=2**31 - 1)
    total_parts: int | None = Field(None, ge=0, le=2**31 - 1)
    status: str | None = Field(None, max_length=32)
    error_message: str | None = Field(None, max_length=1000)
    error: str | None = Field(None, max_length=1000)
    progress: int | None = Field(None, ge=0, le=100)


class ProgressAnswer(BaseModel):
    status: Literal["ok"] = "ok"
    node_id: str
    progress: str = Field(description="current_part/total_parts, as iotmesh answers")
    node_status: str
    retry: bool = Field(False, description="a failure with retries left: the device will be notified again")
