"""The WebSocket side of the HTTP server: uvicorn's sans-I/O websockets protocol, with its writes coalesced.

uvicorn writes every frame to the socket as it is sent: a stream that sends 64 messages in one wake-up makes
64 ``send()`` system calls (and a busy server spends its time in them). Here what a connection writes during
one turn of the event loop goes out in one ``transport.write`` at the end of that turn, in the order it was
written (frames, pings, close); a writer that has already joined all it has (``write_now``) writes at once.

A connection that did not negotiate permessage-deflate (it is off unless ``TELEMETRA_WS_COMPRESSION``) also
offers the ASGI extension ``telemetra.frames``: ``{"write": coroutine(list[bytes])}`` takes frames built
once by ``text_frame`` — a server's frames are not masked, so the same bytes serve every client of a
format — and writes them as they are; ``{"write_nowait": function(bytes) -> bool}`` writes such frames
(joined) at once when the connection is open and not paused by flow control, and says whether it did (a
stream's fast path that needs no task switch; when False, the caller awaits ``write``). With compression
every frame is compressed per connection, so there is no such extension and a stream sends text as usual.

``uvicorn_options(settings)`` is what ``telemetra serve``, ``--workers`` and the tests' server give uvicorn.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

FRAMES_EXTENSION = "telemetra.frames"
PROTOCOL = "telemetra.api.ws_transport:CoalescingWebSocketProtocol"

# A stream's batch of prebuilt frames, written as they are.
WriteFrames = Callable[[list[bytes]], Awaitable[None]]
# Prebuilt frames (joined) written now, or False: the connection is closing or paused (flow control).
WriteFramesNowait = Callable[[bytes], bool]


def text_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked, uncompressed text frame of ``payload`` (RFC 6455 §5.2), as a server
    sends it: the same bytes for every client."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def uvicorn_options(settings: Any) -> dict[str, Any]:
    """The WebSocket options of a ``uvicorn.Config`` for ``settings``: this protocol, and compression only
    when it is asked for."""
    return {"ws": PROTOCOL, "ws_per_message_deflate": bool(settings.ws_compression)}


class _CoalescingTransport:
    """A transport whose ``write``s within one loop turn leave as one write; everything else passes through
    (``close`` writes what is pending first)."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def write_now(self, data: bytes) -> None:
        """Write ``data`` at once when nothing of this turn is pending (else after what is, in order): for a
        writer that has already joined everything it has for this turn."""
        if self._pending:
            self.write(data)
        elif data and not self._transport.is_closing():
            self._transport.write(data)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = _CoalescingTransport(self.transport, self.loop)  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app's task is created but has not run yet: it sees the extension when compression is off.
        if self.handshake_initiated and not self.close_sent and not self.conn.extensions:
            self.scope["extensions"][FRAMES_EXTENSION] = {  # type: ignore[index]
                "write": self.write_frames,
                "write_nowait": self.write_frames_nowait,
            }

    async def write_frames(self, frames: list[bytes]) -> None:
        """Write prebuilt frames (``text_frame``) to this connection, in order."""
        await self.writable.wait()
        if self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            raise ClientDisconnected()
        if frames:
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def write_frames_nowait(self, data: bytes) -> bool:
        """Write prebuilt frames (joined) now, when the connection is open and writable; else False and
        nothing is written (the caller then awaits ``write_frames``, which waits for the client to read)."""
        if not self.writable.is_set() or self.disconnected or self.close_sent or self.conn.state is not State.OPEN:
            return False
        if data:
            self.transport.write_now(data)  # type: ignore[attr-defined]
        return True
