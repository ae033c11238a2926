"""Realtime WebSockets, every one fed by committed events (the hub), so what a client sees is stored.

- ``/api/v1/realtime?devices=&types=&since=``: Telemetra's own stream (SPEC §6), with heartbeats, gaps
  and resume from the last event id seen.
- telemetry_app's streams (CLIENTS.md §2.2): ``/api/v1/realtime/subscribe/{id}``,
  ``/api/v1/stream/devices/{id}``, ``/api/v1/stream/all`` (also under ``/compat/telemetry-app``): ``ack``
  on connect, ``pong``, subscribe / unsubscribe, ``error``, ``reading`` messages.
- its ESP32 document's ``/stream/{id}?token=``: the device's commands and configuration, down.
- smart-heat-pump's ``/ws`` and ``/api/ws`` (§3.3): ``sensor_data`` and ``alert``; any text → ``pong``.

Auth is the REST API's (admin / operator / viewer key, the device's own key for its own stream, a trusted
network), from ``X-API-Key``, ``Authorization: Bearer`` or ``?token=``. A refusal accepts the upgrade and
closes with 4401 (no or wrong key) or 4403 (not yours) and the reason; bad parameters close with 4400.
A client that reads too slowly loses its oldest events (the hub's bounded queue) and, on Telemetra's own
stream, is told how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from telemetra.api.deps import _presented_key, resolve_principal
from telemetra.api.realtime_formats import encoded, frame
from telemetra.api.ws_transport import FRAMES_EXTENSION, WriteFrames, WriteFramesNowait, text_frame
from telemetra.domain.errors import Forbidden, NotFound, TelemetraError, Unauthorized
from telemetra.domain.principal import Principal, Role
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.events import model
from telemetra.events.hub import Subscription
from telemetra.events.model import ChangeEvent, Gap
from telemetra.ingest.normalize import valid_device_id
from telemetra.services import Services

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013
# Registry changes after which a device key open on a stream must be checked again.
REVOKING = frozenset({"rotated", "claimed", "disabled", "deleted", "resync"})
MAX_DEVICES = 1000  # in one ``devices=`` filter
MAX_CLIENT_MESSAGE = 4096  # bytes; the clients send pings and subscribe actions
APP_MOUNT = "/compat/telemetry-app"
SEND_BATCH = 64  # messages a stream takes from its queue per wake-up, and hands to the connection at once

# A handler of what the client sends: text in, the messages to answer with out.
OnMessage = Callable[[str], Awaitable[None]]


class Refused(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _reason(text: str) -> str:
    """A close frame carries at most 123 bytes of reason (UTF-8), not characters."""
    return text.encode()[:120].decode("utf-8", "ignore")


def _services(ws: WebSocket) -> Services:
    services: Services = ws.app.state.services
    return services


def _key(ws: WebSocket) -> str | None:
    return ws.query_params.get("token") or _presented_key(ws.headers.get("x-api-key"), ws.headers.get("authorization"))


def _same_site(ws: WebSocket, services: Services) -> bool:
    """A browser always sends Origin on a WebSocket; CORS does not apply to them, so a page of another
    site could read a key-less stream through the visitor's trusted network. Only our own origin (or a
    configured CORS origin) may use a trust that comes from the address."""
    origin = ws.headers.get("origin")
    if origin is None:
        return True  # not a browser: the devices' and apps' own clients
    if origin in services.settings.cors_origins:
        return True
    host = ws.headers.get("host", "")
    return origin.split("://", 1)[-1].rstrip("/") == host


async def _caller(ws: WebSocket, services: Services) -> Principal:
    key = _key(ws)
    host = ws.client.host if ws.client is not None else None
    try:
        principal = await resolve_principal(services, key, host)
    except Unauthorized as exc:
        raise Refused(CLOSE_UNAUTHORIZED, exc.reason) from None
    except Forbidden as exc:
        raise Refused(CLOSE_FORBIDDEN, exc.reason) from None
    except TelemetraError as exc:  # the database is down: credentials cannot be checked now
        raise Refused(CLOSE_TRY_AGAIN, exc.reason) from None
    if principal.role is Role.ANONYMOUS:
        raise Refused(CLOSE_UNAUTHORIZED, "an API key is required (X-API-Key, Authorization: Bearer or ?token=)")
    if principal.trusted_network and not _same_site(ws, services):
        raise Refused(CLOSE_FORBIDDEN, "a key-less stream is not open to pages of another site; send a key")
    return principal


def _device_ids(text: str, field: str) -> frozenset[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise Refused(CLOSE_BAD_REQUEST, f"{field}: give at least one device id")
    if len(ids) > MAX_DEVICES:
        raise Refused(CLOSE_BAD_REQUEST, f"{field}: at most {MAX_DEVICES} devices")
    for device_id in ids:
        if not valid_device_id(device_id):
            raise Refused(
                CLOSE_BAD_REQUEST, f"{field}: {device_id[:40]!r} is not a device id (letters, digits, - _ . :)"
            )
    return frozenset(ids)


def _may_read(principal: Principal, devices: frozenset[str] | None) -> None:
    if principal.reads_everything:
        return
    if devices is None or any(not principal.owns(d) for d in devices):
        raise Refused(CLOSE_FORBIDDEN, "this key may read only its own device's stream")


class _Heartbeat:
    """One timer per stream, on the clock: when a beat is due it marks it and wakes the stream, which
    sends it between batches (busy or idle)."""

    def __init__(self, stream: Stream, interval: float) -> None:
        self._stream = stream
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self.due = False
        self._at = self._loop.time() + interval
        self._timer = self._loop.call_at(self._at, self._fire)

    def _fire(self) -> None:
        self.due = True
        if self._stream.sub is not None:
            self._stream.sub.wake()
        self._at += self._interval
        now = self._loop.time()
        if self._at <= now:  # fell behind (a blocked loop): one beat, then on the clock again
            self._at = now + self._interval
        self._timer = self._loop.call_at(self._at, self._fire)

    def cancel(self) -> None:
        self._timer.cancel()


class Stream:
    """One open WebSocket: its subscription, what it sends, and what it answers."""

    def __init__(self, ws: WebSocket, services: Services, name: str) -> None:
        self.ws = ws
        self.services = services
        self.name = name
        self.sub: Subscription | None = None
        self.last_id: int | None = None
        self.closing: Refused | None = None  # why the server ends the stream, when it does
        self._watch: asyncio.Task[None] | None = None
        # The fast path (``_take_now``): the format and the connection's synchronous frame writer, while
        # ``run`` sends a format's prebuilt frames; and the subscription whose ``wait()`` the sender is in.
        self._direct: tuple[str, WriteFramesNowait] | None = None
        self._parked: Subscription | None = None

    def watch_key(self, principal: Principal) -> None:
        """A device's (or gateway's) key is checked at connect; if it is rotated, disabled or deleted while
        the stream is open, the stream ends (4401/4403), as its MQTT session would."""
        if principal.device_id is None or principal.reads_everything:
            return
        revocations = self.services.hub.subscribe(types=(model.DEVICE,), devices=(principal.device_id,), maxsize=16)
        self._watch = asyncio.create_task(self._revoked(revocations), name=f"ws-key-{self.name}")

    async def _revoked(self, revocations: Subscription) -> None:
        try:
            async for item in revocations:
                if isinstance(item, ChangeEvent) and item.data.get("change") not in REVOKING:
                    continue
                # Not the cache: its own follower may not have dropped the entry yet (another process's change).
                self.services.directory.invalidate(item.device_id if isinstance(item, ChangeEvent) else None)
                try:  # a change that ends this key, or missed changes: ask the registry afresh
                    await _caller(self.ws, self.services)
                except Refused as refused:
                    self.end(refused)
                    return
        finally:
            revocations.close()

    def end(self, refused: Refused) -> None:
        """Close the stream from the server side with ``refused``'s code and reason."""
        self.closing = refused
        if self.sub is not None:
            self.sub.close()

    def release(self) -> None:
        """Whatever happened: the subscription and the key watch go (a handler calls this in ``finally``)."""
        if self.sub is not None:
            self.sub.close()
        if self._watch is not None:
            self._watch.cancel()

    async def refuse(self, refused: Refused) -> None:
        self.services.streams.refused += 1
        await self.ws.accept()
        await self.ws.close(refused.code, _reason(refused.reason))

    def subscribe(self, *, types: frozenset[str] | None, devices: frozenset[str] | None, since: int | None) -> None:
        if self.sub is not None:
            self.sub.close()
        self.sub = self.services.hub.subscribe(
            types=types, devices=devices, since=since, maxsize=self.services.settings.ws_queue_size
        )
        self.services.streams.track(self.sub)
        if self._direct is not None:
            self.sub.take_directly(self._take_now)

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(orjson.dumps(message).decode())

    def _frames_writer(self) -> WriteFrames | None:
        """The server's way of taking prebuilt frames, when this connection has one (no compression)."""
        extension = self.ws.scope.get("extensions", {}).get(FRAMES_EXTENSION)
        return extension.get("write") if isinstance(extension, dict) else None

    def _frames_writer_nowait(self) -> WriteFramesNowait | None:
        extension = self.ws.scope.get("extensions", {}).get(FRAMES_EXTENSION)
        return extension.get("write_nowait") if isinstance(extension, dict) else None

    def _take_now(self, sub: Subscription) -> bool:
        """The hub's synchronous hand-over, right after a publish: while the sender is idle in this
        subscription's ``wait()`` and the connection is writable, what was offered goes out now as one write
        of prebuilt frames — no task switch per delivery, the same order, the same bounded queue (a client
        that does not read pauses the transport, and then the sender's own path waits for it)."""
        direct = self._direct
        if direct is None or self._parked is not sub or sub is not self.sub or self.closing is not None:
            return False
        fmt, write_nowait = direct
        if not write_nowait(b""):  # closing, or paused by flow control: the sender waits for it
            return False
        items = sub.take_many(sub.pending)
        out: list[bytes] = []
        last_id = self.last_id
        try:
            for item in items:
                if type(item) is ChangeEvent:
                    last_id = item.id
                    built = item.frames.get(fmt) or frame(item, fmt)
                    if built:
                        out.append(built)
        except Exception:
            log.exception("realtime %s stream: an event could not be framed", self.name)
            self.end(Refused(CLOSE_INTERNAL, "an event could not be sent"))
            return True
        self.last_id = last_id
        if out:
            write_nowait(out[0] if len(out) == 1 else b"".join(out))
        return True

    async def run(
        self,
        render: Callable[[ChangeEvent | Gap], Awaitable[str | None]],
        on_message: OnMessage | None,
        *,
        heartbeat_s: float | None = None,
        fmt: str | None = None,
    ) -> None:
        """Send what the subscription yields until the client leaves (or the server stops).

        Each wake-up takes up to ``SEND_BATCH`` items and hands their messages to the connection at once.
        With ``fmt`` (a format of ``realtime_formats``) an event's message is that format's, framed once
        for every client; ``render`` gives the rest (a gap; every item of a stream without ``fmt``).
        A ``render`` that sends by itself (the device stream) must return None: what it returns goes out
        after the batch."""
        streams = self.services.streams
        streams.opened(self.name)
        reader = asyncio.create_task(self._read(on_message), name=f"ws-read-{self.name}")
        writer = self._frames_writer()
        beat = _Heartbeat(self, heartbeat_s) if heartbeat_s else None
        nowait = self._frames_writer_nowait() if writer is not None and fmt is not None else None
        if nowait is not None and fmt is not None and self.sub is not None:
            self._direct = (fmt, nowait)
            self.sub.take_directly(self._take_now)
        try:
            while not reader.done():
                sub = self.sub
                assert sub is not None
                batch = sub.take_many(SEND_BATCH)
                if not batch:
                    if beat is not None and beat.due:
                        await self._beat(beat, writer)
                        continue
                    if sub.closed:
                        if sub is self.sub:  # closed by the server, not replaced by a subscribe action
                            break
                        continue
                    self._parked = sub
                    try:
                        await sub.wait()
                    finally:
                        self._parked = None
                    continue
                try:
                    if writer is not None:
                        await writer(await self._frames(batch, render, fmt))
                    else:
                        await self._send_texts(None, await self._texts(batch, render, fmt))
                except Refused as refused:
                    self.end(refused)
                    break
                if beat is not None and beat.due:  # on the clock, busy or not
                    await self._beat(beat, writer)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send
        finally:
            self._direct = None
            if self.sub is not None:
                self.sub.take_directly(None)
            if beat is not None:
                beat.cancel()
            streams.closed(self.name)
            self.release()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if self.ws.application_state is WebSocketState.CONNECTED:
                code, reason = (self.closing.code, self.closing.reason) if self.closing else (1001, "server stopping")
                with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                    await self.ws.close(code, _reason(reason))

    async def _beat(self, beat: _Heartbeat, writer: WriteFrames | None) -> None:
        beat.due = False
        await self._send_texts(writer, [orjson.dumps({"type": "heartbeat", "ts": ms_to_iso(now_ms())}).decode()])

    def _seen(self, item: ChangeEvent | Gap) -> None:
        if isinstance(item, ChangeEvent):
            self.last_id = item.id
        else:
            self.services.streams.gaps += 1

    async def _frames(
        self,
        batch: list[ChangeEvent | Gap],
        render: Callable[[ChangeEvent | Gap], Awaitable[str | None]],
        fmt: str | None,
    ) -> list[bytes]:
        out: list[bytes] = []
        for item in batch:
            if fmt is not None and type(item) is ChangeEvent:
                self.last_id = item.id
                built = item.frames.get(fmt) or frame(item, fmt)  # built by the first client of the format
                if built:
                    out.append(built)
                continue
            self._seen(item)
            text = await render(item)
            if text is not None:
                out.append(text_frame(text.encode()))
        return out

    async def _texts(
        self,
        batch: list[ChangeEvent | Gap],
        render: Callable[[ChangeEvent | Gap], Awaitable[str | None]],
        fmt: str | None,
    ) -> list[str]:
        out: list[str] = []
        for item in batch:
            self._seen(item)
            text = encoded(item, fmt) if fmt is not None and isinstance(item, ChangeEvent) else await render(item)
            if text is not None:
                out.append(text)
        return out

    async def _send_texts(self, writer: WriteFrames | None, texts: list[str]) -> None:
        if writer is not None:
            await writer([text_frame(text.encode()) for text in texts])
            return
        for text in texts:  # the server's writes within one loop turn still leave together
            await self.ws.send_text(text)

    async def _read(self, on_message: OnMessage | None) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None and message.get("bytes") is not None:
                    text = message["bytes"].decode("utf-8", "replace")
                if on_message is not None and text is not None:
                    await on_message(text[:MAX_CLIENT_MESSAGE])
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            if self.sub is not None:
                self.sub.close()  # wakes the sender, which ends the stream


