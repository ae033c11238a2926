"""Reads: raw history (paginated), latest values, aggregates in time buckets, CSV export, state, events,
rejected messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from fastapi.responses import Response, StreamingResponse

from telemetra.api.answers import (
    AggregatePage,
    DeviceState,
    Events,
    HistoryPage,
    LatestValues,
    Rejected,
    StateHistory,
    StatsPage,
)
from telemetra.api.deps import Caller, ServicesDep, Viewer, check_reads
from telemetra.api.fields import DeviceIdPath, DeviceIdQuery, KeysQuery, TextQuery
from telemetra.api.openapi import answers
from telemetra.api.params import decode_cursor, encode_cursor, interval_ms, key_list, time_range
from telemetra.api.present import point, series
from telemetra.domain.errors import InvalidInput, NotFound
from telemetra.domain.timeutil import bucket_iso, ms_to_iso
from telemetra.storage.queries import AGGREGATES

router = APIRouter(prefix="/api/v1", tags=["telemetry"])

Keys = KeysQuery
Start = Annotated[str | None, Query(max_length=64, description="ISO 8601 or epoch s/ms; default end - 24h")]
End = Annotated[str | None, Query(max_length=64, description="ISO 8601 or epoch s/ms; default now")]
Range = Annotated[
    str | None, Query(alias="range", max_length=32, description="instead of start: a span back from end, e.g. 24h")
]
Cursor = Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_\-]*$", description="next_cursor")]


async def _known(services: Any, device_id: str) -> None:
    if await services.directory.get(device_id) is None:
        raise NotFound(f"device {device_id!r} not found", field="device_id")


@router.get("/devices/{device_id}/telemetry", **answers(HistoryPage))
@router.get("/devices/{device_id}/history", **answers(HistoryPage))
async def history(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    keys: Keys = None,
    start: Start = None,
    end: End = None,
    range_: Range = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    cursor: Cursor = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
) -> dict[str, Any]:
    """Raw points by keys and time range, oldest first (or ``order=desc``); follow ``next_cursor``."""
    check_reads(principal, device_id)
    await _known(services, device_id)
    span = time_range(start, end, range_)
    page = await services.queries.history(
        device_id,
        keys=key_list(keys),
        start=span.start,
        end=span.end,
        limit=limit,
        after=decode_cursor(cursor),
        descending=order == "desc",
    )
    return {
        "device_id": device_id,
        "start": ms_to_iso(span.start),
        "end": ms_to_iso(span.end),
        "series": series(page.points),
        "next_cursor": encode_cursor(page.next_after),
    }


@router.get("/devices/{device_id}/latest", **answers(LatestValues))
async def latest(
    device_id: DeviceIdPath, services: ServicesDep, principal: Caller, keys: Keys = None
) -> dict[str, Any]:
    check_reads(principal, device_id)
    await _known(services, device_id)
    points = await services.queries.latest(device_id, key_list(keys))
    return {"device_id": device_id, "values": {p.key: point(p) for p in points}}


async def _aggregate(
    services: Any,
    device_id: DeviceIdPath,
    keys: str | None,
    start: str | None,
    end: str | None,
    range_: str | None,
    interval: str | None,
    fn: str | None,
) -> dict[str, Any]:
    await _known(services, device_id)
    span = time_range(start, end, range_)
    step = interval_ms(interval, span)
    functions = [f.strip() for f in (fn or ",".join(AGGREGATES)).split(",") if f.strip()]
    unknown = [f for f in functions if f not in AGGREGATES]
    if unknown or not functions:
        raise InvalidInput(
            f"unknown function {unknown[0] if unknown else ''!r}; use {', '.join(AGGREGATES)}", field="fn"
        )
    wanted = key_list(keys) or [p.key for p in await services.queries.latest(device_id) if not isinstance(p.value, str)]
    result = await services.queries.aggregate_at(
        device_id, keys=wanted or [], start=span.start, end=span.end, interval_ms=step, functions=functions
    )
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in wanted}
    for b in result.buckets:
        out.setdefault(b.key, []).append({"start": bucket_iso(b.start), **b.values})
    return {
        "device_id": device_id,
        "interval": interval,
        "resolution": result.resolution,
        # Only when retention took part of the range from every tier: the answer covers data from then on.
        **({"data_since": ms_to_iso(result.data_since)} if result.data_since is not None else {}),
        "start": ms_to_iso(span.start),
        "end": ms_to_iso(span.end),
        "series": out,
    }


@router.get("/devices/{device_id}/aggregate", **answers(AggregatePage))
async def aggregate(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    keys: Keys = None,
    start: Start = None,
    end: End = None,
    range_: Range = None,
    interval: Annotated[
        str | None, Query(max_length=32, description="bucket width (1m, 1h, 1d); one bucket when absent")
    ] = None,
    fn: Annotated[str | None, Query(max_length=64, description="comma list of min,max,avg,sum,count,last")] = None,
) -> dict[str, Any]:
    check_reads(principal, device_id)
    body = await _aggregate(services, device_id, keys, start, end, range_, interval, fn)
    # A year of hourly buckets is thousands of objects: orjson writes them ~10x faster than FastAPI's encoder.
    return Response(orjson.dumps(body, default=float), media_type="application/json")  # type: ignore[return-value]


@router.get("/devices/{device_id}/stats", **answers(StatsPage))
async def stats(
    device_id: DeviceIdPath, services: ServicesDep, principal: Caller, range_: Range = "24h", keys: Keys = None
) -> dict[str, Any]:
    """``/stats?range=24h`` (as telemetry_app asks): min/max/avg (and count) per metric over the range."""
    check_reads(principal, device_id)
    result = await _aggregate(services, device_id, keys, None, None, range_, None, "min,max,avg,count")
    result["stats"] = {k: (v[0] if v else None) for k, v in result["series"].items()}
    return result


@router.get(
    "/devices/{device_id}/telemetry/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`device_id,key,ts,value` rows after a header row",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        }
    },
)
async def export_csv(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    keys: Keys = None,
    start: Start = None,
    end: End = None,
    range_: Range = None,
) -> StreamingResponse:
    """Every point in the range as CSV (``device_id,key,ts,value``), streamed in bounded memory."""
    check_reads(principal, device_id)
    await _known(services, device_id)
    span = time_range(start, end, range_)
    wanted = key_list(keys)

    async def rows() -> AsyncIterator[bytes]:
        yield b"device_id,key,ts,value\r\n"
        lines: list[str] = []
        async for p in services.queries.stream(device_id, keys=wanted, start=span.start, end=span.end):
            lines.append(f"{_csv(device_id)},{_csv(p.key)},{ms_to_iso(p.ts)},{_csv(p.value)}\r\n")
            if len(lines) >= 1000:
                yield "".join(lines).encode()
                lines.clear()
        if lines:
            yield "".join(lines).encode()

    filename = f"{device_id}-telemetry.csv"
    return StreamingResponse(
        rows(), media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'}
    )


def _csv(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if any(c in text for c in ',"\r\n') or (text[:1] in ("=", "+", "-", "@") and not _is_number(text)):
        return '"' + text.replace('"', '""') + '"'
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@router.get("/devices/{device_id}/state", **answers(DeviceState))
async def device_state(device_id: DeviceIdPath, services: ServicesDep, principal: Caller) -> dict[str, Any]:
    check_reads(principal, device_id)
    await _known(services, device_id)
    rows = await services.queries.state(device_id)
    return {
        "device_id": device_id,
        "state": {r.key: {"value": r.value, "ts": ms_to_iso(r.ts), "version": r.version} for r in rows},
    }


@router.get("/devices/{device_id}/state/history", **answers(StateHistory))
async def device_state_history(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    start: Start = None,
    end: End = None,
    range_: Range = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> dict[str, Any]:
    check_reads(principal, device_id)
    await _known(services, device_id)
    span = time_range(start, end, range_, default_ms=30 * 86_400_000)
    rows = await services.queries.state_history(device_id, start=span.start, end=span.end, limit=limit)
    return {"device_id": device_id, "history": [{"key": r.key, "value": r.value, "ts": ms_to_iso(r.ts)} for r in rows]}


@router.get("/devices/{device_id}/events", **answers(Events))
async def events(
    device_id: DeviceIdPath,
    services: ServicesDep,
    principal: Caller,
    name: TextQuery = None,
    start: Start = None,
    end: End = None,
    range_: Range = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> dict[str, Any]:
    check_reads(principal, device_id)
    await _known(services, device_id)
    span = time_range(start, end, range_, default_ms=30 * 86_400_000)
    rows = await services.queries.events(device_id, start=span.start, end=span.end, limit=limit, name=name)
    return {
        "device_id": device_id,
        "events": [{"id": r.id, "name": r.name, "ts": ms_to_iso(r.ts), "payload": r.payload} for r in rows],
    }


@router.get("/rejected", **answers(Rejected))
async def rejected(
    services: ServicesDep, _: Viewer, device_id: DeviceIdQuery = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> dict[str, Any]:
    """Messages we could not take, newest first, with their reason."""
    rows = await services.queries.rejected(limit=limit, device_id=device_id)
    return {
        "rejected": [
            {
                "id": r.id,
                "received_at": ms_to_iso(r.received_at),
                "source": r.source,
                "topic": r.topic,
                "device_id": r.device_id,
                "reason": r.reason,
                "payload": r.payload,
            }
            for r in rows
        ]
    }
