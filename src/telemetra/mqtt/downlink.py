"""Commands and desired configuration, down to devices.

A command is stored first (queued), then published when the device is online, on each enabled scheme's
command topic in that scheme's shape (``mqtt.shapes``: ``{prefix}/{device}/cmd`` with ``{"id","name",…}``,
``heatpump/{device}/commands`` with ``{"command": …}``, …). It becomes ``sent`` once the broker has it,
``acked``/``failed`` when the device answers on ``event/ack`` (or the HTTP ack), ``expired`` after its TTL.
A device that is offline gets its queued commands when it comes back. Devices that speak only HTTP poll
for them instead; a poll also takes commands that went out over MQTT and stay unanswered.

Every status change is a ``command`` event (``emit``); the service also follows the hub (``follow``):
command events wake ``?wait`` callers — whichever process committed the device's answer — and a device
coming online gets what is queued for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from telemetra.aio import wait_set
from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent, Gap
from telemetra.mqtt.shapes import DownlinkPlan
from telemetra.storage.commands import CommandRepository
from telemetra.storage.faults import DatabaseState, is_transient
from telemetra.storage.schema import CommandRow

log = logging.getLogger(__name__)

EXPIRY_SWEEP_S = 5.0
# A waiter is woken by the command's events; it re-reads the row this often anyway, in case an event
# never came (another process's notification lost with its connection).
WAIT_RECHECK_S = 5.0
HTTP_RESEND_S = 30  # an unanswered command is handed to an HTTP poller again after this long


class Publisher(Protocol):
    """What the downlink needs from an MQTT connection (the collector's client)."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None: ...


Emit = Callable[[Sequence[ChangeEvent]], Awaitable[None]]


class _DeviceLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class _Wakeups:
    """Events by key (a command id, a device id) that exist only while someone waits on them: several
    waiters of one key share its event, and the last one to leave forgets it."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, list[int]]] = {}

    @contextmanager
    def waiting(self, key: str) -> Iterator[asyncio.Event]:
        event, users = self._events.setdefault(key, (asyncio.Event(), [0]))
        users[0] += 1
        try:
            yield event
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._events[key]

    def wake(self, key: str) -> None:
        entry = self._events.get(key)
        if entry is not None:
            entry[0].set()

    def wake_all(self) -> None:
        for event, _ in self._events.values():
            event.set()


class CommandService:
    def __init__(
        self,
        repo: CommandRepository,
        *,
        plan: DownlinkPlan,
        is_online: Callable[[str], Any],
        emit: Emit | None = None,
        database: DatabaseState | None = None,
    ) -> None:
        self.repo = repo
        self._database = database
        self._emit = emit
        self._plan = plan
        self._is_online = is_online
        self.publisher: Publisher | None = None
        self._changed = _Wakeups()  # command id → set when its status may have changed
        self._arrivals = _Wakeups()  # device id → set when a command is queued for it
        self._dispatching: dict[str, _DeviceLock] = {}  # device id → held while publishing to it
        self._tasks: set[asyncio.Task[int]] = set()

    async def create(self, device_id: str, name: str, params: Any, *, ttl_s: int) -> CommandRow:
        self._plan.check_command(name, params)  # refused now (422) rather than never delivered
        command = await self.repo.create(device_id, name, params, now_ms=now_ms(), ttl_s=ttl_s)
        await self._status(device_id, command.id, "queued", name=name)
        self._arrivals.wake(device_id)
        if await self._is_online(device_id):
            await self.dispatch(device_id)
        return await self.repo.get(command.id)

    async def dispatch(self, device_id: str) -> int:
        """Publish what is queued for ``device_id`` (it is online now).

        Each command is claimed (queued → sent, a guarded UPDATE) before it is published, so two
        dispatches — here or in another process — never both publish it; a failed publish puts it back.
        The per-device lock keeps the order in which commands were queued."""
        publisher = self.publisher
        if publisher is None or not publisher.connected:
            return 0
        entry = self._dispatching.setdefault(device_id, _DeviceLock())
        entry.users += 1
        try:
            async with entry.lock:
                return await self._dispatch(device_id, publisher)
        finally:
            entry.users -= 1
            if entry.users == 0:  # nobody waits behind us: forget the lock
                del self._dispatching[device_id]

    async def _dispatch(self, device_id: str, publisher: Publisher) -> int:
        queued = await self.repo.queued(device_id, now_ms=now_ms())
        if not queued:
            return 0
        claimed = set(await self.repo.mark_sent([c.id for c in queued], now_ms=now_ms(), via="mqtt"))
        mine = [c for c in queued if c.id in claimed]  # the rest someone else took
        # "sent" is said as it is stored (at the claim), so it can never follow the device's answer.
        for command in mine:
            await self._status(device_id, command.id, "sent", name=command.name)
        for i, command in enumerate(mine):
            outgoing = self._plan.command(
                device_id,
                command_id=command.id,
                name=command.name,
                params=command.params,
                created_ms=command.created_at,
            )
            try:
                for message in outgoing:
                    await publisher.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            except Exception as exc:  # this one and those after it back to queued; the next dispatch retries
                log.warning("could not publish command %s: %s", command.id, exc)
                await self.repo.release([c.id for c in mine[i:]])
                for back in mine[i:]:
                    await self._status(device_id, back.id, "queued", name=back.name)
                return i
        return len(mine)

    async def _status(self, device_id: str, command_id: str, status: str, *, name: str | None = None) -> None:
        self._notify(command_id)
        if self._emit is not None:
            data: dict[str, Any] = {"id": command_id, "status": status}
            if name is not None:
                data["name"] = name
            await self._emit([ChangeEvent(model.COMMAND, device_id, now_ms(), data)])

    async def publish_config(self, device_id: str, config: dict[str, Any], version: int) -> bool:
        publisher = self.publisher
        if publisher is None or not publisher.connected:
            return False
        outgoing = self._plan.config(device_id, config, version)
        for message in outgoing:
            await publisher.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
        return bool(outgoing)

    async def wait(self, command_id: str, wait_s: float) -> CommandRow:
        """The command once it is answered (acked/failed/expired), or as it is when ``wait_s`` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        with self._changed.waiting(command_id) as event:
            while True:
                command = await self.repo.get(command_id)
                remaining = deadline - loop.time()
                if command.status in ("acked", "failed", "expired") or remaining <= 0:
                    return command
                event.clear()
                await wait_set(event, min(remaining, WAIT_RECHECK_S))

    async def poll(self, device_id: str, *, wait_s: float) -> list[CommandRow]:
        """HTTP-only devices: queued commands (marked sent), waiting up to ``wait_s`` for one to arrive.

        Commands already published over MQTT but unanswered are handed over too: a device that polls is
        not listening on MQTT (HTTP telemetry marks it online, so ``create`` may have published)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        with self._arrivals.waiting(device_id) as arrived:
            while True:
                arrived.clear()
                taken = await self.take(device_id, via="http", resend_after_s=HTTP_RESEND_S)
                if taken:
                    return taken
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return []
                await wait_set(arrived, min(remaining, WAIT_RECHECK_S))

    async def take(self, device_id: str, *, via: str, resend_after_s: float | None = None) -> list[CommandRow]:
        """Claim what is queued for ``device_id`` for a channel other than MQTT (an HTTP poll, a WebSocket),
        marking it sent; with ``resend_after_s``, also what was handed out that long ago and never answered."""
        now = now_ms()
        resend = now - int(resend_after_s * 1000) if resend_after_s is not None else None
        commands = await self.repo.queued(device_id, now_ms=now, for_poll_before=resend)
        if not commands:
            return []
        moved = set(await self.repo.mark_sent([c.id for c in commands], now_ms=now, via=via, for_poll_before=resend))
        taken = [c for c in commands if c.id in moved]
        for command in taken:
            await self._status(device_id, command.id, "sent", name=command.name)
        return taken

    async def follow(self, hub: EventHub) -> None:
        """Runs until cancelled: command events wake their waiters (and pollers, for a command queued in
        another process); a device that comes online gets what is queued for it."""
        async with hub.subscribe(types=(model.COMMAND, model.STATE), maxsize=10_000) as events:
            async for event in events:
                if isinstance(event, Gap):
                    log.warning("command service missed %s events; waking every waiter", event.missed)
                    self._changed.wake_all()
                    self._arrivals.wake_all()
                    continue
                if event.type == model.COMMAND:
                    self._notify(str(event.data.get("id")))
                    if event.data.get("status") == "queued" and event.device_id is not None:
                        self._arrivals.wake(event.device_id)
                elif event.data.get("online") is True and event.device_id is not None:
                    self._dispatch_soon(event.device_id)

    def _dispatch_soon(self, device_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.dispatch(device_id), name=f"dispatch-{device_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _notify(self, command_id: str) -> None:
        self._changed.wake(command_id)

    async def run_expiry(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_SWEEP_S)
            began = DatabaseState.attempt()
            try:
                expired = await self.repo.expire(now_ms=now_ms())
            except Exception as exc:  # the sweep retries next round
                if self._database is not None and is_transient(exc):
                    self._database.failed(exc)  # an outage is logged once, not once per sweep
                else:
                    log.warning("command expiry sweep failed: %s", exc)
                continue
            if self._database is not None:
                self._database.succeeded(began)
            if expired:
                log.info("expired %d commands", len(expired))
                for command_id, device_id in expired:
                    await self._status(device_id, command_id, "expired")