def _format(name: str) -> Callable[[ChangeEvent | Gap], Awaitable[str | None]]:
    """The ``render`` of format ``name``'s streams (used with ``fmt=name``, which frames the events once)."""

    async def render(item: ChangeEvent | Gap) -> str | None:
        if isinstance(item, Gap):
            return orjson.dumps({"type": "gap", "missed": item.missed}).decode() if name == "telemetra" else None
        return encoded(item, name)

    return render


# --- Telemetra's own stream -------------------------------------------------------------------------------


@router.websocket("/api/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    services = _services(ws)
    stream = Stream(ws, services, "realtime")
    params = ws.query_params
    try:
        principal = await _caller(ws, services)
        devices = _device_ids(params["devices"], "devices") if params.get("devices") else None
        if devices is None and not principal.reads_everything and principal.device_id is not None:
            devices = frozenset((principal.device_id,))
        _may_read(principal, devices)
        types = _types(params.get("types"))
        since = _since(params.get("since"))
    except Refused as refused:
        await stream.refuse(refused)
        return
    await ws.accept()
    try:
        stream.watch_key(principal)
        stream.subscribe(types=types, devices=devices, since=since)
        await stream.run(
            _format("telemetra"), None, heartbeat_s=services.settings.ws_heartbeat_interval, fmt="telemetra"
        )
    finally:
        stream.release()


def _types(text: str | None) -> frozenset[str] | None:
    if not text:
        return None
    types = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(types - model.TYPES)
    if unknown:
        raise Refused(
            CLOSE_BAD_REQUEST, f"types: unknown {', '.join(unknown)[:60]}; use {', '.join(sorted(model.TYPES))}"
        )
    return types or None


def _since(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 19:
        raise Refused(CLOSE_BAD_REQUEST, "since: the id of the last event received (a non-negative integer)")
    return int(text)


# --- telemetry_app ----------------------------------------------------------------------------------------


async def _telemetry_app(ws: WebSocket, device_id: str | None) -> None:
    services = _services(ws)
    stream = Stream(ws, services, "telemetry_app")
    try:
        principal = await _caller(ws, services)
        devices = _device_ids(device_id, "device_id") if device_id is not None else None
        _may_read(principal, devices)
    except Refused as refused:
        await stream.refuse(refused)
        return
    await ws.accept()
    try:
        await _telemetry_app_stream(stream, principal, device_id, devices)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # gone before the stream began
    finally:
        stream.release()


async def _telemetry_app_stream(
    stream: Stream, principal: Principal, device_id: str | None, devices: frozenset[str] | None
) -> None:
    services = stream.services
    stream.watch_key(principal)
    watched: set[str] | None = set(devices) if devices is not None else None
    stream.subscribe(types=frozenset((model.TELEMETRY,)), devices=devices, since=None)
    await stream.send(
        {"type": "ack", "message": "connected" + (f" to {device_id}" if device_id else " to all devices")}
    )

    async def on_message(text: str) -> None:
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            await stream.send({"type": "error", "error": "message is not JSON", "code": "INVALID_JSON"})
            return
        action = message.get("action") if isinstance(message, dict) else None
        if action == "ping":
            await stream.send({"type": "pong"})
            return
        if action not in ("subscribe", "unsubscribe"):
            await stream.send(
                {"type": "error", "error": f"unknown action {str(action)[:40]!r}", "code": "UNKNOWN_ACTION"}
            )
            return
        given = message.get("device_id")
        try:
            ids = _device_ids(given if isinstance(given, str) else "", "device_id")
            if len(ids) != 1:
                raise Refused(CLOSE_BAD_REQUEST, "device_id: one device id per action")
            (target,) = ids
            _may_read(principal, ids)
        except Refused as refused:
            await stream.send({"type": "error", "error": refused.reason, "code": "INVALID_DEVICE"})
            return
        if watched is not None:  # the all-devices stream already has every device
            changed = target not in watched if action == "subscribe" else target in watched
            (watched.add if action == "subscribe" else watched.discard)(target)
            if changed:  # resubscribe from the last event seen, so nothing in between is lost
                stream.subscribe(
                    types=frozenset((model.TELEMETRY,)),
                    devices=frozenset(watched),
                    since=stream.last_id if stream.last_id is not None else services.hub.last_id,
                )
        await stream.send({"type": "ack", "message": f"{action}d {target}"})

    await stream.run(_format("telemetry_app"), on_message, fmt="telemetry_app")


@router.websocket("/api/v1/realtime/subscribe/{device_id}")
@router.websocket("/api/v1/stream/devices/{device_id}")
@router.websocket(APP_MOUNT + "/api/v1/stream/devices/{device_id}")
async def telemetry_app_device(ws: WebSocket, device_id: str) -> None:
    await _telemetry_app(ws, device_id)


@router.websocket("/api/v1/stream/all")
@router.websocket(APP_MOUNT + "/api/v1/stream/all")
async def telemetry_app_all(ws: WebSocket) -> None:
    await _telemetry_app(ws, None)


# --- the ESP32 document's device stream: commands and configuration down ---------------------------------


@router.websocket("/stream/{device_id}")
async def device_stream(ws: WebSocket, device_id: str) -> None:
    services = _services(ws)
    stream = Stream(ws, services, "device")
    try:
        principal = await _caller(ws, services)
        devices = _device_ids(device_id, "device_id")
        if not (principal.device_id == device_id or principal.operates):
            raise Refused(CLOSE_FORBIDDEN, f"this key may not take device {device_id!r}'s commands")
    except Refused as refused:
        await stream.refuse(refused)
        return
    await ws.accept()
    try:
        await _device_stream(stream, principal, device_id, devices)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # gone before the stream began (what was taken for it went back to the queue)
    finally:
        stream.release()


async def _device_stream(stream: Stream, principal: Principal, device_id: str, devices: frozenset[str]) -> None:
    services = stream.services
    commands = services.commands
    stream.watch_key(principal)
    # Subscribed before the first take, so a command queued in between is not missed.
    stream.subscribe(types=frozenset((model.COMMAND, model.DEVICE)), devices=devices, since=None)

    async def deliver() -> None:
        taken = await commands.take(device_id, via="ws")
        for i, command in enumerate(taken):
            params = command.params if isinstance(command.params, dict) else {"value": command.params}
            try:
                await stream.send({"type": "command", "id": command.id, "payload": {"action": command.name, **params}})
            except BaseException:
                await commands.repo.release([c.id for c in taken[i:]])  # not delivered: queued again
                raise

    async def config() -> None:
        try:
            device = await services.devices.get(device_id)
        except NotFound:
            raise Refused(CLOSE_NOT_FOUND, f"device {device_id!r} is not registered") from None
        if device.desired_config:
            payload = {**device.desired_config, "version": device.desired_version}
            await stream.send({"type": "config_update", "payload": payload})

    async def render(item: ChangeEvent | Gap) -> str | None:
        if isinstance(item, Gap):
            await config()
            await deliver()
        elif item.type == model.COMMAND and item.data.get("status") == "queued":
            await deliver()
        elif item.type == model.DEVICE and item.data.get("change") == "deleted":
            raise Refused(CLOSE_NOT_FOUND, f"device {device_id!r} was deleted")
        elif item.type == model.DEVICE and item.data.get("change") == "config":
            await config()
        return None

    try:
        await config()
        await deliver()
    except Refused as refused:
        await stream.ws.close(refused.code, _reason(refused.reason))
        return
    except (WebSocketDisconnect, RuntimeError, OSError):
        raise
    except Exception as exc:  # the database cannot answer now: the device should come back later
        log.warning("device stream of %s could not start: %s", device_id, exc)
        await stream.ws.close(CLOSE_TRY_AGAIN, "storage unavailable; try again later")
        return
    await stream.run(render, None)


# --- smart-heat-pump's dashboard ---------------------------------------------------------------------------


@router.websocket("/ws")
@router.websocket("/api/ws")
async def heatpump(ws: WebSocket) -> None:
    services = _services(ws)
    stream = Stream(ws, services, "heatpump")
    try:
        principal = await _caller(ws, services)
        _may_read(principal, None)
    except Refused as refused:
        await stream.refuse(refused)
        return
    await ws.accept()

    async def on_message(_text: str) -> None:
        await stream.send({"type": "pong", "timestamp": ms_to_iso(now_ms())})

    try:
        stream.subscribe(types=frozenset((model.TELEMETRY, model.ALERT)), devices=None, since=None)
        await stream.run(_format("heatpump"), on_message, fmt="heatpump")
    finally:
        stream.release()
