"""A real HTTP server (uvicorn, in this process) for tests that need sockets: WebSockets, raw HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI

from telemetra.api.ws_transport import uvicorn_options
from telemetra.app import create_app
from telemetra.config import Settings
from tests.support.procs import free_port


@dataclass
class Served:
    app: FastAPI
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def services(self) -> Any:
        return self.app.state.services


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[Served]:
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, lifespan="on", **uvicorn_options(settings)
    )  # the WebSocket protocol and compression of ``telemetra serve``
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises why it could not start
                raise RuntimeError("the server stopped before it started")
            await asyncio.sleep(0.02)
        yield Served(app, port)
    finally:
        server.should_exit = True
        await serving
