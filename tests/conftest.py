"""Shared fixtures. Every storage-touching test runs on SQLite and on a real PostgreSQL (a database
created for the test and dropped after). Without PostgreSQL the postgres cases skip locally but FAIL
under CI=true, so a missing service can never hide behind a skip."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from telemetra.app import create_app
from telemetra.config import Settings

PG_ADMIN_URL = os.environ.get("TELEMETRA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ADMIN_KEY = "test-admin-key-0123456789abcdefghijklmnop"
ADMIN = {"X-API-Key": ADMIN_KEY}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_service(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing service fails the run instead of skipping)")
    pytest.skip(reason)


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    name = f"telemetra_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
        raise  # unreachable
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"
        return
    async with postgres_database() as url:
        yield url


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "data_dir": data_dir,
        "admin_keys": [ADMIN_KEY],
        "mqtt_port": 0,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Running:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings

    @property
    def services(self) -> Any:
        return self.app.state.services

    async def create_device(self, device_id: str, **fields: Any) -> str:
        """Register a device through the API; returns its secret."""
        r = await self.client.post("/api/v1/devices", json={"id": device_id, **fields}, headers=ADMIN)
        assert r.status_code == 201, r.text
        secret: str = r.json()["credentials"]["api_key"]
        return secret


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Running]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Running(app, client, settings)


AppFactory = Callable[..., AbstractAsyncContextManager[Running]]


@pytest.fixture
def app_factory(database_url: str, tmp_path: Path) -> AppFactory:
    """``async with app_factory(**settings) as t:`` — an isolated app on this test's database."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[Running]:
        return running_app(make_settings(database_url, tmp_path / "data", **overrides))

    return factory


@pytest.fixture
async def api(app_factory: AppFactory) -> AsyncIterator[Running]:
    async with app_factory() as running:
        yield running
