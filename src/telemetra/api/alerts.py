"""Alerts (smart-heat-pump's are at ``/api/alerts``): active → acknowledged → cleared."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from telemetra.api.answers import Alert, AlertCounts, AlertList
from telemetra.api.deps import Operator, ServicesDep, Viewer
from telemetra.api.fields import AlertIdPath, DeviceIdQuery
from telemetra.api.openapi import answers
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.events import model
from telemetra.events.model import ChangeEvent
from telemetra.ingest.documents import INT64_MAX
from telemetra.services import Services
from telemetra.storage.schema import AlertRow

router = APIRouter(tags=["alerts"])


def alert_out(a: AlertRow) -> dict[str, Any]:
    def iso(ms: int | None) -> str | None:
        return ms_to_iso(ms) if ms is not None else None

    return {
        "id": a.id,
        "device_id": a.device_id,
        "type": a.type,
        "rule": a.rule_id,
        "severity": a.severity,
        "level": a.severity,
        "message": a.message,
        "value": a.value,
        "status": a.status,
        "count": a.count,
        "payload": a.payload,
        "created_at": iso(a.created_at),
        "updated_at": iso(a.updated_at),
        "acknowledged_at": iso(a.acknowledged_at),
        "cleared_at": iso(a.cleared_at),
    }


@router.get("/api/v1/alerts", **answers(AlertList))
async def list_alerts(
    services: ServicesDep,
    _: Viewer,
    status: Annotated[str | None, Query(pattern="^(active|acknowledged|cleared)$")] = None,
    device_id: DeviceIdQuery = None,
    type_: Annotated[str | None, Query(alias="type", pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")] = None,
    rule: Annotated[int | None, Query(ge=1, le=INT64_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Newest first; ``rule`` is the id of the rule that raised an alert, ``type`` what kind it is
    (``threshold``, ``offline``, or what a device reported)."""
    rows = await services.alerts.list(status=status, device_id=device_id, limit=limit, type_=type_, rule_id=rule)
    return {"alerts": [alert_out(a) for a in rows]}


@router.get("/api/v1/alerts/counts", **answers(AlertCounts))
async def alert_counts(services: ServicesDep, _: Viewer) -> dict[str, Any]:
    """Alerts per status; the open ones (active or acknowledged) per type and per severity."""
    return await services.alerts.counts()


@router.post("/api/v1/alerts/{alert_id}/acknowledge", **answers(Alert))
async def acknowledge(alert_id: AlertIdPath, services: ServicesDep, _: Operator) -> dict[str, Any]:
    return await _transition(services, alert_id, "acknowledged")


@router.post("/api/v1/alerts/{alert_id}/clear", **answers(Alert))
async def clear(alert_id: AlertIdPath, services: ServicesDep, _: Operator) -> dict[str, Any]:
    return await _transition(services, alert_id, "cleared")


async def _transition(services: Services, alert_id: int, to: str) -> dict[str, Any]:
    row = await services.alerts.transition(alert_id, to, now_ms=now_ms())
    columns = {c.name: getattr(row, c.name) for c in AlertRow.__table__.columns}
    await services.emit([ChangeEvent(model.ALERT, row.device_id, row.updated_at, {"alert": columns, "change": to})])
    return alert_out(row)
