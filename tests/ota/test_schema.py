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
