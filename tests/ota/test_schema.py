"""The OTA tables the models describe are the ones migration 0004 creates (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from telemetra.config import Settings
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.schema import Base

OTA_TABLES = {"firmware", "ota_jobs", "ota_job_nodes"}


def _ota_diffs(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    diffs = compare_metadata(context, Base.metadata)
    flat = [d for group in diffs for d in (group if isinstance(group, list) else [group])]
    return [d for d in flat if any(str(part) in OTA_TABLES or getattr(part, "name", None) in OTA_TABLES
                                   or getattr(getattr(part, "table", None), "name", None) in OTA_TABLES
                                   for part in d)]  # fmt: skip


async def test_models_match_the_migration(database_url: str, tmp_path: Any) -> None:
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            diffs = await conn.run_sync(_ota_diffs)
    finally:
        await engine.dispose()
    assert diffs == []


def test_the_openapi_document_declares_the_ota_api(tmp_path: Any) -> None:
    """Schemathesis will run against it: every OTA path is there with its models, and building it warns
    about nothing (a duplicate operation id, for one)."""
    import warnings

    from telemetra.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}", tmp_path / "data"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doc = app.openapi()
    paths = doc["paths"]
    for path in (
        "/api/v1/firmware/upload", "/api/v1/firmware", "/api/v1/firmware/{firmware_id}",
        "/api/v1/firmware/{firmware_id}/stable", "/api/v1/firmware/{firmware_id}/download", "/ota/manifest.json",
        "/ota/public-key", "/api/v1/ota/updates", "/api/v1/ota/updates/pending", "/api/v1/ota/updates/{update_id}",
        "/api/v1/ota/updates/{update_id}/start", "/api/v1/ota/updates/{update_id}/complete",
        "/api/v1/ota/updates/{update_id}/fail", "/api/v1/ota/updates/{update_id}/node/{node_id}/progress",
        "/api/v1/ota/updates/{update_id}/pause", "/api/v1/ota/updates/{update_id}/resume",
        "/api/v1/ota/updates/{update_id}/cancel",
    ):  # fmt: skip
        assert path in paths, path
    upload = paths["/api/v1/firmware/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"] == {"type": "string", "format": "binary"}
    listed = paths["/api/v1/ota/updates"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listed["type"] == "array"  # a bare array, as iotmesh's dashboard reads it
