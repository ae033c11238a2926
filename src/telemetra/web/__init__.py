"""The dashboard (SPEC §8) and the API's Swagger UI, both served from files inside the package: no build
step for the user and nothing fetched from a CDN, so both work on a machine without internet."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PREFIX = "/ui"  # the dashboard's assets; the API keeps /api, the seeds keep their own paths
DOCS = "/docs"
_OAUTH_REDIRECT = "/docs/oauth2-redirect"
# The page itself must be asked for again after an upgrade (its modules are named without a version);
# the modules and vendored files revalidate with their ETag.
_NO_STORE = {"Cache-Control": "no-cache"}


def install(app: FastAPI) -> None:
    """Add the dashboard at ``/`` (``/test`` opens its test-telemetry form) and Swagger UI at ``/docs``.
    The app is created with ``docs_url=None, redoc_url=None``: FastAPI's own pages load from a CDN."""
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=_NO_STORE)

    @app.get("/test", include_in_schema=False)
    async def test_console() -> RedirectResponse:
        return RedirectResponse("/#/test", status_code=307)

    @app.get(DOCS, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} — API",
            swagger_js_url=f"{PREFIX}/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{PREFIX}/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{PREFIX}/vendor/swagger-ui/favicon-32x32.png",
            oauth2_redirect_url=_OAUTH_REDIRECT,
            swagger_ui_parameters={"persistAuthorization": False},
        )

    @app.get(_OAUTH_REDIRECT, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
