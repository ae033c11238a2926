"""The dashboard's files and Swagger UI come from the package, with nothing loaded from elsewhere (no CDN):
checked over HTTP, without a browser, on both backends (the app fixture's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from telemetra import web
from tests.conftest import Running

EXTERNAL = re.compile(r"""(?:src|href)=["']?(?:https?:)?//""")


async def test_the_dashboard_page_and_its_modules_are_served_from_the_package(api: Running) -> None:
    r = await api.client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    prefix = f"/ui/{web.build_id()}"
    assert f"{prefix}/js/app.js" in r.text and not EXTERNAL.search(r.text)
    assert r.headers["cache-control"] == "no-cache"  # the page names the current build's assets
    for asset in re.findall(r"""(?:src|href)="(/ui/[^"]+)\"""", r.text):
        assert asset.startswith(prefix), asset
        answer = await api.client.get(asset)
        assert answer.status_code == 200, asset
        assert "immutable" in answer.headers["cache-control"]
    modules = sorted((web.STATIC / "js").glob("*.js"))
    assert len(modules) >= 8
    for module in modules:
        text = module.read_text()
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text, module.name
        for imported in re.findall(r'from "(\.[^"]+)"', text):
            target = (module.parent / imported).resolve()
            assert target.is_file(), f"{module.name} imports {imported}"
        r = await api.client.get(f"{prefix}/js/{module.name}")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]


async def test_docs_use_the_vendored_swagger_ui(api: Running) -> None:
    r = await api.client.get("/docs")
    assert r.status_code == 200
    assert not EXTERNAL.search(r.text.replace("https://fastapi.tiangolo.com", "")), r.text
    scripts = re.findall(r"""(?:src|href)=['"]?(/ui/[^'" >]+)""", r.text)
    assert {Path(s).name for s in scripts} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for asset in scripts:
        assert (await api.client.get(asset)).status_code == 200, asset
    assert (await api.client.get("/openapi.json")).status_code == 200
    assert (await api.client.get("/redoc")).status_code == 404  # FastAPI's ReDoc page loads from a CDN


async def test_slash_test_opens_the_test_console(api: Running) -> None:
    r = await api.client.get("/test")
    assert r.status_code == 307 and r.headers["location"] == "/#/test"


def test_vendored_assets_carry_their_licences() -> None:
    vendor = web.STATIC / "vendor"
    assert "MIT License" in (vendor / "uplot" / "LICENSE").read_text()
    assert "Apache License" in (vendor / "swagger-ui" / "LICENSE").read_text()
    assert (vendor / "uplot" / "uPlot.esm.js").read_text().startswith("/**")


def test_a_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tests.conftest
    from tests.web.conftest import CHROMIUM, require_chromium

    absent = str(tmp_path / "no-chromium-here")
    monkeypatch.setattr(tests.conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="chromium not found"):
        require_chromium(absent)
    monkeypatch.setattr(tests.conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception, match="chromium not found"):
        require_chromium(absent)
    if Path(CHROMIUM).is_file():  # the positive control: the real one passes
        require_chromium(CHROMIUM)


def test_the_webhooks_page_lists_the_servers_event_names() -> None:
    from telemetra.domain.webhooks import EVENT_NAMES

    text = (web.STATIC / "js" / "webhooks.js").read_text()
    block = re.search(r"export const EVENT_NAMES = \[(.*?)\];", text, re.S)
    assert block, "webhooks.js declares EVENT_NAMES"
    assert tuple(re.findall(r'"([^"]+)"', block.group(1))) == EVENT_NAMES
