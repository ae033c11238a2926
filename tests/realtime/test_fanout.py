"""The fan-out's own parts: a subscription drained in batches (a Gap first when it fell behind), frames
built once per event and format — the very bytes every uncompressed client receives — writes coalesced
per loop turn, and streams that still work with permessage-deflate on (TELEMETRA_WS_COMPRESSION)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.frames import Frame, Opcode

from telemetra.api.realtime_formats import encoded, frame
from telemetra.api.ws_transport import _CoalescingTransport, text_frame
from telemetra.domain.timeutil import ms_to_iso
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent, Gap
from tests.conftest import ADMIN, ADMIN_KEY, make_settings
from tests.support.server import Served, served

TS = 1_790_000_000_000


def telemetry(device: str, n: int) -> ChangeEvent:
    return ChangeEvent(model.TELEMETRY, device, TS + n, {"values": {"n": n}})


# --- the subscription, drained in batches ----------------------------------------------------------------


def test_take_many_gives_the_gap_first_then_at_most_the_limit_in_order() -> None:
    hub = EventHub()
    slow = hub.subscribe(maxsize=10)
    hub.publish(telemetry("a", n) for n in range(25))
    first = slow.take_many(4)
    assert isinstance(first[0], Gap) and first[0].missed == 15  # told before anything else
    assert [e.data["values"]["n"] for e in first[1:]] == [15, 16, 17]  # type: ignore[union-attr]
    rest = slow.take_many(64)
    assert [e.data["values"]["n"] for e in rest] == list(range(18, 25))  # type: ignore[union-attr]
    assert slow.take_many(64) == [] and slow.delivered == 10
    slow.close()
    assert slow.take_many(64) == []


async def test_wait_ends_on_publish_on_wake_and_on_close() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    waiting = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    assert not waiting.done()  # the positive controls below end the same wait
    hub.publish([telemetry("a", 1)])
    await asyncio.wait_for(waiting, 1)
    assert len(sub.take_many(64)) == 1
    woken = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    assert not woken.done()
    sub.wake()  # a heartbeat is due: the stream wakes with nothing to take
    await asyncio.wait_for(woken, 1)
    assert sub.take_many(64) == []
    again = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    assert not again.done()  # the wake-up was used up: the next wait waits again
    sub.close()
    await asyncio.wait_for(again, 1)


async def test_a_taker_gets_each_publish_once_in_order_without_waking_the_waiter() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxsize=100)
    calls: list[list[int]] = []

    def taker(s: Any) -> bool:
        calls.append([e.data["values"]["n"] for e in s.take_many(s.pending)])
        return True

    sub.take_directly(taker)
    waiting = asyncio.create_task(sub.wait())
    await asyncio.sleep(0)
    hub.publish(telemetry("a", n) for n in range(5))
    hub.publish([telemetry("b", 5)])
    assert calls == [[0, 1, 2, 3, 4], [5]]  # one hand-over per publish, at its end, in order
    await asyncio.sleep(0)
    assert not waiting.done()  # nobody woke: the taker took everything
    sub.wake()  # the positive control: the same wait does end
    await asyncio.wait_for(waiting, 1)
    sub.close()


async def test_a_taker_that_declines_or_fails_leaves_the_events_to_the_waiter() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxsize=100)
    answers = [False]

    def taker(_s: Any) -> bool:
        if not answers:
            raise RuntimeError("broken taker")
        return answers.pop()

    sub.take_directly(taker)
    for attempt in range(2):  # declines, then raises: either way the waiter is woken with the events queued
        waiting = asyncio.create_task(sub.wait())
        await asyncio.sleep(0)
        hub.publish([telemetry("a", attempt)])
        await asyncio.wait_for(waiting, 1)
        assert [e.data["values"]["n"] for e in sub.take_many(64)] == [attempt]  # type: ignore[union-attr]
    sub.close()


async def test_a_lagging_subscription_is_not_handed_to_its_taker_the_gap_comes_first() -> None:
    hub = EventHub()
    sub = hub.subscribe(maxsize=3)
    taken: list[int] = []
    sub.take_directly(lambda s: bool(taken.extend(range(s.pending))) or True)
    sub.take_directly(None)  # back to waking: these overflow the queue
    hub.publish(telemetry("a", n) for n in range(5))  # 2 lost: the next take starts with a Gap
    sub.take_directly(lambda s: bool(taken.extend(range(s.pending))) or True)
    waiting = asyncio.create_task(sub.wait())
    hub.publish([telemetry("a", 5)])
    await asyncio.wait_for(waiting, 1)
    assert taken == []  # the taker never saw it: the Gap is told first, by the waiter's own path
    first = sub.take_many(64)
    assert isinstance(first[0], Gap) and first[0].missed == 3
    assert [e.data["values"]["n"] for e in first[1:]] == [3, 4, 5]  # type: ignore[union-attr]
    sub.close()


# --- frames -------------------------------------------------------------------------------------------------


def test_text_frame_is_what_websockets_would_send_at_every_length() -> None:
    for size in (0, 1, 125, 126, 65535, 65536, 100_000):
        payload = b"x" * size
        ours = text_frame(payload)
        theirs = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
        assert ours == theirs, size


def test_a_frame_is_built_once_per_event_and_format() -> None:
    event = telemetry("a", 7)
    event.id = 42
    built = frame(event, "telemetra")
    assert built is not None and frame(event, "telemetra") is built  # the same object for every client
    assert built == text_frame(encoded(event, "telemetra").encode())  # type: ignore[union-attr]
    assert frame(event, "telemetry_app") != built  # another format, another message
    state = ChangeEvent(model.STATE, "a", TS, {"values": {"mode": "x"}})
    assert frame(state, "telemetry_app") is None  # a format without a message for it


class _Recorder:
    """The far side of a transport: what reached it, and when it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def test_writes_in_one_loop_turn_leave_as_one_in_order_and_close_flushes() -> None:
    loop = asyncio.get_running_loop()
    far = _Recorder()
    transport = _CoalescingTransport(far, loop)  # type: ignore[arg-type]
    for chunk in (b"a", b"bc", b"", b"d"):
        transport.write(chunk)
    assert far.writes == []  # nothing until the turn ends
    await asyncio.sleep(0)
    assert far.writes == [b"abcd"]
    transport.write(b"e")
    transport.write(b"f")
    transport.close()  # what was written goes before the close
    assert far.writes == [b"abcd", b"ef"] and far.closed
    await asyncio.sleep(0)
    assert far.writes == [b"abcd", b"ef"]  # the scheduled flush finds nothing more


