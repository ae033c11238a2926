"""The bounded ingest queue and its writer task (group commit).

Producers hand in the batches of their messages ("parts": one per client message) and get a future
that resolves once they are committed. The writer drains whatever is waiting — up to
``batch_max_points`` — into one transaction, so under load many client messages share one commit, and
with no load a message is written at once.

On PostgreSQL the writer keeps up to ``commits_in_flight`` transactions going at once (on separate
connections): while the database works through one batch, the next is already being sent, instead of
the process idling for the database and the database idling for the process. Nothing depends on
commit order: latest values only move forward in time, duplicates are skipped, and each producer's
future resolves with its own transaction. SQLite has a single writer, so there it is one at a time.

When a commit fails, the writer tells the two causes apart (``storage.faults``):
- the database is down or busy: every producer of the batch is told ``StorageUnavailable`` (HTTP
  answers 503, MQTT holds its acknowledgements and tries again) — nothing is lost, nothing refused;
- a value the database will never take (poison): the batch is split in halves until the refused
  message is alone, the good neighbours are committed, and the poison message becomes a
  rejected-message record (with its payload in a storable form) when its transport keeps one, or
  ``Unstorable`` (HTTP 422) otherwise. One bad message never holds up or fails the others.

What a commit changed is announced as events (``ingest.announce``): inside the transaction to other
processes (``Announcer``: PostgreSQL NOTIFY, delivered only if the transaction commits), and after it to
this process's hub — in the order the batches were taken, even when a later one commits first, so a
device's events never overtake each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.errors import Overloaded, StorageUnavailable, Unstorable
from telemetra.domain.records import Batch, Rejected
from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent
from telemetra.ingest.announce import events_of
from telemetra.logs import Throttle
from telemetra.metrics import Metrics
from telemetra.storage.database import after_gated_writers
from telemetra.storage.faults import DatabaseState, describe, is_transient
from telemetra.storage.writes import WriteResult, write_batch

log = logging.getLogger(__name__)

CommitListener = Callable[[Batch], None]


class Announcer(Protocol):
    """Tells other processes of committed events, in the order they are handed over (see
    ``storage.event_bridge``)."""

    @property
    def active(self) -> bool: ...

    def send_later(self, events: Sequence[ChangeEvent]) -> None: ...


# While the database is down in the middle of isolating a poison message, how long to wait between tries.
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0
# Work waiting this long with no commit succeeding meanwhile makes /health say the ingest path is stuck.
STALL_AFTER_S = 15.0


@dataclass(frozen=True, slots=True)
class IngestStatus:
    status: str  # ok | full | failing | stalled | stopped
    depth: int
    capacity: int
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Item:
    __slots__ = ("enqueued", "future", "messages", "parts", "transport", "weight")

    def __init__(
        self, parts: list[Batch], transport: str, future: asyncio.Future[WriteResult], messages: int | None
    ) -> None:
        self.parts = parts
        self.transport = transport
        self.future = future
        self.weight = sum([p.weight for p in parts]) if len(parts) != 1 else parts[0].weight
        # How many client messages the item stands for (the metric): a producer that merges several says
        # so; otherwise one per telemetry record, at least one.
        self.messages = messages if messages is not None else (sum(len(p.telemetry) for p in parts) or 1)
        self.enqueued = time.monotonic()


class IngestQueue:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        metrics: Metrics,
        state: DatabaseState,
        max_points: int,
        batch_max_points: int,
        linger_ms: float = 0.0,
        retry_after_s: int = 1,
        commits_in_flight: int = 1,
        hub: EventHub | None = None,
        announcer: Announcer | None = None,
        rollups: bool = True,
    ) -> None:
        self._engine = engine
        self._rollups = rollups
        self._hub = hub
        self._announcer = announcer
        # Events are handed to the hub in the order batches were taken (see _publish_in_order).
        self._taken_seq = 0
        self._published_seq = 0
        self._finished: dict[int, list[ChangeEvent]] = {}
        self._metrics = metrics
        self._state = state
        self._max_points = max_points
        self._batch_max_points = batch_max_points
        self._linger = linger_ms / 1000
        self._retry_after = retry_after_s
        self._items: deque[_Item] = deque()
        self._weight = 0
        self._wakeup = asyncio.Event()
        self._space = asyncio.Condition()
        self._listeners: list[CommitListener] = []
        self._closed = False
        self._running = False
        self._slots = asyncio.Semaphore(commits_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._last_progress = time.monotonic()
        self._poison_log = Throttle(60.0)

    @property
    def depth(self) -> int:
        return self._weight

    @property
    def capacity(self) -> int:
        return self._max_points

    def status(self) -> IngestStatus:
        """What /health says about the ingest path: a dead writer, failing commits, or work that waits
        without any commit succeeding are all "not ok" (503)."""
        depth, capacity = self._weight, self._max_points
        if not self._running:
            return IngestStatus("stopped", depth, capacity, "the writer task is not running")
        if not self._state.up:
            return IngestStatus(
                "failing",
                depth,
                capacity,
                f"commits failing for {self._state.down_for_s:.0f} s: {self._state.last_error}",
            )
        idle_for = time.monotonic() - self._last_progress
        if (self._items or self._in_flight) and idle_for > STALL_AFTER_S:
            return IngestStatus("stalled", depth, capacity, f"no commit for {idle_for:.0f} s with work waiting")
        if depth >= capacity:
            return IngestStatus("full", depth, capacity, "the queue is full; producers wait or get 503")
        return IngestStatus("ok", depth, capacity)

    def add_listener(self, listener: CommitListener) -> None:
        """Called with each committed batch (realtime fan-out, rules): what listeners see is stored."""
        self._listeners.append(listener)

    def submit_nowait(self, batch: Batch, *, transport: str) -> asyncio.Future[WriteResult]:
        """Enqueue one message's batch or refuse at once with ``Overloaded`` (HTTP: 503 + Retry-After)."""
        if self._closed:
            raise Overloaded("the server is shutting down", retry_after=self._retry_after)
        weight = batch.weight
        # One message larger than the whole queue is still accepted when the queue is empty.
        if self._weight and self._weight + weight > self._max_points:
            raise Overloaded(f"ingest queue is full ({self._weight} points waiting)", retry_after=self._retry_after)
        return self._enqueue([batch], transport)

    async def submit(self, batch: Batch, *, transport: str) -> WriteResult:
        return await self.submit_nowait(batch, transport=transport)

    async def put(
        self, parts: Sequence[Batch], *, transport: str, messages: int | None = None
    ) -> asyncio.Future[WriteResult]:
        """Wait for room, then enqueue the batches of several messages (MQTT: while we wait, we stop
        taking messages and the broker holds them — backpressure, not loss)."""
        weight = sum([p.weight for p in parts])
        async with self._space:
            await self._space.wait_for(
                lambda: self._closed or not self._weight or self._weight + weight <= self._max_points
            )
        if self._closed:
            raise StorageUnavailable("the server is shutting down; nothing was stored", retry_after=self._retry_after)
        return self._enqueue(list(parts), transport, messages)

    def _enqueue(self, parts: list[Batch], transport: str, messages: int | None = None) -> asyncio.Future[WriteResult]:
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        if not self._items and not self._in_flight:
            self._last_progress = time.monotonic()  # idle until now is not a stall
        item = _Item(parts, transport, future, messages)
        self._items.append(item)
        self._weight += item.weight
        self._metrics.queue_depth.set(self._weight)
        self._wakeup.set()
        return future

    async def run(self) -> None:
        """The writer loop; runs until cancelled, then commits what is left."""
        self._running = True
        try:
            while True:
                await self._wakeup.wait()
                if self._linger and self._weight < self._batch_max_points:
                    await asyncio.sleep(self._linger)
                await self._slots.acquire()
                taken, weight = self._take()
                if not taken:
                    self._slots.release()
                    continue
                seq, self._taken_seq = self._taken_seq, self._taken_seq + 1
                task = asyncio.create_task(self._commit_and_release(taken, weight, seq), name="ingest-commit")
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        except asyncio.CancelledError:
            self._closed = True
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            while self._items:
                taken, weight = self._take()
                seq, self._taken_seq = self._taken_seq, self._taken_seq + 1
                self._publish_in_order(seq, await self._commit(taken, draining=True))
                await self._release(weight)
            raise
        except BaseException:
            # The writer itself died (a bug): nobody would ever resolve what waits, so refuse it all now.
            self._closed = True
            for item in self._items:
                if not item.future.done():
                    item.future.set_exception(
                        StorageUnavailable("the ingest writer stopped; nothing stored", retry_after=self._retry_after)
                    )
            raise
        finally:
            self._running = False

    def _take(self) -> tuple[list[_Item], int]:
        taken: list[_Item] = []
        weight = 0
        while self._items and (not taken or weight + self._items[0].weight <= self._batch_max_points):
            item = self._items.popleft()
            taken.append(item)
            weight += item.weight
        if not self._items:
            self._wakeup.clear()
        return taken, weight

    async def _commit_and_release(self, taken: list[_Item], weight: int, seq: int) -> None:
        events: list[ChangeEvent] = []
        try:
            events = await self._commit(taken)
        finally:
            # The writer's room first: however many subscribers there are, they never hold up the next commit.
            self._slots.release()
            try:
                await self._release(weight)
            finally:  # always, or every later batch's events would wait behind this one's
                self._publish_in_order(seq, events)

    def _publish_in_order(self, seq: int, events: list[ChangeEvent]) -> None:
        self._finished[seq] = events
        while self._published_seq in self._finished:
            ready = self._finished.pop(self._published_seq)
            self._published_seq += 1
            if ready and self._hub is not None:
                self._hub.publish(ready)
            if ready and self._announcer is not None:
                self._announcer.send_later(ready)

    async def _release(self, weight: int) -> None:
        # The queue's room comes back only once the points are stored: the bound covers what is
        # waiting and what is being written.
        self._weight -= weight
        self._metrics.queue_depth.set(self._weight)
        async with self._space:
            self._space.notify_all()

    async def _commit(self, items: list[_Item], *, draining: bool = False) -> list[ChangeEvent]:
        """Commit ``items``; whatever happens, every item's future is resolved before this returns.
        Returns the events of what was committed."""
        events: list[ChangeEvent] = []
        try:
            await self._commit_items(items, events, draining=draining)
        except BaseException as exc:
            for item in items:
                if not item.future.done():
                    item.future.set_exception(
                        StorageUnavailable(
                            "the write was interrupted; nothing was stored", retry_after=self._retry_after
                        )
                    )
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not is_transient(exc):
                # A bug of ours, not the database's: say so, keep the writer alive.
                log.error("ingest commit failed unexpectedly: %s", describe(exc), exc_info=_loggable(exc))
        return events

    async def _commit_items(self, items: list[_Item], events: list[ChangeEvent], *, draining: bool) -> None:
        parts = [part for item in items for part in item.parts]
        try:
            merged = await self._transaction(parts, events)
        except Exception as exc:
            if not is_transient(exc):
                await self._isolate_poison(items, parts, exc, events, draining=draining)
                return
            self._state.failed(exc)
            self._metrics.batch_failures.inc()
            for item in items:
                if not item.future.done():
                    item.future.set_exception(
                        StorageUnavailable("storage is unavailable; nothing was stored", retry_after=self._retry_after)
                    )
            return
        self._committed(merged)
        for item in items:
            self._count(item)
            if not item.future.done():
                item.future.set_result(_result(item.parts))

    async def _transaction(self, parts: list[Batch], events: list[ChangeEvent]) -> Batch:
        """One transaction for ``parts``; appends the events of what it changed to ``events``."""
        merged = parts[0] if len(parts) == 1 else _merge(parts)
        started = time.perf_counter()
        began = self._state.attempt()
        announcer = self._announcer if self._announcer is not None and self._announcer.active else None
        # SQLite: the webhooks' and alerts' short writes waiting at the write gate go first.
        await after_gated_writers(self._engine)
        async with self._engine.begin() as conn:
            now = now_ms()
            result = await write_batch(conn, merged, now_ms=now, rollups=self._rollups)
            wanted = announcer is not None or (self._hub is not None and self._hub.wants(model.TELEMETRY))
            committed = events_of(parts, result.changes, now=now, telemetry=wanted)
        events.extend(committed)
        elapsed = time.perf_counter() - started
        self._state.succeeded(began)
        self._last_progress = time.monotonic()
        self._metrics.batches.inc()
        self._metrics.batch_seconds.observe(elapsed)
        self._metrics.batch_points.observe(result.points)
        return merged

    def _committed(self, merged: Batch) -> None:
        for listener in self._listeners:
            try:
                listener(merged)
            except Exception:
                log.exception("commit listener failed")

    def _count(self, item: _Item) -> None:
        self._metrics.points.labels(item.transport).inc(sum([p.point_count for p in item.parts]))
        self._metrics.messages.labels(item.transport).inc(item.messages)
        for part in item.parts:
            for rejected in part.rejected:
                self._metrics.rejected.labels(item.transport, _reason_label(rejected.reason)).inc()

    # -- poison ------------------------------------------------------------------------------------------
    async def _isolate_poison(
        self,
        items: list[_Item],
        parts: list[Batch],
        error: BaseException,
        events: list[ChangeEvent],
        *,
        draining: bool,
    ) -> None:
        """Split the refused batch until each refused message stands alone; commit everything else."""
        refused: dict[int, str] = {}  # id(part) → why the database refused it
        await self._split(parts, error, refused, events, draining=draining)
        stand_ins: list[Batch] = []
        for part in parts:
            reason = refused.get(id(part))
            if reason is not None and part.origin is not None:
                stand_ins.append(_rejected_stand_in(part, reason))
                self._log_poison(part, reason)
        if stand_ins:
            await self._store_stand_ins(stand_ins, events, draining=draining)
        for item in items:
            reasons = [refused[id(p)] for p in item.parts if id(p) in refused]
            kept = [p for p in item.parts if id(p) not in refused]
            if reasons and any(p.origin is None for p in item.parts if id(p) in refused):
                self._metrics.unstorable.labels(item.transport).inc(len(reasons))
                if not item.future.done():
                    item.future.set_exception(
                        Unstorable(f"the database refused a value of this message: {reasons[0]}", field="body")
                    )
                continue
            self._metrics.unstorable.labels(item.transport).inc(len(reasons))
            self._metrics.points.labels(item.transport).inc(sum([p.point_count for p in kept]))
            self._metrics.messages.labels(item.transport).inc(item.messages)
            if not item.future.done():
                item.future.set_result(_result(kept, rejected=len(reasons)))

    async def _split(
        self,
        parts: list[Batch],
        error: BaseException,
        refused: dict[int, str],
        events: list[ChangeEvent],
        *,
        draining: bool,
    ) -> None:
        if len(parts) == 1:
            if await self._database_answers(draining=draining):
                refused[id(parts[0])] = describe(error)
                return
            # The database went away meanwhile: the failure says nothing about the data. Try it again.
            await self._retry_until_written(parts, refused, events, draining=draining)
            return
        middle = len(parts) // 2
        for half in (parts[:middle], parts[middle:]):
            await self._retry_until_written(half, refused, events, draining=draining)

    async def _retry_until_written(
        self, parts: list[Batch], refused: dict[int, str], events: list[ChangeEvent], *, draining: bool
    ) -> None:
        delay = RETRY_MIN_S
        while True:
            try:
                self._committed(await self._transaction(parts, events))
                return
            except Exception as exc:
                if not is_transient(exc):
                    await self._split(parts, exc, refused, events, draining=draining)
                    return
                self._state.failed(exc)
                if draining:
                    raise
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    async def _database_answers(self, *, draining: bool) -> bool:
        """Is the database itself fine (so a refusal was about the data)?"""
        delay = RETRY_MIN_S
        for _ in range(3):
            try:
                async with self._engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:
                self._state.failed(exc)
                if draining:
                    break
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
        return False

    async def _store_stand_ins(self, stand_ins: list[Batch], events: list[ChangeEvent], *, draining: bool) -> None:
        refused: dict[int, str] = {}
        try:
            await self._retry_until_written(stand_ins, refused, events, draining=draining)
        except Exception as exc:
            log.error("could not store %d rejected-message records: %s", len(stand_ins), describe(exc))
            return
        if refused:  # even the escaped record was refused: keep what cannot fail, the reason and a digest
            bare = [_bare_stand_in(b) for b in stand_ins if id(b) in refused]
            with contextlib.suppress(Exception):
                await self._retry_until_written(bare, {}, events, draining=draining)

    def _log_poison(self, part: Batch, reason: str) -> None:
        origin = part.origin
        assert origin is not None
        key = (origin.transport, origin.kind, origin.device_id)
        suppressed = self._poison_log.allow(key)
        if suppressed is not None:
            log.warning(
                "refused a %s %s message of device %s that the database cannot store (%s); kept as a rejected "
                "message%s",
                origin.transport,
                origin.kind,
                origin.device_id,
                reason,
                f" ({suppressed} more like it in the last minute)" if suppressed else "",
            )


