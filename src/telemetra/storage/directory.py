"""A small read-through cache of who-is-who for the hot path: every ingest request authenticates, and
a database round trip per request would cost more than the write it guards. Entries live ``ttl_s``
seconds; changes made through this process invalidate them at once, other processes' within the TTL."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.credentials import hash_secret
from telemetra.storage.schema import Device


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    kind: str
    parent_id: str | None
    disabled: bool


_COLUMNS = (Device.id, Device.kind, Device.parent_id, Device.disabled)


class DeviceDirectory:
    def __init__(self, engine: AsyncEngine, *, ttl_s: float = 5.0, max_entries: int = 100_000) -> None:
        self._engine = engine
        self._ttl = ttl_s
        self._max = max_entries
        self._by_hash: dict[str, tuple[float, DeviceInfo]] = {}
        self._by_id: dict[str, tuple[float, DeviceInfo]] = {}

    async def by_secret(self, secret: str) -> DeviceInfo | None:
        digest = hash_secret(secret)
        hit = self._by_hash.get(digest)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(Device.secret_hash == digest))).first()
        if row is None:
            return None
        info = DeviceInfo(row.id, row.kind, row.parent_id, bool(row.disabled))
        self._remember(self._by_hash, digest, info, now)
        self._remember(self._by_id, info.id, info, now)
        return info

    async def get(self, device_id: str) -> DeviceInfo | None:
        hit = self._by_id.get(device_id)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(Device.id == device_id))).first()
        if row is None:
            return None
        info = DeviceInfo(row.id, row.kind, row.parent_id, bool(row.disabled))
        self._remember(self._by_id, device_id, info, now)
        return info

    async def get_many(self, device_ids: set[str]) -> dict[str, DeviceInfo]:
        found: dict[str, DeviceInfo] = {}
        missing: list[str] = []
        now = time.monotonic()
        for device_id in device_ids:
            hit = self._by_id.get(device_id)
            if hit and hit[0] > now:
                found[device_id] = hit[1]
            else:
                missing.append(device_id)
        if missing:
            async with self._engine.connect() as conn:
                rows = (await conn.execute(select(*_COLUMNS).where(Device.id.in_(missing)))).all()
            for row in rows:
                info = DeviceInfo(row.id, row.kind, row.parent_id, bool(row.disabled))
                self._remember(self._by_id, row.id, info, now)
                found[row.id] = info
        return found

    def invalidate(self, device_id: str | None = None) -> None:
        if device_id is None:
            self._by_hash.clear()
            self._by_id.clear()
            return
        self._by_id.pop(device_id, None)
        for digest in [d for d, (_, info) in self._by_hash.items() if info.id == device_id]:
            del self._by_hash[digest]

    def _remember(self, cache: dict[str, tuple[float, DeviceInfo]], key: str, info: DeviceInfo, now: float) -> None:
        if len(cache) >= self._max:
            cache.clear()  # crude but bounded; a full cache only costs lookups, never correctness
        cache[key] = (now + self._ttl, info)
