"""Engine creation and schema migration. The engine is made by the app's lifespan (or the CLI), never at
import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from telemetra.config import Settings
from telemetra.storage.faults import DatabaseLocation

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def create_engine(settings: Settings) -> AsyncEngine:
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=False,
        # Settings like the JIT cost more than they save on our short, prepared statements.
        connect_args={"server_settings": {"jit": "off", "application_name": "telemetra"}},
    )


def database_location(database_url: str) -> DatabaseLocation:
    """Where the database is, for messages (never the password)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        return DatabaseLocation("sqlite", url.database or ":memory:")
    return DatabaseLocation(url.get_backend_name(), f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Takes effect only when the file is new (before the first table): retention then gives freed pages
    # back with ``PRAGMA incremental_vacuum`` instead of keeping them (storage.retention). Set only then:
    # on an existing file the PRAGMA still waits for the write lock (it writes the header), so every new
    # pool connection stalled behind the ingest writer's commits, up to the 30 s timeout.
    cursor.execute("PRAGMA page_count")
    if cursor.fetchone()[0] == 0:
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    # WAL lets readers run beside the single writer; NORMAL sync is durable across an application crash
    # (only a power loss can take the last commits) and is what makes group commit fast on SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# One FIFO lock per SQLite engine and event loop (an asyncio.Lock belongs to one loop; tests run several).
_GATES: weakref.WeakKeyDictionary[Any, dict[asyncio.AbstractEventLoop, asyncio.Lock]] = weakref.WeakKeyDictionary()


def _gate(engine: AsyncEngine) -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    return _GATES.setdefault(engine.sync_engine, {}).setdefault(loop, asyncio.Lock())


async def after_gated_writers(engine: AsyncEngine) -> None:
    """For the ingest writer, before each transaction: when short gated writers hold or wait for the gate,
    let them go first. It does not take the gate itself when nobody waits: holding it for every group
    commit serialised the writer's own commits in flight (the next one's Python work no longer overlapped
    the current one's SQLite work), which doubled commit→delivery latency under load. A gated writer
    still waits for at most the commit under way: the writer starts no other until the gate is free."""
    if engine.dialect.name != "sqlite":
        return
    gate = _gate(engine)
    if gate.locked():
        async with gate:
            pass


@contextlib.asynccontextmanager
async def write_gate(engine: AsyncEngine) -> AsyncIterator[None]:
    """Around a write transaction on SQLite: this process's writers take SQLite's single write lock in
    turn. Without it a writer that finds the lock taken sleeps in SQLite's busy handler (1, 2, 5 … 100 ms
    between looks) and, beside the ingest writer's back-to-back group commits, finds it taken again at
    almost every look — a short webhook or alert write waited 0.1–2 s. Queued here, it goes right after
    the commit under way (the ingest writer waits in ``after_gated_writers`` before its next), and the
    ingest writer waits for at most the short transactions queued. Only
    writers of this process queue (another process, or a writer that does not take the gate, still meets
    the busy handler). PostgreSQL has row locks: nothing to queue."""
    if engine.dialect.name != "sqlite":
        yield
        return
    async with _gate(engine):
        yield


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision``. Safe to run at every start and from several processes on
    PostgreSQL (an advisory lock serialises concurrent starts)."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7355608)")
        await conn.run_sync(_upgrade, revision)
    log.info("schema at %s", revision)


def migrate_blocking(engine: AsyncEngine, revision: str = "head") -> None:
    asyncio.run(migrate(engine, revision))
