"""The OpenAPI document says what the API answers when it refuses.

FastAPI documents its own validation body (``HTTPValidationError``: ``{"detail": [...]}``) on every
operation with parameters, and nothing for the other refusals — but ``api.errors`` answers every refusal
as ``{detail, field, code}`` (plus ``errors`` on validation) and an outage as 503 with ``Retry-After``.
``document_errors`` rewrites the generated document once, in one place, for every router (later ones
included): 422 and the other 4xx with ``ErrorBody``, 503 with ``ErrorBody`` and its header. An operation
that declares its own answer for one of these statuses (``/health``'s 503 is its report) keeps it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from telemetra.api.errors import ErrorBody

_REF = "#/components/schemas/{model}"
_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# FastAPI's own validation models: referenced only by the 422s replaced below.
_FASTAPI_MODELS = ("HTTPValidationError", "ValidationError")


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


def add_error_answers(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a generated OpenAPI document) with Telemetra's error answers on every operation."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in ErrorBody.model_json_schema(ref_template=_REF).pop("$defs", {}).items():
        schemas[name] = schema
    schemas["ErrorBody"] = {k: v for k, v in ErrorBody.model_json_schema(ref_template=_REF).items() if k != "$defs"}
    for item in document.get("paths", {}).values():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
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
            app.openapi_schema = add_error_answers(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
