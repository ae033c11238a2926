"""Server-side rules as data (issue 10): ``GET|POST /api/v1/rules``, ``GET|PATCH|DELETE /api/v1/rules/{id}``.

A change applies at once in this process and within one presence sweep in the others; a changed rule
starts afresh (where it stood per device is forgotten), a deleted one clears its open alerts."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from telemetra.alerts.engine import RulesEngine
from telemetra.alerts.spec import RulePatch, RuleSpec
from telemetra.api.answers import Rule, RuleList
from telemetra.api.deps import Operator, ServicesDep, Viewer
from telemetra.api.openapi import answers
from telemetra.domain.errors import StorageUnavailable
from telemetra.domain.rules import check_rule
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.ingest.documents import INT64_MAX
from telemetra.storage.rules import RULE_FIELDS
from telemetra.storage.schema import RuleRow

router = APIRouter(prefix="/api/v1", tags=["rules"])

RuleIdPath = Annotated[int, Path(ge=1, le=INT64_MAX)]


def rule_out(row: RuleRow) -> dict[str, Any]:
    return {
        "id": row.id,
        **{f: getattr(row, f) for f in RULE_FIELDS},
        "enabled": bool(row.enabled),
        "source": row.source,
        "created_at": ms_to_iso(row.created_at),
        "updated_at": ms_to_iso(row.updated_at),
    }


def _engine(services: Any) -> RulesEngine:
    engine: RulesEngine | None = services.rules
    if engine is None:
        raise StorageUnavailable("the rules engine is not running", retry_after=1)
    return engine


@router.get("/rules", **answers(RuleList))
async def list_rules(services: ServicesDep, _: Viewer) -> dict[str, Any]:
    return {"rules": [rule_out(r) for r in await _engine(services).repo.list()]}


@router.post("/rules", status_code=201, **answers(Rule, 201))
async def create_rule(body: RuleSpec, services: ServicesDep, _: Operator) -> dict[str, Any]:
    engine = _engine(services)
    row = await engine.repo.create(body.checked(), now_ms=now_ms())
    await engine.reload()
    return rule_out(row)


@router.get("/rules/{rule_id}", **answers(Rule))
async def get_rule(rule_id: RuleIdPath, services: ServicesDep, _: Viewer) -> dict[str, Any]:
    return rule_out(await _engine(services).repo.get(rule_id))


@router.patch("/rules/{rule_id}", **answers(Rule))
async def update_rule(rule_id: RuleIdPath, body: RulePatch, services: ServicesDep, _: Operator) -> dict[str, Any]:
    engine = _engine(services)
    current = await engine.repo.get(rule_id)
    values = {f: getattr(current, f) for f in RULE_FIELDS} | body.model_dump(exclude_unset=True)
    if values.get("enabled") is None:
        values["enabled"] = True
    if values.get("for_s") is None:
        values["for_s"] = 0
    for name in ("kind", "severity", "name"):  # null is no value for these: keep the rule's own
        if values.get(name) is None:
            values[name] = getattr(current, name)
    check_rule(values)
    row = await engine.repo.update(rule_id, values, now_ms=now_ms())
    await engine.reload()
    return rule_out(row)


@router.delete("/rules/{rule_id}", status_code=204)
async def delete_rule(rule_id: RuleIdPath, services: ServicesDep, _: Operator) -> Response:
    engine = _engine(services)
    cleared = await engine.repo.delete(rule_id, now_ms=now_ms())
    await engine.reload()
    await engine.announce(cleared, "cleared")
    return Response(status_code=204)
