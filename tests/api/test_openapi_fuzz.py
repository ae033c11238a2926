"""Schemathesis against the OpenAPI document (issue 6): every documented operation, with generated valid
and invalid values, answers no 5xx and answers what the document says (status, content type, headers,
body schema) — and refuses what the document says is invalid. Runs in process against the ASGI app, on
SQLite and on PostgreSQL, with the admin key and with a device key.

Bounded and reproducible: a fixed seed; per operation the document's examples, schemathesis's coverage
cases (each constraint's boundaries and violations: lengths, ranges, patterns, types, NUL) and
``FUZZ_EXAMPLES`` generated ones; no stateful phase. About a minute and a half for all 4 × 37 operations.
``TELEMETRA_FUZZ_EXAMPLES=200`` searches longer locally.

The admin's positive cases act half the time on a device that exists (so writes reach the database with
the generated values) and otherwise on the generated id; the device's cases always name the device itself
(anything else is a 403 before any value is used).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from anyio.from_thread import start_blocking_portal
from schemathesis import GenerationMode, checks
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import derive_operation_seed, overrides
from schemathesis.generation.hypothesis.builder import HypothesisTestConfig, HypothesisTestMode, create_test
from schemathesis.python import asgi

from telemetra.app import create_app
from tests.conftest import ADMIN, make_settings, postgres_database

SEED = 20261202
FUZZ_EXAMPLES = int(os.environ.get("TELEMETRA_FUZZ_EXAMPLES", "5"))
COVERAGE = os.environ.get("TELEMETRA_FUZZ_COVERAGE", "1") == "1"
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
# Long polls and two-way commands would hold a case for up to a minute; the waiting itself is tested in
# tests/mqtt/test_commands.py.
MAX_WAIT_S = 0.05
TARGET_ID = "fuzz-target"  # the admin's device that exists
OWN_ID = "fuzz-device"  # the device whose key the device cases use


@dataclass
class Target:
    app: Any
    backend: str
    device_key: str


def _create(client: Any, device_id: str) -> str:
    r = client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["credentials"]["api_key"]
    return key


def _labels() -> list[str]:
    """Every documented operation; the document is the app's own (building the app touches no database)."""
    settings = make_settings("sqlite+aiosqlite:///:memory:", Path(tempfile.gettempdir()) / "telemetra-unused")
    document = create_app(settings).openapi()
    methods = ("get", "put", "post", "delete", "patch")
    return [f"{m.upper()} {path}" for path, item in document["paths"].items() for m in item if m in methods]


LABELS = _labels()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    data_dir: Path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with start_blocking_portal() as portal:
        if request.param == "postgres":
            # The database is made and dropped on a loop of its own; the app runs on schemathesis's.
            database = portal.wrap_async_context_manager(postgres_database())
            url = database.__enter__()
        else:
            database, url = None, f"sqlite+aiosqlite:///{data_dir / 'telemetra.db'}"
        try:
            app = create_app(make_settings(url, data_dir / "data"))
            # Entering a client starts the app's lifespan on schemathesis's ASGI loop, where it stays (for
            # every case's client too) until shutdown_lifespans().
            with asgi.get_client(app) as client:
                _create(client, TARGET_ID)
                own_key = _create(client, OWN_ID)
            try:
                yield Target(app, request.param, own_key)
            finally:
                asgi.shutdown_lifespans()
        finally:
            if database is not None:
                database.__exit__(None, None, None)


@pytest.fixture(scope="module", params=["admin", "device"])
def caller(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def schema(target: Target, caller: str) -> Any:
    """The app's document, with the caller's key in every request (it replaces generated auth headers: an
    unknown key is a 401 before any value is used) and, for a device, its own id in every path (another id
    is a 403 before any value is used)."""
    config: dict[str, Any] = {
        "seed": SEED,
        "headers": {"X-API-Key": ADMIN["X-API-Key"] if caller == "admin" else target.device_key},
        "generation": {"max-examples": FUZZ_EXAMPLES, "mode": "all", "database": "none"},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": COVERAGE}, "stateful": {"enabled": False}},
    }
    if caller == "device":
        config["parameters"] = {"path.device_id": OWN_ID}
    return schemathesis.openapi.from_asgi("/openapi.json", target.app, config=SchemathesisConfig.from_dict(config))


def _hypothesis_test(schema: Any, operation: Any, test: Any) -> Any:
    """What ``schema.parametrize()`` builds for one operation (its pytest plugin predates pytest 9.2's node
    ids): the document's examples, the coverage cases and ``max-examples`` generated ones, seeded."""
    config = schema.config
    modes = [HypothesisTestMode.EXAMPLES, HypothesisTestMode.FUZZING]
    if COVERAGE:
        modes.append(HypothesisTestMode.COVERAGE)
    return create_test(
        operation=operation,
        test_func=test,
        config=HypothesisTestConfig(
            project=config,
            modes=modes,
            settings=config.get_hypothesis_settings(operation=operation, phase="fuzzing"),
            seed=derive_operation_seed(config.seed, operation.label),
            override=overrides.with_config_headers(config, operation=operation),
        ),
    )


def _aim(case: Any, caller: str) -> None:
    path = case.path_parameters
    positive = case.meta is None or case.meta.generation.mode is GenerationMode.POSITIVE
    if caller == "admin" and positive and path and "device_id" in path:
        if zlib.crc32(str(path["device_id"]).encode()) % 2 == 0:
            path["device_id"] = TARGET_ID
    query = case.query
    if query and "wait" in query:
        try:
            wait = float(query["wait"])  # the coverage phase sends query values as text
        except (TypeError, ValueError):
            return
        if wait > MAX_WAIT_S:
            query["wait"] = MAX_WAIT_S


def _checks(case: Any) -> list[Any]:
    """Every check, except that an object or array generated for a query value is not judged as invalid
    data: a query string holds only text, so it goes out as the same parameter repeated (``?keys=a&keys=b``
    for ``{"a": …, "b": …}``), of which the server reads the last — a valid text, the same request as a
    positive case's. Every documented query value is a scalar; such a case is still checked for no 5xx and
    an answer as documented."""
    negative = case.meta is not None and case.meta.generation.mode is GenerationMode.NEGATIVE
    if negative and any(isinstance(value, dict | list) for value in (case.query or {}).values()):
        return [check for check in CHECKS if check is not checks.negative_data_rejection]
    return CHECKS


@pytest.mark.parametrize("label", LABELS)
def test_operation_answers_as_documented(target: Target, schema: Any, caller: str, label: str) -> None:
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label

    def run(case: Any) -> None:
        _aim(case, caller)
        case.call_and_validate(checks=_checks(case))
        if case.method in ("DELETE", "POST") and (case.path_parameters or {}).get("device_id") == TARGET_ID:
            with asgi.get_client(target.app) as client:
                if client.get(f"/api/v1/devices/{TARGET_ID}", headers=ADMIN).status_code == 404:
                    _create(client, TARGET_ID)  # deleted by this case: the next ones act on it again

    _hypothesis_test(schema, operation, run)()
