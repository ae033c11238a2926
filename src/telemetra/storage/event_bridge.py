"""Events between processes, through the database every process already shares.

Two feeds:

- **Registry changes** come from the database itself: triggers on ``devices`` (migration 0005) announce
  every create, rotation, claim, enable/disable, edit, desired-config change and delete, whoever made
  it — this process's API, another process, the CLI, or someone with ``psql``. On PostgreSQL the trigger
  calls ``pg_notify('telemetra_registry', …)``, delivered when (and only if) the transaction commits; on
  SQLite it appends to ``registry_changes``, which the server reads every ``SQLITE_POLL_S``. Each process
  turns them into ``device`` events in its hub (this is the one source of those events).
- **Everything else the writer commits** (telemetry, state, events, alerts, command answers) is
  published in-process straight after the commit, and — on PostgreSQL, when other Telemetra processes
  are listening — also sent with ``pg_notify('telemetra_events', …)`` from inside the same transaction,
  in chunks under NOTIFY's 8,000-byte payload limit. NOTIFY delivers in commit order, and only what
  committed. Processes find each other by a heartbeat on ``telemetra_peers``; a process alone sends
  nothing (NOTIFY has a cost: a commit-time lock and the payload written to the notification queue).

A listener that loses its connection misses what was sent meanwhile (NOTIFY keeps nothing for a session
that is gone): on reconnecting it publishes a ``device`` event with ``change: "resync"``, on which the
registry cache drops everything and Mosquitto's accounts are reconciled; realtime clients of that
process are told nothing more than they would be of any other gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent
from telemetra.logs import Throttle

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "telemetra_events"
REGISTRY_CHANNEL = "telemetra_registry"
PEERS_CHANNEL = "telemetra_peers"
MAX_PAYLOAD = 7_800  # NOTIFY refuses payloads of 8,000 bytes and more
HEARTBEAT_S = 5.0
PEER_TIMEOUT_S = 3 * HEARTBEAT_S
SQLITE_POLL_S = 0.25
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 5.0


ECHO_WINDOW_S = 30.0


def registry_event(op: str, device_id: str | None, ts: int | None, *, local: bool = False) -> ChangeEvent:
    data: dict[str, Any] = {"change": op}
    if local:
        data["local"] = True
    return ChangeEvent(model.DEVICE, device_id, ts or now_ms(), data)


class LocalChanges:
    """Registry changes this process made and announced itself at once (``Services.registry_changed``),
    matched with the database's own announcement of the same change so that it is published once —
    whichever of the two comes first (the notification may be read before the API call returns)."""

    def __init__(self) -> None:
        self._made: dict[tuple[str | None, str], float] = {}
        self._heard: dict[tuple[str | None, str], float] = {}

    def made(self, device_id: str | None, op: str) -> bool:
        """This process made the change; True when the database's announcement of it came first (and
        was published then)."""
        if _take(self._heard, (device_id, op)):
            return True
        _put(self._made, (device_id, op))
        return False

    def is_echo(self, device_id: str | None, op: str) -> bool:
        """The database announced a change; True when it is one this process made and published itself."""
        if _take(self._made, (device_id, op)):
            return True
        _put(self._heard, (device_id, op))
        return False


def _put(seen: dict[tuple[str | None, str], float], key: tuple[str | None, str]) -> None:
    now = time.monotonic()
    if len(seen) > 10_000:
        for old in [k for k, t in seen.items() if now - t >= ECHO_WINDOW_S]:
            del seen[old]
    seen[key] = now


def _take(seen: dict[tuple[str | None, str], float], key: tuple[str | None, str]) -> bool:
    at = seen.pop(key, None)
    return at is not None and time.monotonic() - at < ECHO_WINDOW_S


def _encode(events: Sequence[ChangeEvent]) -> list[bytes]:
    """Events as JSON lines in payloads under the limit (a single event over it is skipped, said once)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for event in events:
        data = dict(event.data)
        raw = data.get("raw")
        if isinstance(raw, bytes | bytearray):
            data["raw"] = bytes(raw).decode("utf-8", "replace")
        line = orjson.dumps([event.type, event.device_id, event.ts, data])
        if len(line) > MAX_PAYLOAD - 64:
            if "raw" in data:  # the device's own payload is what makes it big: the values still go
                data.pop("raw")
                line = orjson.dumps([event.type, event.device_id, event.ts, data])
            if len(line) > MAX_PAYLOAD - 64:
                log.warning(
                    "event of %s too large for other processes (%d bytes); not sent", event.device_id, len(line)
                )
                continue
        if size + len(line) + 1 > MAX_PAYLOAD - 64 and current:
            chunks.append(b"\n".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line) + 1
    if current:
        chunks.append(b"\n".join(current))
    return chunks


def _decode(lines: str) -> list[ChangeEvent]:
    out = []
    for line in lines.split("\n"):
        event_type, device_id, ts, data = orjson.loads(line)
        raw = data.get("raw")
        if isinstance(raw, str):
            data["raw"] = raw.encode()
        out.append(ChangeEvent(event_type, device_id, ts, data))
    return out


