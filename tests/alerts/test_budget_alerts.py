"""The storage_budget alert (issue 10), on SQLite and PostgreSQL: raised by the retention pass when the
database nears or passes its budget, one open alert whatever the passes and processes, raised again at a
new severity, cleared when the database is back within its budget. The passes are run by the test (the
background pass runs once at start; its period is an hour here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from telemetra.domain.budget import PAST, SOON, USED, budget_state
from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from tests.conftest import ADMIN, Running, make_settings, running_app

QUIET = {"retention_interval_s": 3600, "presence_sweep_s": 3600}
HOUR = 3_600_000


async def budget_alerts(t: Running) -> list[dict[str, Any]]:
    r = await t.client.get("/api/v1/alerts", params={"type": "storage_budget"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["alerts"]
    return found


async def storage(t: Running) -> dict[str, Any]:
    r = await t.client.get("/api/v1/storage", headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize(
    ("used", "days_left", "expected"),
    [
        (1000, 0.0, ("critical", PAST)),
        (1200, 0.0, ("critical", PAST)),
        (950, None, ("warning", USED)),  # no growth measured: the share alone
        (500, 10.0, ("warning", SOON)),
        (500, 14.0, ("warning", SOON)),
        (500, 30.0, None),
        (500, None, None),
    ],
)
def test_where_the_database_stands_against_its_budget(
    used: int, days_left: float | None, expected: tuple[str, str] | None
) -> None:
    state = budget_state(budget_bytes=1000, used_bytes=used, days_left=days_left, warn_days=14, warn_fraction=0.9)
    assert (None if state is None else (state.severity, state.reason)) == expected


def test_no_budget_no_alert_and_a_zero_fraction_turns_the_share_off() -> None:
    assert budget_state(budget_bytes=None, used_bytes=10**9, days_left=None, warn_days=14, warn_fraction=0.9) is None
    assert budget_state(budget_bytes=1000, used_bytes=999, days_left=None, warn_days=14, warn_fraction=0) is None


async def test_the_alert_is_raised_once_escalates_and_clears_across_restarts(database_url: str, tmp_path: Path) -> None:
    def settings(budget: int, **more: Any) -> Any:
        return make_settings(database_url, tmp_path / "data", storage_budget_bytes=budget, **QUIET, **more)

    async with running_app(settings(1)) as t:  # any database is past a one-byte budget
        events = t.services.hub.subscribe(types=(model.ALERT,))
        await t.services.retention.run_pass()
        await t.services.retention.run_pass()  # and the one at start: three passes, one alert
        [alert] = await budget_alerts(t)
        assert (alert["device_id"], alert["severity"], alert["status"], alert["count"]) == ("", "critical", "active", 1)
        assert alert["rule"] is None and alert["payload"]["reason"] == PAST and alert["value"] == 0.0
        event = await asyncio.wait_for(events.next(), 5)
        assert event.data["change"] == "raised" and event.data["alert"]["type"] == "storage_budget"  # type: ignore[union-attr]
        events.close()
        figures = await storage(t)
        assert (figures["warning"], figures["budget_alert"]) == (True, "critical")
        assert t.services.metrics.alerts_changed.labels("storage_budget", "raised")._value.get() == 1
        size = figures["database_bytes"]
    # The budget raised to twice the size, warning at a third of it: the same alert, now a warning.
    async with running_app(settings(2 * size, storage_warn_fraction=0.3)) as t:
        await t.services.retention.run_pass()
        [alert] = await budget_alerts(t)
        assert (alert["severity"], alert["status"], alert["count"]) == ("warning", "active", 2)
        assert alert["payload"]["reason"] == USED
        assert (await storage(t))["budget_alert"] == "warning"
    # Well within a large budget: cleared.
    async with running_app(settings(10**15)) as t:
        await t.services.retention.run_pass()
        [alert] = await budget_alerts(t)
        assert (alert["status"], alert["cleared_at"] is not None) == ("cleared", True)
        assert ((await storage(t))["warning"], (await storage(t))["budget_alert"]) == (False, None)
        r = await t.client.get("/api/v1/alerts/counts", headers=ADMIN)
        assert r.json()["open_by_type"] == {}


async def test_days_left_within_the_warning_raises_a_warning(database_url: str, tmp_path: Path) -> None:
    # A large budget that the last week's growth reaches in (very many) days, all within warn_days.
    overrides = {"storage_budget_bytes": 10**9, "storage_warn_days": 10**9, "storage_warn_fraction": 0, **QUIET}
    async with running_app(make_settings(database_url, tmp_path / "data", **overrides)) as t:
        secret = await t.create_device("grower")
        start = now_ms() // HOUR * HOUR - 24 * HOUR
        readings = [{"ts": start + i * 600_000, "t": float(i)} for i in range(24 * 6)]
        r = await t.client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": secret})
        assert r.status_code < 300, r.text
        if t.services.engine.dialect.name == "postgresql":  # the row estimates the bytes per point come from
            async with t.services.engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
        deadline = asyncio.get_running_loop().time() + 15
        while (await storage(t))["growth_bytes_per_day"] == 0:  # growth is read from the 1-hour rollup
            assert asyncio.get_running_loop().time() < deadline, "the rollup never showed the readings"
            await asyncio.sleep(0.05)
        await t.services.retention.run_pass()
        figures = await storage(t)
        assert figures["growth_bytes_per_day"] > 0 and figures["days_left"] > 0
        [alert] = await budget_alerts(t)
        assert (alert["severity"], alert["payload"]["reason"]) == ("warning", SOON)
        assert alert["value"] == pytest.approx(figures["days_left"], rel=0.5)


async def test_two_processes_keep_one_alert(database_url: str, tmp_path: Path) -> None:
    settings = [make_settings(database_url, tmp_path / f"data{i}", storage_budget_bytes=1, **QUIET) for i in (1, 2)]
    async with running_app(settings[0]) as a, running_app(settings[1]) as b:
        for _ in range(3):
            await asyncio.gather(a.services.retention.run_pass(), b.services.retention.run_pass())
        found = await budget_alerts(a)
        assert [(x["status"], x["count"]) for x in found] == [("active", 1)]
        assert await budget_alerts(b) == found
