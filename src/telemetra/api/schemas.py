"""Request and answer models (``Create``/``Update``/``Public`` families apart from the table models)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from telemetra.api.fields import DeviceIdField, LongText, Metadata, Name, refusal
from telemetra.domain.ids import reserved_reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceCreate(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "esp32_01", "name": "Greenhouse sensor", "model": "env-v1", "metadata": {"site": "north"}}
            ]
        }
    )

    id: DeviceIdField | None = Field(None, description="generated when absent")
    name: Name | None = None
    model: Name | None = None
    kind: Literal["device", "gateway"] = "device"
    parent_id: DeviceIdField | None = None
    notes: LongText | None = None
    metadata: Metadata = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, value: str | None) -> str | None:
        reason = reserved_reason(value) if value is not None else None
        if reason:
            raise refusal(reason)
        return value


class DeviceUpdate(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Greenhouse sensor (west)", "disabled": False}]})

    name: Name | None = None
    model: Name | None = None
    kind: Literal["device", "gateway"] | None = None
    parent_id: DeviceIdField | None = None
    notes: LongText | None = None
    metadata: Metadata | None = None
    disabled: bool | None = None

    @field_validator("kind", "disabled", mode="before")
    @classmethod
    def _required_when_given(cls, value: Any) -> Any:
        # Absent means "leave as is"; an explicit null would clear a column that must have a value.
        if value is None:
            raise ValueError("may be left out but not set to null")
        return value


class DevicePublic(BaseModel):
    id: str
    name: str | None
    model: str | None
    kind: str
    parent_id: str | None
    role: str | None
    fw_version: str | None
    online: bool
    rssi: int | None
    last_seen_at: str | None
    notes: str | None
    metadata: dict[str, Any]
    disabled: bool
    auto_registered: bool
    created_at: str
    updated_at: str


class MqttCredentials(BaseModel):
    username: str
    password: str


class Credentials(BaseModel):
    api_key: str
    mqtt: MqttCredentials


class DeviceWithCredentials(BaseModel):
    device: DevicePublic
    credentials: Credentials


class DeviceList(BaseModel):
    devices: list[DevicePublic]
    total: int
    limit: int
    offset: int


class ClaimCodesCreate(_Strict):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"count": 10, "prefix": "greenhouse", "model": "env-v1", "ttl_s": 86400}]}
    )

    count: int | None = Field(None, ge=1, le=1000, description="devices to create with generated ids")
    device_ids: list[DeviceIdField] | None = Field(None, min_length=1, max_length=1000)
    prefix: str = Field("dev", pattern=r"^[A-Za-z0-9_\-]{1,32}$")
    model: Name | None = None
    kind: Literal["device", "gateway"] = "device"
    ttl_s: int | None = Field(None, ge=60, le=365 * 86400)


class ClaimCode(BaseModel):
    device_id: str
    claim_code: str
    expires_at: str


class ClaimCodes(BaseModel):
    claim_codes: list[ClaimCode]


class ClaimRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"claim_code": "K7Q2-9XWM"}]})

    claim_code: str = Field(..., min_length=4, max_length=64)


class IngestAccepted(BaseModel):
    status: Literal["accepted"] = "accepted"
    accepted: bool = True
    device_ids: list[str]
    messages: int
    points: int
    id: str | None = Field(None, description="the (first) reading's id: device and time")
    device_id: str | None = None
    timestamp: str | None = Field(None, description="the (first) reading's time, ISO 8601 UTC")
    ids: list[str] | None = Field(None, description="every reading's id, when there are several")


class TelemetryMessage(BaseModel):
    """For the OpenAPI page only: the ingest path decodes raw bytes itself (see ARCHITECTURE.md)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"device_id": "esp32_01", "metrics": {"temperature": 31.4, "humidity": 62.1}},
                {"ts": 1732300000123, "temperature": 22.5},
                {"ts": "2026-11-23T10:00:00Z", "values": {"temperature": {"inlet": 45}}},
            ]
        },
    )
    device_id: DeviceIdField | None = Field(None, description="also `device` or `deviceId`; else the key's device")
    ts: int | float | str | None = Field(None, description="epoch s or ms, or ISO 8601; also `timestamp`")
    # Any other member is a reading; `values` and `metrics` holding an object are wrappers of readings
    # (seed 001), holding anything else they are readings of that name.
    values: Any = Field(None, description="an object of readings (or a reading named `values`)")
    metrics: Any = Field(None, description="an object of readings (or a reading named `metrics`)")


class NodeTelemetry(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "name": "pir1",
                    "uptime": 120,
                    "heap_free": 180000,
                    "peer_count": 3,
                    "role": "PIR",
                    "firmware": "1.0.0",
                    "state": {"motion": "1"},
                },
            ]
        },
    )
    # The firmware sends strings; a number is taken as its text.
    name: str | int | float | None = None
    role: str | int | float | None = None
    firmware: str | int | float | None = None
    state: dict[str, str | int | float | bool | None] | None = Field(None, description="shared state: key → value")
