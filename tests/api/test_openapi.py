"""The OpenAPI document walked operation by operation: each has a typed 2xx answer, its refusals reference
the real error body (``ErrorBody``, what ``api.errors`` answers), and says how to authenticate — checked
against what the app does with a key-less request. No internal notes reach the descriptions.

(tests/api/test_openapi_fuzz.py holds the answers to these schemas; this one is about the document.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from telemetra.api.openapi import BEARER, KEY_OPTIONAL, KEY_REQUIRED
from telemetra.app import create_app
from tests.conftest import make_settings, running_app

METHODS = ("get", "put", "post", "delete", "patch")
ERROR_REF = "#/components/schemas/ErrorBody"
# Answer without a key by design: health probes, a device trading its claim code, paku's OTA probe.
PUBLIC = {
    "GET /health",
    "GET /api/v1/health",
    "GET /api/health",
    "GET /compat/telemetry-app/api/v1/health",
    "GET /api/device/health",
    "POST /api/v1/provision/claim",
}
# Words that belong to this repository's history, not to a user's API reference.
INTERNAL = re.compile(
    r"\bseeds? \d{3}\b|\bG\d\b|\bissue \d+|\bTODO\b|\bFIXME\b|\.py\b|CLIENTS\.md|SPEC\.md|Queries\.", re.I
)


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data_dir = tmp_path_factory.mktemp("openapi")
    settings = make_settings(f"sqlite+aiosqlite:///{data_dir / 'telemetra.db'}", data_dir / "data")
    doc: dict[str, Any] = create_app(settings).openapi()
    return doc


def operations(document: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{method.upper()} {path}", item[method])
        for path, item in document["paths"].items()
        for method in METHODS
        if method in item
    ]


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return found


def test_every_operation_has_a_typed_success_answer(document: dict[str, Any]) -> None:
    untyped = []
    for label, operation in operations(document):
        successes = {status: a for status, a in operation["responses"].items() if status.startswith("2")}
        assert successes, f"{label}: no 2xx answer"
        for status, answer in successes.items():
            if status == "204":
                assert "content" not in answer, f"{label}: a 204 has no body"
                continue
            assert answer.get("content"), f"{label} {status}: no content"
            for media_type, content in answer["content"].items():
                schema = resolve(document, content.get("schema", {}))
                assert schema, f"{label} {status} {media_type}: empty schema"
                if media_type == "application/json":
                    # A bare "any object" says nothing: the answers of our own API name their fields.
                    bare = schema.get("type") == "object" and not schema.get("properties")
                    if bare or (
                        schema.get("type") == "array" and not resolve(document, schema["items"]).get("properties")
                    ):
                        untyped.append(label)
    assert not untyped, "\n".join(untyped)


def test_every_refusal_references_the_error_body(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert set(schemas["ErrorBody"]["required"]) == {"detail", "field", "code"}
    assert "HTTPValidationError" not in schemas
    for label, operation in operations(document):
        answers = operation["responses"]
        assert "4XX" in answers and "422" in answers, label
        for status, answer in answers.items():
            if status.startswith("4") and "content" in answer:
                for content in answer["content"].values():
                    assert content["schema"] == {"$ref": ERROR_REF}, f"{label} {status}"


def test_security_is_declared_instead_of_key_headers(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes[BEARER]["type"] == "http" and schemes[BEARER]["scheme"] == "bearer"
    for label, operation in operations(document):
        headers = [p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"]
        assert "x-api-key" not in headers and "authorization" not in headers, label
        if label in PUBLIC:
            assert "security" not in operation, label
        else:
            assert operation.get("security") in (KEY_REQUIRED, KEY_OPTIONAL), label
            for requirement in operation["security"]:
                assert set(requirement) <= set(schemes), label


def test_main_request_bodies_have_examples(document: dict[str, Any]) -> None:
    main = [
        "POST /api/v1/ingest",
        "POST /api/v1/ingest/batch",
        "POST /api/v1/devices",
        "PATCH /api/v1/devices/{device_id}",
        "POST /api/v1/devices/{device_id}/commands",
        "PUT /api/v1/devices/{device_id}/config",
        "POST /api/v1/rules",
        "POST /api/v1/claim-codes",
        "POST /api/v1/ota/updates",
    ]
    by_label = dict(operations(document))
    for label in main:
        content = by_label[label]["requestBody"]["content"]["application/json"]
        schema = resolve(document, content["schema"])
        text = repr(content) + repr(schema)
        assert "example" in text, f"{label}: no example"


def test_no_internal_notes_in_descriptions(document: dict[str, Any]) -> None:
    leaks = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("description", "summary") and isinstance(value, str) and INTERNAL.search(value):
                    leaks.append(f"{where}: {value[:80]!r}")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    walk(document, "")
    tags = {tag for _label, operation in operations(document) for tag in operation.get("tags", [])}
    leaks += [f"tag {tag!r}" for tag in tags if INTERNAL.search(tag)]
    assert not leaks, leaks


async def test_the_declared_security_is_what_the_app_does(tmp_path: Path, document: dict[str, Any]) -> None:
    """A key-less request to an operation that requires a key is a 401 (before any value is looked at);
    a public one is never a 401. One backend: which callers get in does not depend on the database."""
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}", tmp_path / "data")
    async with running_app(settings) as running:
        for label, operation in operations(document):
            method, path = label.split(" ", 1)
            url = re.sub(r"\{[^}]+\}", "x1", path)
            r = await running.client.request(method, url)
            if operation.get("security") == KEY_REQUIRED:
                assert r.status_code == 401, f"{label}: {r.status_code} {r.text[:200]}"
                assert r.json()["code"] == "unauthorized", label
            elif label in PUBLIC:
                assert r.status_code != 401, f"{label}: {r.status_code}"
