"""The OpenAPI document says what the API answers when it refuses.

FastAPI documents its own validation body (``HTTPValidationError``: ``{"detail": [...]}``) on every
operation with parameters, and nothing for the other refusals — but ``api.errors`` answers every refusal
as ``{detail, field, code}`` (plus ``errors`` on validation) and an outage as 503 with ``Retry-After``.
``document_errors`` rewrites the generated document once, in one place, for every router (later ones
included): 422 and the other 4xx with ``ErrorBody``, 503 with ``ErrorBody`` and its header. An operation
that declares its own answer for one of these statuses (``/health``'s 503 is its report) keeps it.

It also declares how a caller authenticates — ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` —
as security schemes (``/docs`` then has an Authorize button): every operation whose route depends on a
caller gets ``security`` (a key required, or optional where a key-less caller is let in), in place of the
two header parameters the dependency would otherwise document on each operation.

``answers(Model)`` documents an answer's model on a route that builds its body itself (a dict written by
orjson, a ``JSONResponse``) without FastAPI validating and re-encoding every answer through it; the
schemathesis test (tests/api/test_openapi_fuzz.py) holds the answers to these models.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from telemetra.api import deps
from telemetra.api.errors import ErrorBody

_REF = "#/components/schemas/{model}"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# FastAPI's own validation models: referenced only by the 422s replaced below.
_FASTAPI_MODELS = ("HTTPValidationError", "ValidationError")


API_KEY, BEARER = "ApiKey", "Bearer"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    API_KEY: {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "an admin, operator, viewer, device, gateway or fleet key",
    },
    BEARER: {"type": "http", "scheme": "bearer", "description": "the same key as `Authorization: Bearer <key>`"},
}
KEY_REQUIRED: list[dict[str, list[str]]] = [{API_KEY: []}, {BEARER: []}]
# A key-less caller is let in too (what it may do then depends on the settings).
KEY_OPTIONAL: list[dict[str, list[str]]] = [*KEY_REQUIRED, {}]
_KEY_HEADERS = ("x-api-key", "authorization")
_REQUIRING = (deps.require_caller, deps.require_viewer, deps.require_operator, deps.require_admin)


def answers(
    model: Any, status: int = 200, description: str = "Successful Response", *, unhealthy: str | None = None
) -> dict[str, Any]:
    """Route keyword arguments that document ``model`` as the ``status`` answer (see the module's text);
    with ``unhealthy``, also as the 503 answer (a health report is the same body either way)."""
    documented: dict[int, Any] = {status: {"model": model, "description": description}}
    if unhealthy is not None:
        documented[503] = {"model": model, "description": unhealthy}
    return {"response_model": None, "responses": documented}


def _calls(dependant: Dependant) -> set[Any]:
    found = {dependant.call}
    for sub in dependant.dependencies:
        found |= _calls(sub)
    return found


def _api_routes(app: FastAPI) -> list[Any]:
    """The documented API routes with their full paths (FastAPI ≥ 0.165 keeps included routers nested)."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:  # older FastAPI: included routes are copied into app.routes
        contexts: Any = app.routes
    else:
        contexts = iter_route_contexts(app.routes)
    return [
        route
        for route in contexts
        if isinstance(getattr(route, "original_route", route), APIRoute) and route.include_in_schema
    ]


def _security_by_operation(app: FastAPI) -> dict[tuple[str, str], list[dict[str, list[str]]]]:
    """(path, method) → the security of each documented route that depends on a caller."""
    security: dict[tuple[str, str], list[dict[str, list[str]]]] = {}
    for route in _api_routes(app):
        calls = _calls(route.dependant)
        if any(require in calls for require in _REQUIRING):
            chosen = KEY_REQUIRED
        elif deps.get_principal in calls:
            chosen = KEY_OPTIONAL
        else:
            continue
        for method in route.methods:
            security[(route.path_format, method.lower())] = chosen
    return security


def _answer(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="ErrorBody")}}},
    }
    if retry_after:
        answer["headers"] = {
            "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
        }
    return answer


ERROR_ANSWERS: dict[str, dict[str, Any]] = {
    "422": _answer("a value in the request is invalid; `field` names it"),
    "4XX": _answer("refused (401 no or unknown key, 403 not allowed, 404 unknown, 409 conflict, …)"),
    "503": _answer("storage unavailable or ingest overloaded: nothing was changed; retry later", retry_after=True),
}


def _is_fastapi_validation(answer: dict[str, Any]) -> bool:
    schema = answer.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def add_error_answers(
    document: dict[str, Any], security: dict[tuple[str, str], list[dict[str, list[str]]]] | None = None
) -> dict[str, Any]:
    """``document`` (a generated OpenAPI document) with Telemetra's error answers on every operation, and
    ``security`` (by path and method; an operation's own ``security`` wins) in place of key headers."""
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
    schemas = components.setdefault("schemas", {})
    for name, schema in ErrorBody.model_json_schema(ref_template=_REF).pop("$defs", {}).items():
        schemas[name] = schema
    schemas["ErrorBody"] = {k: v for k, v in ErrorBody.model_json_schema(ref_template=_REF).items() if k != "$defs"}
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            chosen = operation.get("security") or (security or {}).get((path, method))
            if chosen is not None:
                operation["security"] = chosen
                parameters = [
                    p
                    for p in operation.get("parameters", [])
                    if not (p.get("in") == "header" and p.get("name", "").lower() in _KEY_HEADERS)
                ]
                if parameters:
                    operation["parameters"] = parameters
                else:
                    operation.pop("parameters", None)
            answers = operation.setdefault("responses", {})
            if "422" in answers and _is_fastapi_validation(answers["422"]):
                del answers["422"]
            for status, answer in ERROR_ANSWERS.items():
                answers.setdefault(status, answer)
    for name in _FASTAPI_MODELS:
        schemas.pop(name, None)
    return document


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``, ``/docs``) carry the error answers."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = add_error_answers(generate(), _security_by_operation(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
