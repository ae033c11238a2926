"""Storage and retention (issue 10): ``GET /api/v1/storage`` (bytes and rows per tier, the devices that
take the most, growth per day, days left to the budget) and retention per device model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from telemetra.api.answers import ModelRetention, RetentionPolicies, StorageUsage
from telemetra.api.deps import Operator, ServicesDep, Viewer
from telemetra.api.openapi import answers
from telemetra.domain.errors import StorageUnavailable
from telemetra.domain.rollups import TIERS
from telemetra.domain.timeutil import now_ms
from telemetra.retention import Retention
from telemetra.storage.retention import Days

router = APIRouter(prefix="/api/v1", tags=["storage"])

ModelPath = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[^\x00/]+$")]
DaysField = Annotated[int | None, Field(ge=0, le=36500, description="days kept; 0: everything; null: the default")]


class RetentionOverride(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"raw_days": 30, "rollup_1h_days": 730}]}
    )

    raw_days: DaysField = None
    rollup_1m_days: DaysField = None
    rollup_1h_days: DaysField = None


def _retention(services: Any) -> Retention:
    retention: Retention | None = services.retention
    if retention is None:
        raise StorageUnavailable("retention is not running", retry_after=1)
    return retention


def _days(days: Days) -> dict[str, int | None]:
    return {"raw_days": days.raw, "rollup_1m_days": days.rollup_1m, "rollup_1h_days": days.rollup_1h}


@router.get("/storage", **answers(StorageUsage))
async def storage(services: ServicesDep, _: Viewer, top: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
    retention = _retention(services)
    usage = await retention.usage(top=top)
    # The alert's verdict, hysteresis included: from the open alert's severity, as the pass decides it.
    alerts = services.budget_alerts
    state = retention.budget_state(usage, await alerts.open_severity() if alerts is not None else None)
    last = retention.last
    return {
        "tiers": {t: {"rows": usage.tiers[t].rows, "bytes": usage.tiers[t].bytes} for t in TIERS},
        "rows_estimated": usage.rows_estimated,
        "total_bytes": usage.total_bytes,
        "database_bytes": usage.database_bytes,
        "top_devices": usage.top_devices,
        "points_per_day": usage.points_per_day,
        "growth_bytes_per_day": usage.growth_bytes_per_day,
        "budget_bytes": usage.budget_bytes,
        "days_left": usage.days_left,
        "warning": state is not None,
        "budget_alert": state.severity if state else None,
        "retention": {
            "defaults": _days(retention.policies.defaults),
            "last_pass": {"deleted": last.deleted, "seconds": last.seconds} if last else None,
        },
    }


@router.get("/retention", **answers(RetentionPolicies))
async def get_retention(services: ServicesDep, _: Viewer) -> dict[str, Any]:
    retention = _retention(services)
    await retention.reload()
    policies = retention.policies
    return {
        "defaults": _days(policies.defaults),
        "models": [{"model": m, **_days(d)} for m, d in sorted(policies.models.items())],
    }


@router.put("/retention/models/{model}", **answers(ModelRetention))
async def set_model_retention(
    model: ModelPath, body: RetentionOverride, services: ServicesDep, _: Operator
) -> dict[str, Any]:
    retention = _retention(services)
    days = Days(body.raw_days, body.rollup_1m_days, body.rollup_1h_days)
    await retention.repo.set_model(model, days, now_ms=now_ms())
    await retention.reload()
    return {"model": model, **_days(days)}


@router.delete("/retention/models/{model}", status_code=204)
async def delete_model_retention(model: ModelPath, services: ServicesDep, _: Operator) -> Response:
    retention = _retention(services)
    await retention.repo.delete_model(model)
    await retention.reload()
    return Response(status_code=204)
