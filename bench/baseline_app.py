"""The baseline for ``bench/http_ingest.py``: ingest the way seeds 001/002 do it.

A minimal FastAPI app, SQLAlchemy 2 async ORM, a ``readings`` table shaped like seed 002's (id UUID,
device_id, server-assigned timestamp, temperature, humidity, voltage). ``POST /ingest`` parses a pydantic
body, adds one ORM object and commits: one row, one transaction, one request. It skips the seeds'
per-request key lookup, so it is, if anything, a little faster than they were.

Run: ``BASELINE_DATABASE_URL=postgresql+asyncpg://... uvicorn --factory bench.baseline_app:app_from_env``.
SQLite gets the same pragmas as Telemetra (WAL, synchronous=NORMAL), so the ratio does not come from the journal mode.
"""

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel
from sqlalchemy import DateTime, String, Uuid, event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_URL = "sqlite+aiosqlite:///./baseline.db"


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "readings"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=lambda: datetime.now(UTC))
    temperature: Mapped[float | None]
    humidity: Mapped[float | None]
    voltage: Mapped[float | None]


class ReadingIn(BaseModel):
    device_id: str
    temperature: float | None = None
    humidity: float | None = None
    voltage: float | None = None


class ReadingOut(BaseModel):
    id: uuid.UUID
    status: str = "accepted"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str, pool_size: int) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def create_app(url: str, pool_size: int = 10) -> FastAPI:
    engine = make_engine(url, pool_size)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as s:
            yield s

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/ingest", status_code=201, response_model=ReadingOut)
    async def ingest(body: ReadingIn, db: Annotated[AsyncSession, Depends(session)]) -> ReadingOut:
        reading = Reading(**body.model_dump())
        db.add(reading)
        await db.commit()
        return ReadingOut(id=reading.id)

    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory bench.baseline_app:app_from_env``)."""
    return create_app(
        os.environ.get("BASELINE_DATABASE_URL", DEFAULT_URL), int(os.environ.get("BASELINE_POOL_SIZE", "10"))
    )
