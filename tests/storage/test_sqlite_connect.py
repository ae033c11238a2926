"""A new SQLite connection does not wait for the write lock: the pool grows under ingest load (an API read
beside the writer's back-to-back commits), and each new connection used to stall in its set-up PRAGMAs
until the writer let go — up to the 30 s timeout, then "database is locked"."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sqlalchemy import text

from telemetra.storage.database import create_engine
from tests.conftest import make_settings


async def test_a_new_connection_opens_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "telemetra.db"
    settings = make_settings(f"sqlite+aiosqlite:///{path}", tmp_path)
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:  # a new file: set up as the app sets it up
            await conn.execute(text("CREATE TABLE t (x INTEGER)"))
            assert (await conn.execute(text("PRAGMA auto_vacuum"))).scalar_one() == 2  # incremental
    finally:
        await engine.dispose()

    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO t VALUES (1)")
        # Positive control: the lock is really held — what the set-up used to run waits for it, and fails.
        probe = sqlite3.connect(path, timeout=0.2, isolation_level=None)
        try:
            try:
                probe.execute("PRAGMA auto_vacuum=INCREMENTAL")
            except sqlite3.OperationalError as exc:
                assert "locked" in str(exc)
            else:
                raise AssertionError("the writer does not hold the lock: this test proves nothing")
        finally:
            probe.close()

        engine = create_engine(settings)  # a fresh pool: its first connection is new
        try:
            async with asyncio.timeout(5), engine.connect() as conn:
                assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0  # committed rows only
                assert (await conn.execute(text("PRAGMA journal_mode"))).scalar_one() == "wal"
        finally:
            await engine.dispose()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
