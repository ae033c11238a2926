"""Commands and desired configuration (admin), and the HTTP side for devices without MQTT."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from telemetra.api.answers import Command, CommandList, ConfigPublished, ConfigView, PendingCommands
from telemetra.api.deps import Caller, Operator, ServicesDep, check_reads
from telemetra.api.fields import CommandIdPath, ConfigValue, DeviceIdPath, JsonValue, Name, Params, ShortText, refusal
from telemetra.api.openapi import answers
from telemetra.domain.errors import Forbidden, NotFound
from telemetra.domain.principal import Role
from telemetra.domain.records import Batch, CommandAck, Event
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.storage.schema import CommandRow

router = APIRouter(tags=["commands and configuration"])

MAX_WAIT_S = 60


class CommandCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "reboot", "params": {"delay_s": 5}, "ttl_s": 600}]}
    )
    name: Name = Field(..., min_length=1)
    params: Params = Field(default_factory=dict)
    ttl_s: int = Field(3600, ge=1, le=30 * 86400, description="expires unanswered after this many seconds")


class CommandAckBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "result": {"rebooted": True}}]})

    status: ShortText = Field("ok", description="ok | error")
    result: JsonValue = None


class ConfigBody(BaseModel):
    """Any JSON object; each value is checked like a stored document (checked before anything is saved:
    a configuration that cannot be published must not become the desired one)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{"interval_s": 60, "led": "on"}]})
    __pydantic_extra__: dict[str, ConfigValue]

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            if len(value) > 1000:
                raise refusal("at most 1000 configuration keys")
            for key in value:
                if not isinstance(key, str) or not 0 < len(key) <= 128 or "\x00" in key:
                    raise refusal(f"configuration keys are 1-128 characters without NUL; got {str(key)[:40]!r}")
        return value


def command_out(c: CommandRow) -> dict[str, Any]:
    def iso(ms: int | None) -> str | None:
        return ms_to_iso(ms) if ms is not None else None

    return {
        "id": c.id,
        "device_id": c.device_id,
        "name": c.name,
        "params": c.params,
        "status": c.status,
        "created_at": iso(c.created_at),
        "sent_at": iso(c.sent_at),
        "acked_at": iso(c.acked_at),
        "expires_at": iso(c.expires_at),
        "result": c.result,
    }


async def _device(services: Any, device_id: str) -> None:
    if await services.directory.get(device_id) is None:
        raise NotFound(f"device {device_id!r} not found", field="device_id")


@router.post("/api/v1/devices/{device_id}/commands", status_code=201, **answers(Command, 201))
async def send_command(
    device_id: DeviceIdPath,
    body: CommandCreate,
    services: ServicesDep,
    _: Operator,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0,
) -> dict[str, Any]:
    """Queue a command; it is published on ``{prefix}/{id}/cmd`` when the device is online. With
    ``?wait=N`` the answer includes the device's reply if it comes within N seconds (two-way)."""
    await _device(services, device_id)
    command = await services.commands.create(device_id, body.name, body.params, ttl_s=body.ttl_s)
    if wait > 0:
        command = await services.commands.wait(command.id, wait)
    return command_out(command)


@router.get("/api/v1/devices/{device_id}/commands", **answers(CommandList))
async def list_commands(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    status: Annotated[str | None, Query(pattern="^(queued|sent|acked|failed|expired)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    check_reads(principal, device_id)
    rows = await services.commands.repo.list(device_id, status=status, limit=limit)
    return {"device_id": device_id, "commands": [command_out(c) for c in rows]}


@router.get("/api/v1/devices/{device_id}/commands/{command_id}", **answers(Command))
async def get_command(
    device_id: DeviceIdPath, command_id: CommandIdPath, services: ServicesDep, principal: Caller
) -> dict[str, Any]:
    check_reads(principal, device_id)
    return command_out(await services.commands.repo.get(command_id, device_id))


def _own_device(principal: Any) -> str:
    if principal.role not in (Role.DEVICE, Role.GATEWAY) or principal.device_id is None:
        raise Forbidden("this endpoint is for devices: use the device's own key", field="X-API-Key")
    device_id: str = principal.device_id
    return device_id


@router.get("/api/v1/device/commands", tags=["ingest (device side)"], **answers(PendingCommands))
async def poll_commands(
    services: ServicesDep, principal: Caller, wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0
) -> dict[str, Any]:
    """For devices that speak only HTTP: the commands waiting for this device (long-poll with ``?wait=20``)."""
    device_id = _own_device(principal)
    commands = await services.commands.poll(device_id, wait_s=wait)
    return {"commands": [{"id": c.id, "name": c.name, "params": c.params or {}, "ts": c.created_at} for c in commands]}


@router.post("/api/v1/device/commands/{command_id}/ack", tags=["ingest (device side)"], **answers(Command))
async def ack_command(
    command_id: CommandIdPath, body: CommandAckBody, services: ServicesDep, principal: Caller
) -> dict[str, Any]:
    """The device's answer; goes through the same ingest path as an MQTT ``event/ack``."""
    device_id = _own_device(principal)
    await services.commands.repo.get(command_id, device_id)
    ts = now_ms()
    ok = body.status.lower() in ("ok", "success", "done", "acked")
    doc = {"id": command_id, "status": body.status, "result": body.result}
    batch = Batch(
        acks=[CommandAck(device_id, command_id, ts, ok, body.result)], events=[Event(device_id, ts, "ack", doc)]
    )
    await services.queue.submit(batch, transport="http")
    return command_out(await services.commands.repo.get(command_id, device_id))


@router.put("/api/v1/devices/{device_id}/config", **answers(ConfigPublished))
async def put_config(device_id: DeviceIdPath, body: ConfigBody, services: ServicesDep, _: Operator) -> dict[str, Any]:
    """Desired configuration: stored with a new version and published retained on ``{prefix}/{id}/config``."""
    config = body.model_dump()
    config.pop("version", None)
    version = await services.commands.repo.set_desired_config(device_id, config, now_ms=now_ms())
    await services.registry_changed(device_id, "config")
    published = await services.commands.publish_config(device_id, config, version)
    return {**await _config_view(services, device_id), "published": published}


@router.get("/api/v1/devices/{device_id}/config", **answers(ConfigView))
async def get_config(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    check_reads(principal, device_id)
    return await _config_view(services, device_id)


async def _config_view(services: Any, device_id: str) -> dict[str, Any]:
    device = await services.devices.get(device_id)
    desired = device.desired_config or {}
    reported = {k: v for k, v in (device.reported_config or {}).items() if k != "version"}
    delta = {k: v for k, v in desired.items() if reported.get(k) != v}
    return {
        "device_id": device_id,
        "desired": desired,
        "desired_version": device.desired_version,
        "reported": reported,
        "reported_version": device.reported_version,
        "delta": delta,
        "in_sync": not delta and device.reported_version == device.desired_version,
    }
