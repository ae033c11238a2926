"""The in-process event hub: committed changes in, every interested subscriber out, nobody waits.

``publish`` is synchronous and never blocks the writer: each subscriber has a bounded queue, and a
subscriber that falls behind loses its oldest events and is told how many (a ``Gap``) before the next
one it gets. Subscribers filter by event type and by device; the hub indexes them by device, so a
per-device subscriber costs nothing for other devices' events. A subscriber may also take what a publish
offered it synchronously, right after that publish (``take_directly``: a realtime stream writes it to its
socket at once), instead of being woken — a task switch per delivery saved. The last ``history`` events
are kept, so a client that reconnects with the last id it saw gets what it missed — or a ``Gap`` when that
is gone.

Event ids are this process's: every process numbers the events it hands out (its own and, through the
event bridge, the others'), so behind a load balancer a client's reconnect may reach a process to which
its id means nothing. An id therefore says which run of which process issued it — ``sequence ×
ID_STRIDE + tag``, the tag drawn at random when the hub is made, the sequence starting at the start
time in ms — and an id this run did not issue (another process's, an earlier run's, one not issued yet)
is answered with ``Gap(UNKNOWN)`` instead of a replay from a wrong place. Two processes draw the same tag
once in ``ID_STRIDE``; the start-time range still tells their ids apart unless they started within
moments of each other. Ids stay below 2**53, exact in JavaScript.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

from telemetra.domain.timeutil import now_ms
from telemetra.events.model import ChangeEvent, Gap

DEFAULT_HISTORY = 10_000
DEFAULT_QUEUE = 1_000
# After the last subscriber of a type leaves, its events are still built (and kept) this long, so a
# client that reconnects can resume from the last one it saw.
RESUME_WINDOW_S = 600.0
UNKNOWN = -1  # Gap.missed when the count cannot be known (a resume with an id this run did not issue)
ID_STRIDE = 1_000  # an event id is sequence * ID_STRIDE + the hub's tag

# A subscriber's synchronous taker (``Subscription.take_directly``): given the subscription after a publish
# that offered it something, takes what it can now and says whether it did; False wakes ``wait()`` instead.
Taker = Callable[["Subscription"], bool]


class Subscription:
    """An async iterator of ``ChangeEvent`` and ``Gap``; ``close()`` (or leaving ``async with``) ends it."""

    def __init__(
        self,
        hub: EventHub,
        *,
        types: frozenset[str] | None,
        devices: frozenset[str] | None,
        maxsize: int,
    ) -> None:
        self._hub = hub
        self.types = types
        self.devices = devices
        self._maxsize = maxsize
        self._queue: deque[ChangeEvent] = deque()
        self._missed = 0
        self._ready = asyncio.Event()
        self.closed = False
        self.delivered = 0
        self._taker: Taker | None = None
        self._marked = False  # on the hub's list of subscriptions to hand to their taker

    def wants(self, event: ChangeEvent) -> bool:
        return self.types is None or event.type in self.types

    def offer(self, event: ChangeEvent) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            if self._missed != UNKNOWN:  # "unknown" stays unknown
                self._missed += 1
        self._queue.append(event)
        if self._taker is None:
            self._ready.set()
        elif not self._marked:  # handed to the taker once, after the publish (one call for a batch)
            self._marked = True
            self._hub._mark(self)

    def take_directly(self, taker: Taker | None) -> None:
        """Let ``taker`` take what a publish offered synchronously, right after that publish, instead of
        waking ``wait()`` — no task switch per delivery. When it returns False (it cannot now: the client
        is not writable, say), ``wait()`` is woken as usual and the items are still queued. A ``Gap``, a
        ``wake()`` and ``close()`` always wake ``wait()``. ``None``: back to waking ``wait()``."""
        self._taker = taker
        if taker is None and (self._queue or self._missed):
            self._ready.set()

    def _hand_over(self) -> None:
        self._marked = False
        if self.closed or not (self._queue or self._missed):
            return
        taker = self._taker
        handled = False
        if taker is not None and not self._missed:
            try:
                handled = taker(self)
            except Exception:  # the taker's failure is its subscriber's, never the hub's: wake it instead
                handled = False
        if not handled or self._queue or self._missed:
            self._ready.set()

    def note_missed(self, missed: int) -> None:
        self._missed = UNKNOWN if missed == UNKNOWN or self._missed == UNKNOWN else self._missed + missed
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def take_nowait(self) -> ChangeEvent | Gap | None:
        if self.closed:
            return None
        if self._missed:
            missed, self._missed = self._missed, 0
            return Gap(missed)
        if self._queue:
            self.delivered += 1
            return self._queue.popleft()
        self._ready.clear()
        return None

    def take_many(self, limit: int) -> list[ChangeEvent | Gap]:
        """Up to ``limit`` items at once (a ``Gap`` first when events were lost), oldest first; empty when
        there is nothing now (or the subscription is closed). A stream drains its queue this way, one
        wake-up for a whole batch rather than one await per event."""
        if self.closed:
            return []
        queue = self._queue
        out: list[ChangeEvent | Gap]
        if self._missed:
            out = [Gap(self._missed)]
            self._missed = 0
        elif not queue:
            self._ready.clear()
            return []
        else:
            out = []
        room = limit - len(out)
        if len(queue) <= room:  # the usual case: everything (copied and cleared in C)
            taken = len(queue)
            out.extend(queue)
            queue.clear()
        else:
            taken = room
            popleft = queue.popleft
            out.extend([popleft() for _ in range(room)])
        self.delivered += taken
        if not queue:
            self._ready.clear()
        return out

    async def wait(self) -> None:
        """Until there is something to take, the subscription is closed, or someone calls ``wake()``."""
        if self.closed or self._queue or self._missed:
            return
        await self._ready.wait()
        if not (self.closed or self._queue or self._missed):
            self._ready.clear()  # woken for something else (a heartbeat due): the next wait waits again

    def wake(self) -> None:
        """End a ``wait()`` now, with nothing to take (the stream has something of its own to send)."""
        self._ready.set()

    async def next(self) -> ChangeEvent | Gap:
        while True:
            item = self.take_nowait()
            if item is not None:
                return item
            if self.closed:
                raise StopAsyncIteration
            await self._ready.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChangeEvent | Gap:
        return await self.next()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.clear()  # nothing more is handed out (a replacement replays from the last id)
            self._missed = 0
            self._hub._remove(self)
            self._ready.set()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self, *, history: int = DEFAULT_HISTORY, tag: int | None = None) -> None:
        """``tag``: the low part of every id (0 ≤ tag < ID_STRIDE); drawn at random when not given."""
        # The sequence starts at the start time in ms, so a restarted process (even one that drew the same
        # tag) does not issue again an id that a client of its earlier run still holds.
        self._tag = secrets.randbelow(ID_STRIDE) if tag is None else tag
        if not 0 <= self._tag < ID_STRIDE:
            raise ValueError(f"tag must be in [0, {ID_STRIDE})")
        self._start_id = now_ms() * ID_STRIDE + self._tag
        self._ids = itertools.count(self._start_id, ID_STRIDE)
        self._history: deque[ChangeEvent] = deque(maxlen=history)
        self._everything: list[Subscription] = []  # no device filter
        self._by_device: dict[str, list[Subscription]] = {}
        self._any_type = 0  # subscriptions of every type
        self._by_type: Counter[str] = Counter()
        self._left_at: dict[str | None, float] = {}  # type (None: every type) → when its last subscriber left
        self.published = 0
        self._marked: list[Subscription] = []  # offered something by the publish in progress; have a taker
        self._handing_over = False

    def wants(self, event_type: str) -> bool:
        """Does any subscriber take events of ``event_type``, or may one resume soon? (Saves building the
        events nobody will read.)"""
        if self._any_type > 0 or self._by_type[event_type] > 0:
            return True
        since = max(self._left_at.get(event_type, -RESUME_WINDOW_S), self._left_at.get(None, -RESUME_WINDOW_S))
        return time.monotonic() - since < RESUME_WINDOW_S

    @property
    def subscribers(self) -> int:
        return len(self._everything) + sum(len(s) for s in self._by_device.values())

    @property
    def last_id(self) -> int:
        """The newest id issued; before the first, the id just before it (a resume from it misses nothing)."""
        return self._history[-1].id if self._history else self._start_id - ID_STRIDE

    def issued(self, event_id: int) -> bool:
        """Did this run of this hub issue ``event_id`` (or is it the id just before its first)?"""
        return event_id % ID_STRIDE == self._tag and self._start_id - ID_STRIDE <= event_id <= self.last_id

    def missed_unknown(self) -> None:
        """Events were lost on the way here (a listener that reconnected): every subscriber is told."""
        for sub in self._subscriptions():
            sub.note_missed(UNKNOWN)

    def _subscriptions(self) -> list[Subscription]:
        subs = {id(s): s for s in self._everything}
        for device_subs in self._by_device.values():
            subs.update((id(s), s) for s in device_subs)
        return list(subs.values())

    def publish(self, events: Iterable[ChangeEvent]) -> None:
        ids, history, everything, by_device = self._ids, self._history, self._everything, self._by_device
        for event in events:
            event.id = next(ids)
            history.append(event)
            self.published += 1
            for sub in everything:
                if sub.types is None or event.type in sub.types:
                    sub.offer(event)
            if event.device_id is not None:
                for sub in by_device.get(event.device_id, ()):
                    if sub.types is None or event.type in sub.types:
                        sub.offer(event)
        if self._marked and not self._handing_over:
            self._hand_over()

    def _mark(self, sub: Subscription) -> None:
        self._marked.append(sub)

    def _hand_over(self) -> None:
        """Every subscription with a taker that was offered something, to its taker, once per publish. (A
        publish from within a taker adds to the list being handed over, not a nested round.)"""
        self._handing_over = True
        try:
            marked = self._marked
            i = 0
            while i < len(marked):
                marked[i]._hand_over()
                i += 1
        finally:
            self._marked = []
            self._handing_over = False

    def subscribe(
        self,
        *,
        types: Iterable[str] | None = None,
        devices: Iterable[str] | None = None,
        since: int | None = None,
        maxsize: int = DEFAULT_QUEUE,
    ) -> Subscription:
        sub = Subscription(
            self,
            types=frozenset(types) if types is not None else None,
            devices=frozenset(devices) if devices is not None else None,
            maxsize=maxsize,
        )
        if since is not None:
            self._replay(sub, since)
        if sub.types is None:
            self._any_type += 1
        else:
            self._by_type.update(sub.types)
        if sub.devices is None:
            self._everything.append(sub)
        else:
            for device in sub.devices:
                self._by_device.setdefault(device, []).append(sub)
        return sub

    def _replay(self, sub: Subscription, since: int) -> None:
        kept: Sequence[ChangeEvent] = self._history
        if not self.issued(since):
            # Another process's or an earlier run's id: what came since is not known here, so all that is
            # kept follows the gap (some of it the client may have seen: at least once, not at most once).
            sub.note_missed(UNKNOWN)
            since = -1
        elif kept and since < kept[0].id - ID_STRIDE:
            sub.note_missed((kept[0].id - since) // ID_STRIDE - 1)
        for event in kept:
            if event.id > since and sub.wants(event) and (sub.devices is None or event.device_id in sub.devices):
                sub.offer(event)

    def _remove(self, sub: Subscription) -> None:
        left = time.monotonic()
        if sub.types is None:
            self._any_type -= 1
            self._left_at[None] = left
        else:
            self._by_type.subtract(sub.types)
            self._left_at.update(dict.fromkeys(sub.types, left))
        if sub.devices is None:
            if sub in self._everything:
                self._everything.remove(sub)
            return
        for device in sub.devices:
            subs = self._by_device.get(device)
            if subs and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._by_device[device]
