"""Telling a database that is down from a record it will never take, and saying so once.

A failed write is either **transient** — the database is unreachable, restarting, out of connections,
or the transaction lost a race — and will succeed if tried again later, or it is about **the data**: a
value the database refuses (a NUL in text, a number out of range, a nesting too deep to serialise).
Retrying the second kind forever is how one device used to stop ingest for everyone, and refusing the
first kind would lose good data, so the writer, the registry cache and the API all ask ``is_transient``.

``DatabaseState`` keeps the outage state for one process: the first failure and the recovery are each
logged once (with host, port and database), not once per message while it lasts. Only a call that began
after the outage was noted proves the database is back: one that was already in flight when another
failed (a commit finishing as the server shuts down) would otherwise end the outage and start it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)

# SQLSTATE classes that say "try again": 08 connection exception, 40 transaction rollback (serialization,
# deadlock), 53 insufficient resources (disk full, out of memory, too many connections), 57 operator
# intervention (admin shutdown, cannot connect now), 58 system error (I/O), XX internal error.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58", "XX"})
# SQLite reports a busy or unavailable database as OperationalError; these are the ones about data.
_SQLITE_DATA_ERRORS = ("too big", "too many", "string or blob", "datatype mismatch", "no such", "syntax")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return seen


def sqlstate(exc: BaseException) -> str | None:
    for link in _chain(exc):
        state = getattr(link, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
    return None


def is_transient(exc: BaseException) -> bool:
    """True when the same write may well succeed later (the database, not the data, is the problem)."""
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _TRANSIENT_CLASSES
    for link in _chain(exc):
        if isinstance(link, sa_exc.DBAPIError) and link.connection_invalidated:
            return True
        if isinstance(link, OSError | TimeoutError | ConnectionError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
            return True
        if isinstance(link, sa_exc.InterfaceError):
            return True
        if isinstance(link, sa_exc.OperationalError):
            text = str(link.orig if link.orig is not None else link).lower()
            return not any(marker in text for marker in _SQLITE_DATA_ERRORS)
        if type(link).__module__.startswith("asyncpg") and type(link).__name__ in (
            "InterfaceError",
            "ConnectionDoesNotExistError",
            "ConnectionFailureError",
            "InternalClientError",
        ):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One short line for a log or a rejected-message reason (never the statement or its parameters)."""
    for link in _chain(exc):
        if isinstance(link, sa_exc.StatementError) and link.orig is not None:
            continue  # its text carries the SQL and parameters: use what it wraps
        text = str(link).strip().splitlines()[0] if str(link).strip() else ""
        return f"{type(link).__name__}: {text}"[:300]
    return type(exc).__name__


@dataclass(frozen=True, slots=True)
class DatabaseLocation:
    dialect: str
    where: str  # host:port/database, or the SQLite file


class DatabaseState:
    """Up or down, as the last database call saw it; logs the changes, not every failure."""

    def __init__(self, location: DatabaseLocation) -> None:
        self.location = location
        self._down_since: float | None = None
        self._failures = 0
        self._last_error = ""
        self.changed = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._down_since is None

    @property
    def down_for_s(self) -> float:
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    @property
    def last_error(self) -> str:
        return self._last_error

    @staticmethod
    def attempt() -> float:
        """When a database call begins: hand it to ``succeeded`` when the call is done."""
        return time.monotonic()

    def failed(self, exc: BaseException) -> None:
        self._failures += 1
        self._last_error = describe(exc)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error(
                "database unreachable (%s %s): %s; Telemetra keeps retrying, devices get 503 meanwhile",
                self.location.dialect,
                self.location.where,
                self._last_error,
            )

    def succeeded(self, began: float) -> None:
        """A call that began at ``began`` (``attempt()``) worked; one older than the outage says nothing."""
        if self._down_since is not None and began > self._down_since:
            log.warning(
                "database reachable again (%s %s) after %.1f s and %d failed calls",
                self.location.dialect,
                self.location.where,
                time.monotonic() - self._down_since,
                self._failures,
            )
            self._down_since = None
            self._failures = 0


def report_failure(database: DatabaseState | None, exc: BaseException, message: str, *args: object) -> None:
    """A background task's round failed: a database outage is noted once per outage by ``database`` (it
    logs the state changes); anything else is logged with its traceback."""
    if database is not None and is_transient(exc):
        database.failed(exc)
        return
    log.error(message, *args, exc_info=exc)
