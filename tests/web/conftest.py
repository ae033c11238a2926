"""Browser tests: Playwright driving Debian's chromium (never a browser Playwright downloads) against a real
Telemetra — uvicorn on a free port in a thread, SQLite, the embedded MQTT broker — started by the tests.

Every page a test opens is watched: a console error, an uncaught exception or a request that leaves
127.0.0.1 (a CDN, say) fails the test unless the test said it expects it. Screenshots go to
``test-artifacts/web`` (``TELEMETRA_TEST_ARTIFACTS`` overrides)."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn

from telemetra.app import create_app
from tests.conftest import ADMIN, ADMIN_KEY, make_settings, missing_service
from tests.support.mosquitto import free_port

# Playwright's Python package would fetch its own browser build on `playwright install`; nothing here runs
# that, and this makes sure nothing it calls tries either.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

CHROMIUM = os.environ.get("TELEMETRA_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(
    os.environ.get("TELEMETRA_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts" / "web")
)
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
# Built at run time, so no key-shaped literal sits in the repository.
OPERATOR_KEY = f"operator-{secrets.token_hex(16)}"
VIEWER_KEY = f"viewer-{secrets.token_hex(16)}"
WAIT_MS = 15_000


def _expect_waits() -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)


@dataclass
class Server:
    base_url: str
    mqtt_port: int
    app: Any
    http: httpx.Client

    def create_device(self, device_id: str, **fields: Any) -> str:
        r = self.http.post("/api/v1/devices", json={"id": device_id, **fields}, headers=ADMIN)
        assert r.status_code == 201, r.text
        secret: str = r.json()["credentials"]["api_key"]
        return secret

    def ingest(self, secret: str, body: Any) -> None:
        r = self.http.post("/api/v1/ingest", json=body, headers={"X-API-Key": secret})
        assert r.status_code in (200, 201, 202), r.text


class _Uvicorn(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own
        pass


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dashboard")
    mqtt_port = free_port()
    settings = make_settings(
        f"sqlite+aiosqlite:///{root / 'telemetra.db'}",
        root / "data",
        operator_keys=[OPERATOR_KEY],
        viewer_keys=[VIEWER_KEY],
        mqtt_port=mqtt_port,
        mqtt_host="127.0.0.1",
        # A webhook that fails is given up (failed, with a Retry button) after two quick attempts.
        webhook_max_attempts=2,
        webhook_retry_base_s=0.05,
        webhook_retry_max_s=0.2,
    )
    app = create_app(settings)
    port = free_port()
    server = _Uvicorn(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="dashboard-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the test server did not start")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=10) as http:
        yield Server(base, mqtt_port, app, http)
    server.should_exit = True
    thread.join(30)


def require_chromium(path: str) -> None:
    """A missing chromium skips on a developer's machine and fails under CI=true (``missing_service``)."""
    if not (Path(path).is_file() or shutil.which(path)):
        missing_service(f"chromium not found at {path} (apt-get install chromium; scripts/test-services.sh does)")


# Module scope: Playwright's sync API keeps an event loop running in this thread while it is open, which
# the asyncio tests that run after this module could not start theirs beside.
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium(CHROMIUM)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_service("playwright is not installed (pip install -e '.[test]')")
    _expect_waits()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class Watch:
    """What a page said that it should not have: console errors, exceptions, requests leaving the box."""

    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def check(self) -> None:
        unexpected = [e for e in self.errors if not any(p.search(e) for p in self.allowed)]
        assert not unexpected, "console errors:\n" + "\n".join(unexpected)
        assert not self.outside, "requests that left 127.0.0.1:\n" + "\n".join(self.outside)


@dataclass
class Browsing:
    browser: Any
    server: Server
    watch: Watch
    contexts: list[Any] = field(default_factory=list)

    def page(self, *, viewport: dict[str, int] = DESKTOP, color_scheme: str = "light") -> Any:
        context = self.browser.new_context(viewport=viewport, color_scheme=color_scheme, base_url=self.server.base_url)
        context.set_default_timeout(WAIT_MS)
        self.contexts.append(context)

        def route(r: Any) -> None:
            if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost"):
                r.continue_()
            else:
                self.watch.outside.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.on("console", lambda m: m.type == "error" and self.watch.errors.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: self.watch.errors.append(f"{page.url}: uncaught {e}"))
        return page

    def signed_in(self, key: str = ADMIN_KEY, **kwargs: Any) -> Any:
        page = self.page(**kwargs)
        page.goto("/")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.locator("#role[data-role]").wait_for()
        return page


@pytest.fixture
def browsing(browser: Any, server: Server) -> Iterator[Browsing]:
    b = Browsing(browser, server, Watch())
    if importlib.util.find_spec("telemetra.api.realtime") is None:
        # Until the realtime endpoint exists the dashboard's stream is refused (and it polls instead).
        b.watch.allow(r"WebSocket connection to .*/api/v1/realtime.* failed")
    yield b
    for context in b.contexts:
        context.close()
    b.watch.check()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def eventually(check: Callable[[], Any], *, within: float = 15.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    last = check()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what or check}: last {last!r}")
        time.sleep(0.05)
        last = check()
    return last
