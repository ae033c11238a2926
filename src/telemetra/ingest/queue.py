"""The bounded ingest queue and its writer task (group commit).

Producers hand in a ``Batch`` and get a future that resolves once the batch is committed. The writer
drains whatever is waiting — up to ``batch_max_points`` — into one transaction, so under load many client
messages share one commit, and with no load a message is written at once.

On PostgreSQL the writer keeps up to ``commits_in_flight`` transactions going at once (on separate
connections): while the database works through one batch, the next is already being sent, instead of
the process idling for the database and the database idling for the process. Nothing depends on
commit order: latest values only move forward in time, duplicates are skipped, and each producer's
future resolves with its own transaction. SQLite has a single writer, so there it is one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.domain.errors import Overloaded
from telemetra.domain.records import Batch
from telemetra.domain.timeutil import now_ms
from telemetra.metrics import Metrics
from telemetra.storage.writes import WriteResult, write_batch

log = logging.getLogger(__name__)

CommitListener = Callable[[Batch], None]


class StorageUnavailable(RuntimeError):
    """The batch could not be committed; the client may retry (nothing of it was stored)."""


class _Item:
    __slots__ = ("batch", "future", "messages", "transport", "weight")

    def __init__(self, batch: Batch, transport: str, future: asyncio.Future[WriteResult], messages: int | None) -> None:
        self.batch = batch
        self.transport = transport
        self.future = future
        self.weight = batch.weight
        # How many client messages the batch stands for (the metric): a producer that merges several,
        # telemetry or not, says so; otherwise one per telemetry record, at least one.
        self.messages = messages if messages is not None else (len(batch.telemetry) or 1)


class IngestQueue:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        metrics: Metrics,
        max_points: int,
        batch_max_points: int,
        linger_ms: float = 0.0,
        retry_after_s: int = 1,
        commits_in_flight: int = 1,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
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
        self._slots = asyncio.Semaphore(commits_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        return self._weight

    @property
    def capacity(self) -> int:
        return self._max_points

    def add_listener(self, listener: CommitListener) -> None:
        """Called with each committed batch (realtime fan-out, rules): what listeners see is stored."""
        self._listeners.append(listener)

    def submit_nowait(self, batch: Batch, *, transport: str) -> asyncio.Future[WriteResult]:
        """Enqueue or refuse at once with ``Overloaded`` (HTTP: the client gets 503 + Retry-After)."""
        if self._closed:
            raise Overloaded("the server is shutting down", retry_after=self._retry_after)
        weight = batch.weight
        # One message larger than the whole queue is still accepted when the queue is empty.
        if self._weight and self._weight + weight > self._max_points:
            raise Overloaded(f"ingest queue is full ({self._weight} points waiting)", retry_after=self._retry_after)
        return self._enqueue(batch, transport)

    async def submit(self, batch: Batch, *, transport: str) -> WriteResult:
        return await self.submit_nowait(batch, transport=transport)

    async def put(self, batch: Batch, *, transport: str, messages: int | None = None) -> asyncio.Future[WriteResult]:
        """Wait for room, then enqueue (MQTT: while we wait, we stop taking messages and the broker holds
        them — backpressure, not loss)."""
        async with self._space:
            await self._space.wait_for(lambda: not self._weight or self._weight + batch.weight <= self._max_points)
        return self._enqueue(batch, transport, messages)

    def _enqueue(self, batch: Batch, transport: str, messages: int | None = None) -> asyncio.Future[WriteResult]:
        future: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        item = _Item(batch, transport, future, messages)
        self._items.append(item)
        self._weight += item.weight
        self._metrics.queue_depth.set(self._weight)
        self._wakeup.set()
        return future

    async def run(self) -> None:
        """The writer loop; runs until cancelled, then commits what is left."""
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
                task = asyncio.create_task(self._commit_and_release(taken, weight))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
        except asyncio.CancelledError:
            self._closed = True
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            while self._items:
                taken, weight = self._take()
                await self._commit(taken)
                await self._release(weight)
            raise

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

    async def _commit_and_release(self, taken: list[_Item], weight: int) -> None:
        try:
            await self._commit(taken)
        finally:
            self._slots.release()
            await self._release(weight)

    async def _release(self, weight: int) -> None:
        # The queue's room comes back only once the points are stored: the bound covers what is
        # waiting and what is being written.
        self._weight -= weight
        self._metrics.queue_depth.set(self._weight)
        async with self._space:
            self._space.notify_all()

    async def _commit(self, items: list[_Item]) -> None:
        merged = Batch()
        for item in items:
            merged.extend(item.batch)
        started = time.perf_counter()
        try:
            async with self._engine.begin() as conn:
                result = await write_batch(conn, merged, now_ms=now_ms())
        except Exception as exc:
            self._metrics.batch_failures.inc()
            if len(items) > 1:
                # One bad record must not fail its neighbours: write them one by one to find it.
                log.warning("batch of %d messages failed (%s); retrying one by one", len(items), exc)
                for item in items:
                    await self._commit([item])
                return
            log.error("commit failed: %s", exc)
            if not items[0].future.done():
                items[0].future.set_exception(StorageUnavailable(str(exc)))
            return
        elapsed = time.perf_counter() - started
        self._metrics.batches.inc()
        self._metrics.batch_seconds.observe(elapsed)
        self._metrics.batch_points.observe(result.points)
        log.debug("committed batch", extra={"points": result.points, "messages": len(items), "ms": elapsed * 1000})
        for item in items:
            self._metrics.points.labels(item.transport).inc(item.batch.point_count)
            self._metrics.messages.labels(item.transport).inc(item.messages)
            for rejected in item.batch.rejected:
                self._metrics.rejected.labels(item.transport, _reason_label(rejected.reason)).inc()
            if not item.future.done():
                item.future.set_result(WriteResult(points=item.batch.point_count, messages=len(item.batch.telemetry)))
        for listener in self._listeners:
            try:
                listener(merged)
            except Exception:
                log.exception("commit listener failed")


def _reason_label(reason: str) -> str:
    """A short, bounded label for the metric (the full reason is stored with the message)."""
    return reason.split(":", 1)[0][:40]