class PgEventBridge:
    """PostgreSQL: LISTEN for the other processes' events and the registry's changes; NOTIFY ours."""

    def __init__(self, dsn: str, engine: AsyncEngine, hub: EventHub, local: LocalChanges) -> None:
        self._dsn = dsn
        self._local = local
        self._engine = engine
        self._hub = hub
        self.process_id = secrets.token_hex(6)
        self._peers: dict[str, float] = {}
        self._connection: asyncpg.Connection | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._warn = Throttle(60.0)
        self.received = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def server_pid(self) -> int | None:
        """The database backend of the listening connection (what an operator sees in pg_stat_activity)."""
        conn = self._connection
        return conn.get_server_pid() if conn is not None and not conn.is_closed() else None

    @property
    def active(self) -> bool:
        """Are other processes listening (so our events must be sent to them)?"""
        horizon = time.monotonic() - PEER_TIMEOUT_S
        return any(seen > horizon for seen in self._peers.values())

    @property
    def peers(self) -> int:
        horizon = time.monotonic() - PEER_TIMEOUT_S
        return sum(1 for seen in self._peers.values() if seen > horizon)

    async def announce(self, conn: AsyncConnection, events: Sequence[ChangeEvent]) -> None:
        """From inside the transaction that committed ``events``: they reach the others on commit."""
        for chunk in _encode(events):
            payload = self.process_id + "\n" + chunk.decode()
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": EVENTS_CHANNEL, "payload": payload}
            )

    async def announce_committed(self, events: Sequence[ChangeEvent]) -> None:
        """For changes committed elsewhere (command and alert repositories): a transaction of its own."""
        if not self.active or not events:
            return
        try:
            async with self._engine.begin() as conn:
                await self.announce(conn, events)
        except Exception as exc:  # the local hub has them; the other processes miss them, said once a minute
            if self._warn.allow("announce") is not None:
                log.warning("could not send events to the other Telemetra processes: %s", exc)

    async def run(self) -> None:
        """Keep the listening connection, and the heartbeat, until cancelled."""
        delay = RECONNECT_MIN_S
        first = True
        while True:
            try:
                await self._listen(resync=not first)
                delay = RECONNECT_MIN_S
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if self._warn.allow("listen") is not None:
                    log.warning("event listener lost the database (%s); retrying", exc)
            finally:
                self._connected.clear()
                await self._close()
            first = False
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX_S, delay * 2)

    async def _listen(self, *, resync: bool) -> None:
        self._lost.clear()
        conn = await asyncpg.connect(self._dsn, timeout=10, server_settings={"application_name": "telemetra-events"})
        self._connection = conn
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener(EVENTS_CHANNEL, self._on_events)
        await conn.add_listener(REGISTRY_CHANNEL, self._on_registry)
        await conn.add_listener(PEERS_CHANNEL, self._on_peer)
        self._connected.set()
        if resync:
            log.info("event listener reconnected; resynchronising")
            self._hub.publish([registry_event("resync", None, None)])
        while not self._lost.is_set():
            await conn.execute("SELECT pg_notify($1, $2)", PEERS_CHANNEL, self.process_id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), HEARTBEAT_S)
        raise ConnectionError("listening connection closed")

    async def _close(self) -> None:
        conn, self._connection = self._connection, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)

    def _on_peer(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload != self.process_id:
            new = payload not in self._peers
            self._peers[payload] = time.monotonic()
            if new:
                log.info("another Telemetra process is listening (%s): sending events to it", payload)

    def _on_events(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        sender, _, lines = payload.partition("\n")
        if sender == self.process_id or not lines:
            return
        self._peers[sender] = time.monotonic()
        try:
            events = _decode(lines)
        except (ValueError, TypeError) as exc:
            log.warning("malformed event notification from %s: %s", sender, exc)
            return
        self.received += len(events)
        self._hub.publish(events)

    def _on_registry(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = orjson.loads(payload)
            event = registry_event(str(change["op"]), change.get("id"), change.get("ts"))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("malformed registry notification: %s", exc)
            return
        if not self._local.is_echo(event.device_id, str(event.data["change"])):
            self._hub.publish([event])


class SqliteRegistryFollower:
    """SQLite: one server process writes, but the CLI (or anyone) may change the registry in the same
    file: its triggers' rows are read here and published as ``device`` events."""

    def __init__(
        self, engine: AsyncEngine, hub: EventHub, local: LocalChanges, *, poll_s: float = SQLITE_POLL_S
    ) -> None:
        self._engine = engine
        self._local = local
        self._hub = hub
        self._poll_s = poll_s
        self._last: int | None = None
        self._warn = Throttle(60.0)
        self.connected = True
        self.active = False  # a single process: nobody to send events to
        self.peers = 0

    async def announce(self, conn: AsyncConnection, events: Sequence[ChangeEvent]) -> None:  # pragma: no cover
        return None

    async def announce_committed(self, events: Sequence[ChangeEvent]) -> None:
        return None

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # the database is busy or gone: next round
                if self._warn.allow("poll") is not None:
                    log.warning("could not read registry changes: %s", exc)
            await asyncio.sleep(self._poll_s)

    async def poll(self) -> int:
        async with self._engine.connect() as conn:
            if self._last is None:
                self._last = int(
                    (await conn.execute(text("SELECT coalesce(max(id), 0) FROM registry_changes"))).scalar_one()
                )
                return 0
            rows = (
                await conn.execute(
                    text("SELECT id, device_id, op, ts FROM registry_changes WHERE id > :last ORDER BY id LIMIT 1000"),
                    {"last": self._last},
                )
            ).all()
        if rows:
            self._last = int(rows[-1][0])
            fresh = [row for row in rows if not self._local.is_echo(row[1], row[2])]
            self._hub.publish([registry_event(op, device_id, ts) for _, device_id, op, ts in fresh])
            if self._last % 1000 < len(rows):  # now and then, keep the table short
                await self._prune()
        return len(rows)

    async def _prune(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text("DELETE FROM registry_changes WHERE id <= :keep"), {"keep": (self._last or 0) - 1000}
            )
