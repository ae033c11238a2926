"""MQTT messages → records → the ingest queue, acknowledged only once they are committed.

One path for both brokers: the collector (a client of Mosquitto) and the embedded broker hand every
received PUBLISH to ``offer`` with a token of their own (the packet id to PUBACK; a future the device's
connection waits on), and get the tokens back through ``on_stored`` once the message's records are
committed — in the order the messages arrived, even when a later chunk commits first.

Messages are taken in chunks (one registry lookup and one queue entry for up to ``CHUNK_MESSAGES``).
A message that cannot be interpreted is a rejected record (``Inbound``); a message the database refuses
is turned into one by the queue. What is left to fail here is the database being down: the chunk is
then held, unacknowledged, and tried again with backoff until it is stored — the broker (or the device)
keeps what comes meanwhile, since nothing more is acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

from telemetra.domain.records import Batch
from telemetra.logs import Throttle
from telemetra.metrics import Metrics
from telemetra.storage.faults import describe
from telemetra.storage.writes import WriteResult

log = logging.getLogger(__name__)

T = TypeVar("T")
# (token, QoS, topic, payload): what a broker connection hands in per PUBLISH.
Entry = tuple[T, int, str, bytes]

# Messages turned into one Batch list (one queue entry, one lookup of their devices) at most.
CHUNK_MESSAGES = 1000
RETRY_MIN_S, RETRY_MAX_S = 0.2, 5.0


class Interpreter(Protocol):
    async def to_batches(self, messages: Sequence[tuple[str, bytes]]) -> list[Batch]: ...


class Queue(Protocol):
    async def put(
        self, parts: Sequence[Batch], *, transport: str, messages: int | None = None
    ) -> asyncio.Future[WriteResult]: ...


class Pipeline(Generic[T]):
    def __init__(
        self,
        inbound: Interpreter,
        queue: Queue,
        metrics: Metrics,
        *,
        on_stored: Callable[[list[Entry[T]]], None],
        on_room: Callable[[], None] | None = None,
        room_below: int = 0,
    ) -> None:
        """``on_room`` is called when fewer than ``room_below`` messages wait (a producer that paused
        reading its socket resumes)."""
        self._inbound = inbound
        self._queue = queue
        self._on_stored = on_stored
        self._on_room = on_room
        self._room_below = room_below
        self._accepted = metrics.mqtt_messages.labels("accepted")
        self._rejected = metrics.mqtt_messages.labels("rejected")
        # Appended to by the broker connection (the collector's read loop appends in bulk), taken here.
        self.inbox: list[Entry[T]] = []
        self._ready = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()
        self._last_ack: asyncio.Task[None] | None = None
        self._in_commit = 0
        # Cleared while a chunk is being retried: later chunks wait, so they are not stored before it.
        self._clear = asyncio.Event()
        self._clear.set()
        self._retrying = 0
        self._log = Throttle(30.0)

    @property
    def waiting(self) -> int:
        """Messages taken in but not yet acknowledged back (waiting, or in a commit)."""
        return len(self.inbox) + self._in_commit

    def offer(self, token: T, qos: int, topic: str, payload: bytes) -> None:
        self.inbox.append((token, qos, topic, payload))
        self._ready.set()

    def wake(self) -> None:
        """After appending to ``inbox`` directly."""
        if self.inbox:
            self._ready.set()

    async def run(self) -> None:
        while True:
            if not self.inbox:
                self._ready.clear()
                await self._ready.wait()
            if len(self.inbox) <= CHUNK_MESSAGES:
                chunk, self.inbox = self.inbox, []
            else:
                chunk = self.inbox[:CHUNK_MESSAGES]
                del self.inbox[:CHUNK_MESSAGES]
            self._in_commit += len(chunk)
            if self._on_room is not None and len(self.inbox) < self._room_below:
                self._on_room()
            parts = await self._interpret(chunk)
            rejected = sum(1 for part in parts if part.rejected or part.suppressed)
            if rejected:
                self._rejected.inc(rejected)
            if rejected < len(parts):
                self._accepted.inc(len(parts) - rejected)
            await self._clear.wait()
            future = await self._queue.put(parts, transport="mqtt", messages=len(chunk))
            task = asyncio.create_task(self._acknowledge(chunk, parts, future, self._last_ack), name="mqtt-ack")
            self._last_ack = task
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def drain(self, wait_s: float) -> None:
        """Wait (up to ``wait_s``) for what was taken in to be committed and acknowledged."""
        if self._acks:
            await asyncio.wait(self._acks, timeout=wait_s)

    async def _interpret(self, chunk: list[Entry[T]]) -> list[Batch]:
        """Inbound turns every bad message into a rejected record itself; what can fail here is the
        registry lookup (database down): then the chunk is held, unacknowledged, and tried again — turning
        good telemetry into rejects because the database blinked would lose it."""
        messages = [(topic, payload) for _, _, topic, payload in chunk]
        delay = RETRY_MIN_S
        while True:
            try:
                return await self._inbound.to_batches(messages)
            except Exception as exc:
                self._warn("lookup", f"could not look up the devices of {len(chunk)} MQTT messages ({describe(exc)})")
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)

    async def _acknowledge(
        self,
        chunk: list[Entry[T]],
        parts: list[Batch],
        future: asyncio.Future[WriteResult],
        previous: asyncio.Task[None] | None,
    ) -> None:
        delay = RETRY_MIN_S
        retrying = False
        try:
            while True:
                try:
                    await future
                    break
                except Exception as exc:
                    # Not stored, so not acknowledged: try again until it is (the queue has already turned
                    # anything the database refuses for good into rejected records).
                    if not retrying:
                        retrying = True
                        self._retrying += 1
                        self._clear.clear()
                    self._warn("commit", f"commit of {len(chunk)} MQTT messages failed ({describe(exc)}); retrying")
                    await asyncio.sleep(delay)
                    delay = min(RETRY_MAX_S, delay * 2)
                    if previous is not None and not previous.done():
                        await asyncio.wait([previous])  # an earlier chunk is stored first
                    future = await self._queue.put(parts, transport="mqtt", messages=len(chunk))
            if previous is not None and not previous.done():
                await asyncio.wait([previous])  # acknowledgements go out in arrival order
            self._on_stored(chunk)
        finally:
            self._in_commit -= len(chunk)
            if retrying:
                self._retrying -= 1
                if not self._retrying:
                    self._clear.set()

    def _warn(self, kind: str, message: str) -> None:
        suppressed = self._log.allow(kind)
        if suppressed is not None:
            log.warning("%s%s", message, f" ({suppressed} more since)" if suppressed else "")
