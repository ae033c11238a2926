"""Events between processes, through the database every process already shares.

Two feeds:

- **Registry changes** come from the database itself: triggers on ``devices`` (migration 0005) announce
  every create, rotation, claim, enable/disable, edit, desired-config change and delete, whoever made
  it — this process's API, another process, the CLI, or someone with ``psql``. On PostgreSQL the trigger
  calls ``pg_notify('telemetra_registry', …)``, delivered when (and only if) the transaction commits; on
  SQLite it appends to ``registry_changes``, which the server reads every ``SQLITE_POLL_S``. Each process
  turns them into ``device`` events in its hub (this is the one source of those events).
- **Everything else that commits** (telemetry, state, events, alerts, command and OTA status) is
  published in-process straight after the commit, in the order the writer took the batches, and — on
  PostgreSQL, when other Telemetra processes are listening — handed in that same order to one sender
  (``send_later``), which NOTIFYs ``telemetra_events`` in chunks under NOTIFY's 8,000-byte payload
  limit. Sending after commit from one task (not from inside each transaction) keeps each device's order
  for the other processes even with several commits in flight — NOTIFY would deliver in commit order,
  which two in-flight transactions may swap — and keeps NOTIFY's commit-time lock off the ingest
  transactions. The price: a crash between a commit and its NOTIFY loses those events for the others
  (not the data). Processes find each other by a heartbeat on ``telemetra_peers``; a process alone sends
  nothing.

What cannot be delivered is said: a listener that loses its connection (NOTIFY keeps nothing for a
session that is gone) publishes, on reconnecting, a ``device`` event with ``change: "resync"`` — the
registry cache drops everything, Mosquitto's accounts are reconciled — and tells every subscriber of an
unknown number of missed events (a ``gap`` for realtime clients); so does a sender that had to drop
events, and an event too large for one notification.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.aio import wait_set
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
READY_WAIT_S = 5.0  # at start, how long the app waits for its listener before serving anyway
SEND_QUEUE_MAX = 100_000  # events waiting for the sender; past it the oldest go, and the others are told
GAP = "gap"  # a line that says events were lost on the way (type of the encoded line)


def registry_event(op: str, device_id: str | None, ts: int | None) -> ChangeEvent:
    return ChangeEvent(model.DEVICE, device_id, ts or now_ms(), {"change": op})


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
                    "event of %s too large for other processes (%d bytes); sent as a gap", event.device_id, len(line)
                )
                line = orjson.dumps([GAP, event.device_id, event.ts, {"missed": 1}])
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
        if event_type == GAP:
            out.append(ChangeEvent(GAP, device_id, ts, data))
            continue
        raw = data.get("raw")
        if isinstance(raw, str):
            data["raw"] = raw.encode()
        out.append(ChangeEvent(event_type, device_id, ts, data))
    return out


class PgEventBridge:
    """PostgreSQL: LISTEN for the other processes' events and the registry's changes; NOTIFY ours."""

    def __init__(self, dsn: str, engine: AsyncEngine, hub: EventHub) -> None:
        self._dsn = dsn
        self._engine = engine
        self._hub = hub
        self.process_id = secrets.token_hex(6)
        self._peers: dict[str, float] = {}
        self._connection: asyncpg.Connection | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._warn = Throttle(60.0)
        self._outbox: deque[ChangeEvent] = deque()
        self._dropped = 0
        self._pending = asyncio.Event()
        self.received = 0
        self.sent = 0

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

    def send_later(self, events: Sequence[ChangeEvent]) -> None:
        """Committed events, in the order this process published them, for the other processes (when there
        are any). Never blocks: past ``SEND_QUEUE_MAX`` waiting, the oldest are dropped and the others told."""
        if not events or not self.active:
            return
        self._outbox.extend(events)
        while len(self._outbox) > SEND_QUEUE_MAX:
            self._outbox.popleft()
            self._dropped += 1
        self._pending.set()

    async def poll_now(self) -> None:
        """Registry changes arrive by NOTIFY here, promptly: nothing to do."""

    async def ready(self) -> None:
        """Wait (a little) for the listener, so that changes made once the app serves are heard."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), READY_WAIT_S)

    async def run_sender(self) -> None:
        """Until cancelled: NOTIFY what ``send_later`` queued, in order, one transaction per round."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), 2_000))]
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    log.warning("dropped %d events for the other processes (the sender fell behind)", dropped)
                    batch.insert(0, ChangeEvent(GAP, None, now_ms(), {"missed": dropped}))
                try:
                    async with self._engine.begin() as conn:
                        for chunk in _encode(batch):
                            payload = self.process_id + "\n" + chunk.decode()
                            await conn.execute(
                                text("SELECT pg_notify(:channel, :payload)"),
                                {"channel": EVENTS_CHANNEL, "payload": payload},
                            )
                    self.sent += len(batch)
                except Exception as exc:  # the others miss these; they are told so with the next round
                    self._dropped += len(batch)
                    if self._warn.allow("announce") is not None:
                        log.warning("could not send events to the other Telemetra processes: %s", exc)
                    await asyncio.sleep(RECONNECT_MIN_S)

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
            self._hub.missed_unknown()  # what the others sent meanwhile is gone: every subscriber is told
        while not self._lost.is_set():
            # With a timeout: a half-open connection (no RST after a partition) would block here forever.
            await conn.execute("SELECT pg_notify($1, $2)", PEERS_CHANNEL, self.process_id, timeout=HEARTBEAT_S)
            await wait_set(self._lost, HEARTBEAT_S)
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
        if any(e.type == GAP for e in events):
            self._hub.missed_unknown()
            events = [e for e in events if e.type != GAP]
        self.received += len(events)
        self._hub.publish(events)

    def _on_registry(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            change = orjson.loads(payload)
            event = registry_event(str(change["op"]), change.get("id"), change.get("ts"))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("malformed registry notification: %s", exc)
            return
        self._hub.publish([event])


class SqliteRegistryFollower:
    """SQLite: one server process writes, but the CLI (or anyone) may change the registry in the same
    file: its triggers' rows are read here and published as ``device`` events."""

    def __init__(self, engine: AsyncEngine, hub: EventHub, *, poll_s: float = SQLITE_POLL_S) -> None:
        self._engine = engine
        self._hub = hub
        self._polling = asyncio.Lock()
        self._poll_s = poll_s
        self._last: int | None = None
        self._warn = Throttle(60.0)
        self.connected = True
        self.active = False  # a single process: nobody to send events to
        self.peers = 0

    def send_later(self, events: Sequence[ChangeEvent]) -> None:
        return None  # one process: nobody to send to

    async def ready(self) -> None:
        """Where the change table stands now: what is written from here on is published."""
        with contextlib.suppress(Exception):  # the database is not there yet: the first round sets it
            await self.poll()

    async def poll_now(self) -> None:
        """Read the change table at once (after this process changed the registry: its event now)."""
        try:
            await self.poll()
        except Exception as exc:  # the next round of ``run`` tries again
            if self._warn.allow("poll") is not None:
                log.warning("could not read registry changes: %s", exc)

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception as exc:  # the database is busy or gone: next round
                if self._warn.allow("poll") is not None:
                    log.warning("could not read registry changes: %s", exc)
            await asyncio.sleep(self._poll_s)

    async def poll(self) -> int:
        async with self._polling:  # the loop's round and a ``poll_now`` never read the same rows twice
            return await self._poll()

    async def _poll(self) -> int:
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
            self._hub.publish([registry_event(op, device_id, ts) for _, device_id, op, ts in rows])
            if self._last % 1000 < len(rows):  # now and then, keep the table short
                await self._prune()
        return len(rows)

    async def _prune(self) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                text("DELETE FROM registry_changes WHERE id <= :keep"), {"keep": (self._last or 0) - 1000}
            )
