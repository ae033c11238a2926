"""Webhooks (issue 10): ``GET|POST /api/v1/webhooks``, ``GET|PATCH|DELETE /api/v1/webhooks/{id}``,
``POST /api/v1/webhooks/{id}/test``, ``POST /api/v1/webhooks/{id}/rotate-secret``, the delivery log
``GET /api/v1/webhooks/{id}/deliveries`` and ``POST /api/v1/webhooks/{id}/deliveries/{delivery_id}/retry``.

A webhook's secret signs its deliveries (``X-Telemetra-Signature``); it is shown once, in the answer that
creates (or replaces, or rotates) it, like a device's credentials — so creating and editing webhooks is for admin keys,
reading them and their log for operators."""

from __future__ import annotations

import secrets
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from telemetra.api.answers import (
    Webhook,
    WebhookCreated,
    WebhookDeliveries,
    WebhookDelivery,
    WebhookList,
    WebhookTestQueued,
)
from telemetra.api.deps import Admin, Operator, ServicesDep
from telemetra.api.openapi import answers
from telemetra.domain import webhooks as W
from telemetra.domain.errors import Conflict, InvalidInput, StorageUnavailable
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.ingest.documents import INT64_MAX
from telemetra.storage.schema import WebhookDeliveryRow, WebhookRow
from telemetra.webhooks import Webhooks

router = APIRouter(prefix="/api/v1", tags=["webhooks"])

WebhookIdPath = Annotated[int, Path(ge=1, le=INT64_MAX)]
DeliveryIdPath = Annotated[int, Path(ge=1, le=INT64_MAX)]


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise ValueError("an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise ValueError("an http:// or https:// URL with a valid port") from None
    return value


def _events(value: list[str]) -> list[str]:
    unknown = W.unknown_patterns(value)
    if unknown:
        raise ValueError(f"{unknown[0]!r} matches no event; events are {', '.join(W.EVENT_NAMES)}")
    return list(dict.fromkeys(value))


Url = Annotated[str, Field(min_length=8, max_length=2048), AfterValidator(_url)]
EventList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z*?._\[\]!-]+$")]],
    Field(min_length=1, max_length=100),
    AfterValidator(_events),
]
Secret = Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")]
WebhookName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]


class WebhookSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "ops chat",
                    "url": "https://hooks.example.com/telemetra",
                    "events": ["alert.*", "device.offline"],
                }
            ]
        },
    )

    url: Url
    events: EventList = Field(description="event names or patterns (`alert.*`, `*`)")
    name: WebhookName | None = None
    secret: Secret | None = Field(None, description="generated when not given; shown once")
    enabled: bool = True


class WebhookPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: Url | None = None
    events: EventList | None = None
    name: WebhookName | None = None
    secret: Secret | None = Field(None, description="a new signing secret (shown once, in this answer)")
    enabled: bool | None = None


def webhook_out(row: WebhookRow, counts: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "url": row.url,
        "events": list(row.events),
        "enabled": bool(row.enabled),
        "deliveries": {status: (counts or {}).get(status, 0) for status in W.STATUSES},
        "created_at": ms_to_iso(row.created_at),
        "updated_at": ms_to_iso(row.updated_at),
    }


def delivery_out(row: WebhookDeliveryRow) -> dict[str, Any]:
    def iso(ms: int | None) -> str | None:
        return ms_to_iso(ms) if ms is not None else None

    pending = row.status == W.PENDING
    return {
        "id": row.id,
        "event": row.event,
        "device_id": row.device_id,
        "status": row.status,
        "attempts": row.attempts,
        "response_status": row.response_status,
        "error": row.last_error,
        "duration_ms": row.duration_ms,
        "created_at": iso(row.created_at),
        "last_attempt_at": iso(row.last_attempt_at),
        "next_attempt_at": iso(row.next_attempt_at) if pending else None,
        "delivered_at": iso(row.delivered_at),
        "body": row.body,
    }


def _new_secret() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def _capability(services: Any) -> Webhooks:
    capability: Webhooks | None = services.webhooks
    if capability is None:
        raise StorageUnavailable("webhooks are not running", retry_after=1)
    return capability


@router.get("/webhooks", **answers(WebhookList))
async def list_webhooks(services: ServicesDep, _: Operator) -> dict[str, Any]:
    capability = _capability(services)
    counts = await capability.repo.counts()
    return {"webhooks": [webhook_out(w, counts.get(w.id)) for w in await capability.repo.list()]}