# --- on a real server ---------------------------------------------------------------------------------------


WAIT_S = 20  # a ceiling for a handshake or a frame (5 s ran out in a full parallel run), never a passing test's time


async def _raw_client(s: Served, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that offers no extension and keeps the frames as bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-API-Key: {ADMIN_KEY}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _raw_frame(reader: asyncio.StreamReader) -> bytes:
    """One whole frame as it came off the socket (a server's frames are not masked)."""
    header = await asyncio.wait_for(reader.readexactly(2), WAIT_S)
    n = header[1] & 0x7F
    extended = b""
    if n == 126:
        extended = await reader.readexactly(2)
        n = int.from_bytes(extended)
    elif n == 127:
        extended = await reader.readexactly(8)
        n = int.from_bytes(extended)
    return header + extended + await asyncio.wait_for(reader.readexactly(n), WAIT_S)


async def test_every_uncompressed_client_gets_the_same_frame_bytes(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "data")
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http, timeout=10) as client:
        r = await client.post("/api/v1/devices", json={"id": "fr-a"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        key = r.json()["credentials"]["api_key"]
        clients = [
            await _raw_client(s, "/api/v1/realtime?types=telemetry"),
            await _raw_client(s, "/api/v1/realtime?types=telemetry&devices=fr-a"),
            await _raw_client(s, "/api/v1/realtime?types=telemetry&devices=fr-a,fr-b"),
        ]
        assert s.services.streams.total == 3  # each subscribed before its 101 left
        readings = [{"device_id": "fr-a", "ts": TS + i, "n": i, "label": "é" * 80} for i in range(3)]
        r = await client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": key})
        assert r.status_code == 201, r.text
        received = [[await _raw_frame(reader) for _ in range(3)] for reader, _ in clients]
        for _, writer in clients:
            writer.close()
    assert received[0] == received[1] == received[2]  # byte for byte, whatever each client subscribed to
    messages = [json.loads(f[4:] if f[1] & 0x7F == 126 else f[2:]) for f in received[0]]
    assert [m["values"]["n"] for m in messages] == [0, 1, 2]
    assert all(f[0] == 0x81 for f in received[0])  # final text frames, no compression bit


async def _create(client: httpx.AsyncClient, device_id: str) -> str:
    r = await client.post("/api/v1/devices", json={"id": device_id}, headers=ADMIN)
    assert r.status_code == 201, r.text
    key: str = r.json()["credentials"]["api_key"]
    return key


async def _recv(ws: Any, *, skip: tuple[str, ...] = ("heartbeat",)) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            message: dict[str, Any] = json.loads(await ws.recv())
            if message.get("type") not in skip:
                return message


async def test_streams_work_with_compression_on(sqlite_url: str, tmp_path: Path) -> None:
    settings = make_settings(sqlite_url, tmp_path / "data", ws_compression=True, ws_heartbeat_interval=0.2)
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http, timeout=10) as client:
        key = await _create(client, "cz-a")
        own = websockets.connect(f"{s.ws}/api/v1/realtime?types=telemetry", additional_headers=ADMIN)
        app = websockets.connect(f"{s.ws}/api/v1/stream/devices/cz-a", additional_headers=ADMIN)
        async with own as ws, app as app_ws:
            # Negotiated, as the client offered it (the default): the server compresses these streams.
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            assert (await _recv(app_ws))["type"] == "ack"
            assert (await _recv(ws, skip=()))["type"] == "heartbeat"
            readings = [{"device_id": "cz-a", "ts": TS + i, "n": i} for i in range(100)]
            r = await client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": key})
            assert r.status_code == 201, r.text
            got = [(await _recv(ws))["values"]["n"] for _ in range(100)]
            app_got = [(await _recv(app_ws))["data"] for _ in range(100)]
        assert got == list(range(100))  # more than one batch of 64, in order
        assert len(app_got) == 100
    plain = make_settings(sqlite_url, tmp_path / "data2")
    async with served(plain) as s:  # positive control: off by default, the same client gets no extension
        async with websockets.connect(f"{s.ws}/api/v1/realtime", additional_headers=ADMIN) as ws:
            assert ws.protocol.extensions == []


async def test_a_slow_subscriber_with_compression_on_still_gets_a_gap(sqlite_url: str, tmp_path: Path) -> None:
    """The same bounded queue behind the compressed path: a client that stops reading is told what it lost."""
    settings = make_settings(sqlite_url, tmp_path / "data", ws_compression=True, ws_queue_size=20)
    async with served(settings) as s, httpx.AsyncClient(base_url=s.http, timeout=10) as client:
        key = await _create(client, "cz-slow")
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning to megabytes
        async with websockets.connect(
            f"{s.ws}/api/v1/realtime?devices=cz-slow&types=telemetry",
            additional_headers=ADMIN,
            sock=sock,
            max_queue=1,
        ) as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            batches = 12
            for b in range(batches):  # random text: compression cannot shrink what fills the buffers
                readings = [
                    {"ts": TS + (b * 200 + i) * 1000, **{f"k{k}": secrets.token_urlsafe(48) for k in range(12)}}
                    for i in range(200)
                ]
                r = await client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": key})
                assert r.status_code == 201, r.text
            received, gaps = 0, []
            last_ts = ms_to_iso(TS + (batches * 200 - 1) * 1000)
            while True:
                message = await _recv(ws)
                if message["type"] == "gap":
                    gaps.append(message["missed"])
                    continue
                received += 1
                if message["ts"] == last_ts:
                    break
    assert gaps and all(g > 0 for g in gaps)
    assert received + sum(gaps) == batches * 200  # every event either delivered or counted as missed
