"""Every refusal in one JSON shape: ``{"detail": reason, "field": field, "code": code}``.
Nothing a client sends may produce a 500: domain errors map to their 4xx here, and request validation
errors name the field."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from telemetra.domain.errors import Overloaded, TelemetraError
from telemetra.ingest.queue import StorageUnavailable

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, detail: str, field: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body = {"detail": detail, "field": field, "code": code}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def _domain(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TelemetraError)
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
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


async def _storage(_request: Request, exc: Exception) -> Response:
    log.warning("storage unavailable: %s", exc)
    return error_response(
        503,
        "storage_unavailable",
        "storage is unavailable; nothing was stored, retry later",
        None,
        {"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TelemetraError, _domain)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(StorageUnavailable, _storage)
