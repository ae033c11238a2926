"""A front door for the busiest device paths.

A single-reading ``POST /api/v1/ingest`` does little work of its own (authenticate from a cache, normalise
a few values, wait for the group commit), and FastAPI's per-request machinery — router matching through
included routers, dependency resolution, its exception-handling and exit-stack layers — cost about twice
that on this machine (py-spy: ~50 % of the server's CPU against ~20 % for the endpoint). This ASGI
layer sends requests for the listed routes straight to their endpoint functions, which are the same
functions the FastAPI routes are declared with (they take only the ``Request``), and answers their
errors with the app's own exception handlers. Everything else, and the OpenAPI page, is FastAPI's.
It sits inside the metrics middleware, so these requests are counted like any other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class FastPath:
    def __init__(self, app: ASGIApp, *, owner: FastAPI, router: APIRouter, paths: Iterable[str]) -> None:
        """``router`` holds the routes (included in ``owner`` without a prefix); ``paths`` picks them."""
        self.app = app
        self._owner = owner
        wanted = set(paths)
        self._routes: dict[tuple[str, str], APIRoute] = {}
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path in wanted:
                if route.param_convertors:
                    raise ValueError(f"{route.path}: the fast path serves fixed paths only")
                for method in route.methods:
                    self._routes[(method, route.path)] = route
        missing = wanted - {path for _, path in self._routes}
        if missing:
            raise ValueError(f"no such routes for the fast path: {sorted(missing)}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get((scope.get("method", ""), scope.get("path", ""))) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # what the metrics middleware labels the request with
        scope["app"] = self._owner
        request = Request(scope, receive)
        endpoint: Endpoint = route.endpoint
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # a bug: the server-error middleware outside answers 500 and logs it
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        handlers = self._owner.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                handler: Handler = handlers[cls]
                return handler
        return None
