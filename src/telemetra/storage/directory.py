"""A small read-through cache of who-is-who for the hot path: every ingest request authenticates, and
a database round trip per request would cost more than the write it guards.

- An entry is fresh for ``ttl_s`` seconds. After that, for as long again, it is still answered while
  one background lookup refreshes it, so expiry never stalls requests; older than that, the lookup is
  awaited. Other processes' changes are therefore seen within about ``2 × ttl_s``; changes made through
  this process invalidate at once.
- Concurrent misses of one key share one lookup (single flight): when an entry expires under load,
  one query goes to the database, not one per waiting request (which used to exhaust the pool).
- Every invalidation bumps a generation; a lookup that started before it is answered to the callers
  that were already waiting, but not cached, and new callers start a new lookup. So a rotated secret or
  a disabled device cannot come back from a read that raced the change.
- Unknown keys are not cached: a device created in another process works at its first request.
- While the database is down, entries past their stale time are still answered (the last word the
  registry gave stands; no revocation can be committed meanwhile anyway), and a key with no entry is
  ``StorageUnavailable`` (503 / retry), never an error of the caller's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.credentials import hash_secret
from telemetra.domain.errors import StorageUnavailable
from telemetra.storage.faults import DatabaseState, is_transient
from telemetra.storage.schema import Device


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    kind: str
    parent_id: str | None
    disabled: bool


@dataclass(frozen=True, slots=True)
class _Entry:
    info: DeviceInfo
    fresh_until: float
    stale_until: float


_COLUMNS = (Device.id, Device.kind, Device.parent_id, Device.disabled)
LOAD_CONCURRENCY = 3
TTL_JITTER = 0.2  # ±20 %, so entries made together do not all expire together
_Cache = dict[str, _Entry]


class DeviceDirectory:
    def __init__(
        self, engine: AsyncEngine, *, state: DatabaseState, ttl_s: float = 5.0, max_entries: int = 100_000
    ) -> None:
        self._engine = engine
        self._state = state
        self._ttl = ttl_s
        self._max = max_entries
        self._by_hash: _Cache = {}
        self._by_id: _Cache = {}
        self._generation = 0
        self._flights: dict[tuple[str, str, int], asyncio.Future[DeviceInfo | None]] = {}
        # Lookups of different keys still come in herds (a fleet authenticated in the same second expires
        # in the same second): a few connections serve them, the pool stays for the writer and the reads.
        self._loads = asyncio.Semaphore(LOAD_CONCURRENCY)

    async def by_secret(self, secret: str) -> DeviceInfo | None:
        digest = hash_secret(secret)
        return await self._cached("hash", self._by_hash, digest, lambda: self._load(Device.secret_hash == digest))

    async def get(self, device_id: str) -> DeviceInfo | None:
        return await self._cached("id", self._by_id, device_id, lambda: self._load(Device.id == device_id))

    async def get_many(self, device_ids: set[str]) -> dict[str, DeviceInfo]:
        found: dict[str, DeviceInfo] = {}
        missing: list[str] = []
        now = time.monotonic()
        for device_id in device_ids:
            entry = self._by_id.get(device_id)
            if entry is None or entry.stale_until <= now:
                missing.append(device_id)
                continue
            found[device_id] = entry.info
            if entry.fresh_until <= now:
                self._flight("id", self._by_id, device_id, lambda d=device_id: self._load(Device.id == d))
        if len(missing) == 1:  # the usual miss: share the lookup with concurrent requests
            info = await self.get(missing[0])
            if info is not None:
                found[info.id] = info
        elif missing:
            generation = self._generation
            began = self._state.attempt()
            try:
                async with self._engine.connect() as conn:
                    rows = (await conn.execute(select(*_COLUMNS).where(Device.id.in_(missing)))).all()
            except Exception as exc:
                known = [self._by_id.get(d) for d in missing]
                if not is_transient(exc):
                    raise
                self._state.failed(exc)
                if any(entry is None for entry in known):
                    raise StorageUnavailable("the device registry is unavailable; retry later") from None
                found.update((entry.info.id, entry.info) for entry in known if entry is not None)
                return found
            self._state.succeeded(began)
            for row in rows:
                info = DeviceInfo(row.id, row.kind, row.parent_id, bool(row.disabled))
                if generation == self._generation:
                    self._remember(info)
                found[row.id] = info
        return found

    def invalidate(self, device_id: str | None = None) -> None:
        self._generation += 1
        if device_id is None:
            self._by_hash.clear()
            self._by_id.clear()
            return
        self._by_id.pop(device_id, None)
        for digest in [d for d, entry in self._by_hash.items() if entry.info.id == device_id]:
            del self._by_hash[digest]

    async def _cached(
        self, name: str, cache: _Cache, key: str, load: Callable[[], Awaitable[DeviceInfo | None]]
    ) -> DeviceInfo | None:
        entry = cache.get(key)
        if entry is not None:
            now = time.monotonic()
            if entry.fresh_until > now:
                return entry.info
            if entry.stale_until > now:
                self._flight(name, cache, key, load)  # refresh behind the answer
                return entry.info
        try:
            # shield: a caller that gives up (client gone) must not cancel the lookup others wait on.
            return await asyncio.shield(self._flight(name, cache, key, load))
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._state.failed(exc)
            if entry is not None:
                return entry.info  # expired, but the database is down: the registry's last word stands
            raise StorageUnavailable("the device registry is unavailable; retry later") from None

    def _flight(
        self, name: str, cache: _Cache, key: str, load: Callable[[], Awaitable[DeviceInfo | None]]
    ) -> asyncio.Future[DeviceInfo | None]:
        flight_key = (name, key, self._generation)
        flight = self._flights.get(flight_key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(cache, key, load))
            self._flights[flight_key] = flight
            flight.add_done_callback(lambda done: self._landed(flight_key, done))
        return flight

    def _landed(self, flight_key: tuple[str, str, int], done: asyncio.Future[DeviceInfo | None]) -> None:
        self._flights.pop(flight_key, None)
        if not done.cancelled():
            # A background refresh's failure is retried by the next request; an outage is noted once.
            exc = done.exception()
            if exc is not None and is_transient(exc):
                self._state.failed(exc)

    async def _fetch(
        self, cache: _Cache, key: str, load: Callable[[], Awaitable[DeviceInfo | None]]
    ) -> DeviceInfo | None:
        generation = self._generation
        info = await load()
        if generation != self._generation:
            return info  # the registry changed meanwhile: answer the callers who asked before, keep nothing
        if info is None:
            cache.pop(key, None)  # gone (or re-keyed): its stale entry must not be answered again
            return None
        if cache is self._by_hash:
            self._remember(info, digest=key)
        else:
            self._remember(info)
        return info

    async def _load(self, where: ColumnElement[bool]) -> DeviceInfo | None:
        async with self._loads:
            began = self._state.attempt()
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(*_COLUMNS).where(where))).first()
        self._state.succeeded(began)
        return None if row is None else DeviceInfo(row.id, row.kind, row.parent_id, bool(row.disabled))

    def _remember(self, info: DeviceInfo, *, digest: str | None = None) -> None:
        ttl = self._ttl * random.uniform(1 - TTL_JITTER, 1 + TTL_JITTER)
        now = time.monotonic()
        entry = _Entry(info, now + ttl, now + 2 * ttl)
        for cache, key in ((self._by_id, info.id), (self._by_hash, digest)):
            if key is None:
                continue
            if len(cache) >= self._max:
                cache.clear()  # crude but bounded; a full cache only costs lookups, never correctness
            cache[key] = entry
