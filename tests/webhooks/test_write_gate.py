"""On SQLite the webhooks' writes take their turn at the process's write gate, between the ingest writer's
commits, instead of polling for SQLite's write lock (which, beside back-to-back group commits, starved
them for seconds). With SQLite's busy handler switched off — meeting the lock is then an error at once —
enqueue, claim and record all succeed while another writer holds the lock in back-to-back transactions;
the positive control shows that a write that skips the gate does meet the lock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, update
from sqlalchemy.exc import OperationalError

from telemetra.config import Settings
from telemetra.domain.timeutil import now_ms
from telemetra.storage.database import create_engine, migrate, write_gate
from telemetra.storage.schema import WebhookRow
from telemetra.storage.webhooks import Outcome, WebhookRepository


def _no_busy_wait(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.close()


async def test_webhook_writes_wait_at_the_gate_not_at_the_lock(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path / 't.db'}", data_dir=tmp_path)  # type: ignore[call-arg]
    engine = create_engine(settings)
    event.listen(engine.sync_engine, "connect", _no_busy_wait)  # after create_engine's pragmas
    try:
        await migrate(engine)
        repo = WebhookRepository(engine)
        hook = await repo.create(
            {"name": "h", "url": "http://127.0.0.1:9/x", "events": ["*"], "secret": "s" * 32, "enabled": True},
            now_ms=now_ms(),
        )
        touch = update(WebhookRow).where(WebhookRow.id == hook.id)
        # The pool's connections opened beforehand: opening one runs the journal-mode pragma, which waits for
        # the lock with SQLite's own 30 s timeout (a matter of the pool, not of what is tested here).
        async with engine.connect(), engine.connect(), engine.connect():
            pass
        holding, release = asyncio.Event(), asyncio.Event()

        async def hold_once() -> None:
            async with write_gate(engine), engine.begin() as conn:
                await conn.execute(touch.values(updated_at=now_ms()))
                holding.set()
                await release.wait()

        # Positive control: past the gate, a write meets the lock the holder has.
        holder = asyncio.create_task(hold_once())
        await holding.wait()
        with pytest.raises(OperationalError, match="locked"):
            async with engine.begin() as conn:
                await conn.execute(touch.values(updated_at=0))
        release.set()
        await holder

        stop = asyncio.Event()
        commits = 0

        async def writer() -> None:  # the ingest writer: one transaction after another, each holding the lock
            nonlocal commits
            while not stop.is_set():
                async with write_gate(engine), engine.begin() as conn:
                    await conn.execute(touch.values(updated_at=now_ms()))
                    await asyncio.sleep(0.005)  # the work of a group commit, the lock held
                commits += 1

        busy = asyncio.create_task(writer())
        try:
            for i in range(20):
                rows = [{"webhook_id": hook.id, "event_key": f"k{i}", "event": "x", "device_id": None, "body": "{}"}]
                [delivery_id] = await repo.enqueue(rows, now_ms=now_ms())
                [claimed] = await repo.claim(now_ms=now_ms(), limit=10, lease_ms=60_000)
                assert claimed.id == delivery_id
                outcome = Outcome(delivery_id, now_ms(), True, None, 200, None, 1)
                await repo.record([outcome])
        finally:
            stop.set()
            await busy
        assert commits > 0  # the writer did run beside them
        counts = await repo.counts()
        assert counts[hook.id] == {"delivered": 20}
    finally:
        await engine.dispose()