def _merge(parts: list[Batch]) -> Batch:
    merged = Batch()
    for part in parts:
        merged.extend(part)
    return merged


def _result(parts: list[Batch], *, rejected: int = 0) -> WriteResult:
    return WriteResult(
        points=sum([p.point_count for p in parts]),
        messages=sum([len(p.telemetry) for p in parts]),
        rejected=rejected,
    )


def _rejected_stand_in(part: Batch, reason: str) -> Batch:
    origin = part.origin
    assert origin is not None
    record = Rejected(
        origin.received_ts,
        origin.transport,
        f"unstorable: {reason}",
        origin.payload,
        device_id=origin.device_id,
        topic=origin.topic,
    )
    return Batch(rejected=[record])


def _bare_stand_in(batch: Batch) -> Batch:
    r = batch.rejected[0]
    return Batch(rejected=[Rejected(r.received_ts, r.source, "unstorable: value refused by the database", b"")])


def _loggable(exc: BaseException) -> BaseException | bool:
    # A traceback of a RecursionError is itself deep enough to fail again while being formatted.
    return False if isinstance(exc, RecursionError) else exc


def _reason_label(reason: str) -> str:
    """A short, bounded label for the metric (the full reason is stored with the message)."""
    return reason.split(":", 1)[0][:40]