@router.post("/webhooks", status_code=201, **answers(WebhookCreated, 201))
async def create_webhook(body: WebhookSpec, services: ServicesDep, _: Admin) -> dict[str, Any]:
    capability = _capability(services)
    secret = body.secret or _new_secret()
    values = {
        "name": body.name or (urlsplit(body.url).hostname or body.url),
        "url": body.url,
        "events": body.events,
        "secret": secret,
        "enabled": body.enabled,
    }
    row = await capability.repo.create(values, now_ms=now_ms())
    await capability.reload()
    return webhook_out(row) | {"secret": secret}


@router.get("/webhooks/{webhook_id}", **answers(Webhook))
async def get_webhook(webhook_id: WebhookIdPath, services: ServicesDep, _: Operator) -> dict[str, Any]:
    capability = _capability(services)
    row = await capability.repo.get(webhook_id)
    return webhook_out(row, (await capability.repo.counts()).get(webhook_id))


@router.patch("/webhooks/{webhook_id}", **answers(WebhookCreated))
async def update_webhook(
    webhook_id: WebhookIdPath, body: WebhookPatch, services: ServicesDep, _: Admin
) -> dict[str, Any]:
    capability = _capability(services)
    values = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    nulls = [k for k, v in body.model_dump(exclude_unset=True).items() if v is None]
    if nulls:
        raise InvalidInput(f"{nulls[0]} cannot be null", field=nulls[0])
    row = await capability.repo.update(webhook_id, values, now_ms=now_ms())
    await capability.reload()
    answer = webhook_out(row, (await capability.repo.counts()).get(webhook_id))
    return answer | ({"secret": values["secret"]} if "secret" in values else {})


@router.post("/webhooks/{webhook_id}/rotate-secret", **answers(WebhookCreated))
async def rotate_webhook_secret(webhook_id: WebhookIdPath, services: ServicesDep, _: Admin) -> dict[str, Any]:
    """A new signing secret, generated here and shown once, in this answer. Every delivery sent after it
    is signed with the new secret, retries of older ones too (a process sharing the database follows
    within 5 s); give the receiver the new one. To set a secret of your own, PATCH `secret` instead."""
    capability = _capability(services)
    secret = _new_secret()
    row = await capability.repo.update(webhook_id, {"secret": secret}, now_ms=now_ms())
    await capability.reload()
    return webhook_out(row, (await capability.repo.counts()).get(webhook_id)) | {"secret": secret}


@router.delete("/webhooks/{webhook_id}", status_code=204)
async def delete_webhook(webhook_id: WebhookIdPath, services: ServicesDep, _: Admin) -> Response:
    capability = _capability(services)
    await capability.repo.delete(webhook_id)
    await capability.reload()
    return Response(status_code=204)


@router.post("/webhooks/{webhook_id}/test", status_code=202, **answers(WebhookTestQueued, 202))
async def test_webhook(webhook_id: WebhookIdPath, services: ServicesDep, _: Operator) -> dict[str, Any]:
    """A `webhook.test` event to this webhook now, whatever it subscribes to; its delivery shows in the log."""
    capability = _capability(services)
    row = await capability.repo.get(webhook_id)
    if not row.enabled:
        raise Conflict(f"webhook {webhook_id} is disabled", field="enabled")
    delivery_id = await capability.test(webhook_id)
    return {"delivery_id": delivery_id, "event": W.TEST}


@router.get("/webhooks/{webhook_id}/deliveries", **answers(WebhookDeliveries))
async def list_deliveries(
    webhook_id: WebhookIdPath,
    services: ServicesDep,
    _: Operator,
    status: Annotated[str | None, Query(pattern=f"^({'|'.join(W.STATUSES)})$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, description="a delivery id: older ones")] = None,
) -> dict[str, Any]:
    """The delivery log, newest first; `next_before` pages on."""
    capability = _capability(services)
    await capability.repo.get(webhook_id)
    rows = await capability.repo.deliveries(webhook_id, status=status, limit=limit, before_id=before)
    return {
        "webhook_id": webhook_id,
        "deliveries": [delivery_out(r) for r in rows],
        "next_before": rows[-1].id if len(rows) == limit else None,
    }


@router.post("/webhooks/{webhook_id}/deliveries/{delivery_id}/retry", status_code=202, **answers(WebhookDelivery, 202))
async def retry_delivery(
    webhook_id: WebhookIdPath, delivery_id: DeliveryIdPath, services: ServicesDep, _: Operator
) -> dict[str, Any]:
    """Send a delivered or failed delivery again, now, with a fresh count of attempts."""
    capability = _capability(services)
    row = await capability.repo.redeliver(webhook_id, delivery_id, now_ms=now_ms())
    capability.wake()
    return delivery_out(row)
