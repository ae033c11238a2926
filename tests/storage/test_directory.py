"""The registry cache on the auth hot path, against a real database: one lookup for a herd of misses, and
no stale answer kept from a lookup that raced a registry change."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event

from telemetra.config import Settings
from telemetra.storage.database import create_engine, migrate
from telemetra.storage.devices import DeviceRepository
from telemetra.storage.directory import DeviceDirectory
from telemetra.storage.faults import DatabaseLocation, DatabaseState


def _count_device_reads(engine: Any) -> list[str]:
    seen: list[str] = []

    def before(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM devices" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen


async def test_concurrent_misses_share_one_lookup(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        _, secret = await DeviceRepository(engine).create("d1", now_ms=1)
        assert secret is not None
        directory = DeviceDirectory(engine, state=DatabaseState(DatabaseLocation("test", "test")))
        reads = _count_device_reads(engine)
        found = await asyncio.gather(*(directory.by_secret(secret) for _ in range(20)))
        assert {info.id for info in found if info is not None} == {"d1"} and None not in found
        assert len(reads) == 1
        assert (await directory.get("d1")) is not None and len(reads) == 1  # by id: from the same entry
        assert await directory.by_secret("not-a-key") is None
    finally:
        await engine.dispose()


class _HeldDirectory(DeviceDirectory):
    """Holds each lookup's answer, read from the database, until the test lets it go."""

    def __init__(self, engine: Any, ttl_s: float = 5.0) -> None:
        super().__init__(engine, state=DatabaseState(DatabaseLocation("test", "test")), ttl_s=ttl_s)
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def _load(self, where: Any) -> Any:
        info = await super()._load(where)
        self.read.set()
        await self.release.wait()
        return info


async def test_a_lookup_that_raced_a_change_is_not_cached(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        repo = DeviceRepository(engine)
        _, secret = await repo.create("d1", now_ms=1)
        assert secret is not None
        directory = _HeldDirectory(engine)
        lookup = asyncio.create_task(directory.by_secret(secret))
        await directory.read.wait()  # it has read the device as enabled ...
        await repo.update("d1", now_ms=2, disabled=True)  # ... which is then disabled
        directory.invalidate("d1")
        directory.release.set()
        stale = await lookup
        assert stale is not None and not stale.disabled  # control: the raced answer was the old one
        info = await directory.by_secret(secret)
        assert info is not None and info.disabled  # read again, not remembered from before the change
    finally:
        await engine.dispose()


async def test_an_expired_entry_is_answered_while_one_refresh_runs(database_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(_env_file=None, database_url=database_url, data_dir=tmp_path))  # type: ignore[call-arg]
    try:
        await migrate(engine)
        _, secret = await DeviceRepository(engine).create("d1", now_ms=1)
        assert secret is not None
        directory = _HeldDirectory(engine, ttl_s=1.0)
        directory.release.set()
        assert await directory.by_secret(secret) is not None
        directory.release.clear()
        await asyncio.sleep(1.3)  # past the TTL (at most 1.2 s with jitter), within twice it (at least 1.6 s)
        directory.read.clear()
        answers = await asyncio.wait_for(asyncio.gather(*(directory.by_secret(secret) for _ in range(5))), 1)
        assert all(a is not None and a.id == "d1" for a in answers)  # answered while the refresh is held
        await asyncio.wait_for(directory.read.wait(), 5)  # and the refresh did go to the database
        directory.release.set()
    finally:
        await engine.dispose()
