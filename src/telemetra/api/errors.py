"""Every refusal in one JSON shape: ``{"detail": reason, "field": field, "code": code}``.
Nothing a client sends may produce a 500: domain errors map to their 4xx here, and request validation
errors name the field."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from telemetra.domain.errors import TelemetraError
from telemetra.storage.faults import DatabaseState, describe, is_transient, sqlstate

log = logging.getLogger(__name__)


class ErrorReason(BaseModel):
    field: str = Field(description="where: body.name, query.offset, path.device_id…")
    reason: str


# Declared on every operation of the OpenAPI document by ``api.openapi``.
class ErrorBody(BaseModel):
    """The body of every refusal (4xx) and of an outage (503)."""

    detail: str = Field(description="what is wrong, for a person")
    field: str | None = Field(description="the request value at fault (a body field, query or path parameter)")
    code: str = Field(description="invalid, malformed, unauthorized, forbidden, not_found, conflict, gone, …")
    errors: list[ErrorReason] | None = Field(None, description="every failed check, on request validation (422)")


def error_response(
    status: int, code: str, detail: str, field: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body = {"detail": detail, "field": field, "code": code}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _domain(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TelemetraError)
    retry_after = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return error_response(exc.status, exc.code, exc.reason, exc.field, headers)


async def _validation(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        # loc is ("body", <byte offset>): the body as a whole is what is wrong.
        field = "body"
    else:
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header"))
    details = [{"field": ".".join(str(p) for p in e.get("loc", ())), "reason": e.get("msg", "")} for e in errors[:20]]
    body = {
        "detail": f"{field or 'request'}: {first.get('msg', 'invalid')}",
        "field": field or None,
        "code": "invalid",
        "errors": details,
    }
    return Response(orjson.dumps(body, default=str), status_code=422, media_type="application/json")


async def _http(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, "http_error", str(exc.detail), None, dict(exc.headers or {}))


def _database_fault(state: DatabaseState) -> Any:
    """A database error that reached the API: an outage is 503 + Retry-After (logged once per outage by
    ``DatabaseState``, not once per request); a value the database refuses that validation let through is
    422 — both say what happened without a traceback. Anything else is a bug and stays a 500."""

    async def handle(_request: Request, exc: Exception) -> Response:
        if is_transient(exc):
            state.failed(exc)
            return error_response(
                503,
                "storage_unavailable",
                "storage is unavailable; nothing was changed, retry later",
                None,
                {"Retry-After": "5"},
            )
        state_code = sqlstate(exc) or ""
        if state_code.startswith("22") or isinstance(exc, OverflowError):
            log.warning("a request value reached the database and was refused: %s", describe(exc))
            return error_response(422, "invalid", f"a value in the request cannot be stored: {describe(exc)}")
        raise exc

    return handle


def install_error_handlers(app: FastAPI, database: DatabaseState) -> None:
    app.add_exception_handler(TelemetraError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    fault = _database_fault(database)
    for kind in (DBAPIError, SATimeoutError, OSError, OverflowError, asyncpg.PostgresError, asyncpg.InterfaceError):
        app.add_exception_handler(kind, fault)
