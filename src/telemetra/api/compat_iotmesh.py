"""iotmesh's paths in iotmesh's shapes (CLIENTS.md §1.2, §1.3, §1.5): its React dashboard and HTML test
console read bare arrays of nodes and of shared state, and need a JSON body on every success (a 204 is an
error to them). A node is a Telemetra device; its peer count is its latest ``peer_count`` reading."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from telemetra.api.deps import Caller, Operator, ServicesDep, Viewer, check_reads
from telemetra.api.fields import DeviceIdPath
from telemetra.api.openapi import answers
from telemetra.api.present import is_online
from telemetra.domain.errors import NotFound
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.storage.readings import ReadingQueries, number
from telemetra.storage.schema import Device, DeviceState

router = APIRouter(prefix="/api/v1", tags=["iotmesh mesh gateway compatibility"])

HISTORY_KEYS = ("heap_free", "uptime", "peer_count")
MAX_NODES = 10_000


class NodeName(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"name": "Kitchen node"}]})
    name: str = Field(..., min_length=1, max_length=128)


# iotmesh's shapes, for the OpenAPI document (each answer is built as a dict; see ``api.openapi.answers``).
class MeshNode(BaseModel):
    id: str
    name: str | None
    firmware_version: str | None
    ip_address: str | None = Field(description="always null: the gateway posts for its nodes")
    first_seen: str
    last_seen: str
    is_online: bool
    role: str = Field(description="NODE, GATEWAY, or what the node reported")
    peer_count: float | None


class MeshNodeDeleted(BaseModel):
    message: str
    node_id: str


class MeshNodeReading(BaseModel):
    time: str
    node_id: str
    heap_free: float | None
    uptime_sec: float | None
    peer_count: float | None
    role: str


class MeshState(BaseModel):
    node_id: str
    key: str
    value: Any
    version: int | None
    updated_at: str


def node_out(device: Device, *, now: int, offline_after_s: int, peer_count: Any = None) -> dict[str, Any]:
    seen = device.last_seen_at if device.last_seen_at is not None else device.created_at
    return {
        "id": device.id,
        "name": device.name,
        "firmware_version": device.fw_version,
        "ip_address": None,  # not known to Telemetra (the gateway posts for its nodes)
        "first_seen": ms_to_iso(device.created_at),
        "last_seen": ms_to_iso(seen),
        "is_online": is_online(device, now=now, offline_after_s=offline_after_s),
        # iotmesh's default role; its dashboard hides "delete" for a GATEWAY.
        "role": device.role or ("GATEWAY" if device.kind == "gateway" else "NODE"),
        "peer_count": number(peer_count),
    }


def state_out(row: DeviceState) -> dict[str, Any]:
    return {
        "node_id": row.device_id,
        "key": row.key,
        "value": row.value,
        "version": row.version,
        "updated_at": ms_to_iso(row.ts),
    }


async def _node(services: Any, device_id: str) -> Device:
    device: Device | None = await services.devices.find(device_id)
    if device is None:
        raise NotFound("Node not found", field="node_id")
    return device


@router.get("/nodes", **answers(list[MeshNode]))
async def list_nodes(
    services: ServicesDep, _: Viewer, limit: Annotated[int, Query(ge=1, le=MAX_NODES)] = 1000
) -> list[dict[str, Any]]:
    """Bare array of nodes, most recently heard from first."""
    now = now_ms()
    page = await services.devices.list(limit=limit, now_ms=now, recent_first=True)
    peers = await ReadingQueries(services.engine).latest_many([d.id for d in page.devices], ["peer_count"])
    offline_after = services.settings.offline_after_s
    return [node_out(d, now=now, offline_after_s=offline_after, peer_count=_peers(peers, d.id)) for d in page.devices]


def _peers(latest: dict[str, list[Any]], device_id: str) -> Any:
    points = latest.get(device_id)
    return points[0].value if points else None


@router.get("/nodes/{device_id}", **answers(MeshNode))
async def get_node(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    check_reads(principal, device_id)
    device = await _node(services, device_id)
    peers = await ReadingQueries(services.engine).latest_many([device_id], ["peer_count"])
    return node_out(
        device, now=now_ms(), offline_after_s=services.settings.offline_after_s, peer_count=_peers(peers, device_id)
    )


@router.put("/nodes/{device_id}/name", **answers(MeshNode))
async def rename_node(device_id: DeviceIdPath, body: NodeName, services: ServicesDep, _: Operator) -> dict[str, Any]:
    await _node(services, device_id)
    now = now_ms()
    device = await services.devices.update(device_id, now_ms=now, name=body.name)
    return node_out(device, now=now, offline_after_s=services.settings.offline_after_s)


@router.delete("/nodes/{device_id}", **answers(MeshNodeDeleted))
async def delete_node(device_id: DeviceIdPath, services: ServicesDep, _: Operator) -> dict[str, Any]:
    """Deletes the node with all its data; answers JSON (the dashboard parses every answer)."""
    await _node(services, device_id)
    await services.devices.delete(device_id)
    await services.registry_changed(device_id, "deleted")
    return {"message": f"Node {device_id} deleted", "node_id": device_id}


@router.get("/nodes/{device_id}/history", **answers(list[MeshNodeReading]))
async def node_history(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    hours: Annotated[int, Query(ge=1, le=168)] = 24,
) -> list[dict[str, Any]]:
    """Bare array of ``{time, node_id, heap_free, uptime_sec, peer_count, role}``, newest first."""
    check_reads(principal, device_id)
    device = await _node(services, device_id)
    end = now_ms() + 1
    readings = await ReadingQueries(services.engine).readings(
        device_id, keys=HISTORY_KEYS, start=end - hours * 3_600_000, end=end, limit=10_000, newest_first=True
    )
    role = device.role or "NODE"
    return [
        {
            "time": ms_to_iso(r.ts),
            "node_id": device_id,
            "heap_free": number(r.values.get("heap_free")),
            "uptime_sec": number(r.values.get("uptime")),
            "peer_count": number(r.values.get("peer_count")),
            "role": role,
        }
        for r in readings
    ]


@router.get("/nodes/{device_id}/state", **answers(list[MeshState]))
async def node_state(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> list[dict[str, Any]]:
    check_reads(principal, device_id)
    await _node(services, device_id)
    return [state_out(r) for r in await services.queries.state(device_id)]


@router.get("/state", **answers(list[MeshState]))
async def shared_state(services: ServicesDep, _: Viewer) -> list[dict[str, Any]]:
    """The iotmesh mesh's shared state of all nodes: a bare array of ``{node_id, key, value, version, updated_at}``,
    by node and key."""
    return [state_out(r) for r in await services.queries.state()]
