"""One app per test module and backend, for modules whose tests only read and write their own devices.

Starting the app (migrations included) costs about half a second on PostgreSQL; a module of twenty tests
on two backends would spend most of its time there. Tests that share an app use device ids of their own
(``unique``) and never count anything global. Tests that need other settings use ``app_factory``.

Usage in a test module::

    shared = shared_app_fixture(device_api_keys=[FLEET_KEY])
    pytestmark = pytest.mark.asyncio(loop_scope="module")  # the tests run on the fixture's loop
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.conftest import Running, make_settings, postgres_database, running_app

BACKENDS = ["sqlite", "postgres"]


def shared_app_fixture(**overrides: Any) -> Any:
    @pytest_asyncio.fixture(scope="module", loop_scope="module", params=BACKENDS, name="shared")
    async def shared(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> AsyncIterator[Running]:
        data_dir = tmp_path_factory.mktemp(f"shared-{request.param}")
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{data_dir / 'telemetra.db'}"
            async with running_app(make_settings(url, data_dir / "data", **overrides)) as running:
                yield running
            return
        async with (
            postgres_database() as url,
            running_app(make_settings(url, data_dir / "data", **overrides)) as running,
        ):
            yield running

    return shared


def unique(prefix: str) -> str:
    """A device id (or model, or search term) no other test of the module uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def lenient_client(running: Running) -> httpx.AsyncClient:
    """A client on the same app that answers an unhandled exception with the 500 a real server would send,
    instead of re-raising it into the test: a cell that should be 4xx then fails as "got 500", quickly."""
    transport = httpx.ASGITransport(app=running.app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")
