"""Headers a server reached over HTTPS sends with every answer (issue 11: "HSTS and secure defaults when
TLS is on")."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# One year, the value browsers' preload lists ask for; no includeSubDomains: other services may share the
# domain without TLS, and HSTS cannot be taken back before it expires.
HSTS = b"max-age=31536000"
_HEADERS = [
    (b"strict-transport-security", HSTS),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecureHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
