"""The dashboard (SPEC §8) and the API's Swagger UI, both served from files inside the package: no build
step for the user and nothing fetched from a CDN, so both work on a machine without internet."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
DOCS = "/docs"
_OAUTH_REDIRECT = "/docs/oauth2-redirect"
# The page is asked for again every time (it names the assets' current build); the assets live under a
# path with their build's digest in it, so a browser keeps them for good and never revalidates them —
# a new tab costs two requests to the API instead of fifteen 304s.
_PAGE_HEADERS = {"Cache-Control": "no-cache"}
_ASSET_CACHE = "public, max-age=31536000, immutable"


@functools.cache
def build_id(root: Path = STATIC) -> str:
    """A digest of every asset's path and bytes: changes whenever any of them does."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(os.fsencode(path.relative_to(root)))
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class _ImmutableFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = _ASSET_CACHE
        return response


def install(app: FastAPI) -> None:
    """Add the dashboard at ``/`` (``/test`` opens its test-telemetry form) and Swagger UI at ``/docs``.
    The app is created with ``docs_url=None, redoc_url=None``: FastAPI's own pages load from a CDN."""
    prefix = f"/ui/{build_id()}"  # the assets' modules import each other relatively, so all follow it
    page = (STATIC / "index.html").read_text().replace('"/ui/', f'"{prefix}/')
    app.mount(prefix, _ImmutableFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/test", include_in_schema=False)
    async def test_console() -> RedirectResponse:
        return RedirectResponse("/#/test", status_code=307)

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{prefix}/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{prefix}/vendor/swagger-ui/favicon-32x32.png",
            oauth2_redirect_url=_OAUTH_REDIRECT,
            swagger_ui_parameters={"persistAuthorization": False},
        )

    @app.get(_OAUTH_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
