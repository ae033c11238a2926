"""Rules and offline detection end to end, on SQLite and PostgreSQL: rules through the API, readings
through HTTP ingest, alerts read back from ``GET /api/v1/alerts``; presence sweeps run by the test (the
sweep task's own period is an hour here), so nothing depends on a sleep."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import update

from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from telemetra.storage.schema import Device, LatestRow
from tests.conftest import ADMIN, AppFactory, Running, make_settings, running_app
from tests.support.waiting import eventually

T = TypeVar("T")
QUIET = {"presence_sweep_s": 3600, "offline_after_s": 30}


async def alerts(t: Running, **params: Any) -> list[dict[str, Any]]:
    r = await t.client.get("/api/v1/alerts", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["alerts"]
    return found


async def post(t: Running, secret: str, *readings: dict[str, Any]) -> None:
    r = await t.client.post("/api/v1/ingest/batch", json=list(readings), headers={"X-API-Key": secret})
    assert r.status_code < 300, r.text


async def make_rule(t: Running, **body: Any) -> dict[str, Any]:
    r = await t.client.post("/api/v1/rules", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    rule: dict[str, Any] = r.json()
    return rule


def evaluations(t: Running) -> float:
    return t.services.metrics.rule_evaluations._value.get()  # type: ignore[no-any-return]


async def test_a_threshold_rule_raises_holds_and_clears_with_hysteresis(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("boiler-1", model="boiler")
        rule = await make_rule(
            t,
            name="too hot",
            key="temp",
            op=">",
            value=80,
            for_s=60,
            clear_value=70,
            severity="critical",
            models=["boiler"],
        )
        base = now_ms() - 600_000
        await post(t, secret, {"ts": base, "temp": 85}, {"ts": base + 30_000, "temp": 90})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) >= 2), what="both readings evaluated")
        assert await alerts(t, rule=rule["id"]) == []  # held 30 s of 60: pending
        await post(t, secret, {"ts": base + 61_000, "temp": 88})
        raised = await eventually(lambda: alerts(t, rule=rule["id"]), what="the alert")
        assert [(a["type"], a["rule"], a["severity"], a["status"], a["value"]) for a in raised] == [
            ("threshold", rule["id"], "critical", "active", 88.0)
        ]
        # Between the clear value and the threshold: still active; at the clear value: cleared.
        await post(t, secret, {"ts": base + 62_000, "temp": 75})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) >= 4), what="the reading evaluated")
        assert [a["status"] for a in await alerts(t, rule=rule["id"])] == ["active"]
        await post(t, secret, {"ts": base + 63_000, "temp": 70})

        async def cleared() -> list[dict[str, Any]]:
            return [a for a in await alerts(t, rule=rule["id"]) if a["status"] == "cleared"]

        assert len(await eventually(cleared, what="cleared")) == 1
        # Another model's device is not watched (and the positive control: its reading was seen).
        other = await t.create_device("fridge-1", model="fridge")
        before = evaluations(t)
        await post(t, other, {"ts": base, "temp": 99})
        await post(t, secret, {"ts": base + 64_000, "temp": 60})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) > before), what="the boiler's reading")
        assert [a["device_id"] for a in await alerts(t, type="threshold")] == ["boiler-1"]


async def test_an_alert_raised_again_is_one_alert_with_its_lifecycle(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("p1")
        rule = await make_rule(t, name="low", key="bar", op="<", value=1.0, severity="warning")
        await post(t, secret, {"ts": now_ms() - 5_000, "bar": 0.5})
        [alert] = await eventually(lambda: alerts(t, rule=rule["id"]), what="raised")
        r = await t.client.post(f"/api/v1/alerts/{alert['id']}/acknowledge", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "acknowledged"
        await post(t, secret, {"ts": now_ms() - 4_000, "bar": 1.5})  # clears the acknowledged alert
        [done] = await eventually(lambda: _with_status(t, rule["id"], "cleared"), what="cleared after acknowledgement")
        assert done["acknowledged_at"] is not None and done["cleared_at"] is not None
        r = await t.client.get("/api/v1/alerts/counts", headers=ADMIN)
        assert r.json() == {
            "status": {"active": 0, "acknowledged": 0, "cleared": 1},
            "open_by_type": {},
            "open_by_severity": {},
        }


async def _with_status(t: Running, rule_id: int, status: str) -> list[dict[str, Any]]:
    return [a for a in await alerts(t, rule=rule_id) if a["status"] == status]


async def test_a_held_breach_with_no_reading_since_fires_at_the_sweep(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("s1")
        rule = await make_rule(t, name="damp", key="rh", op=">=", value=90, for_s=2)
        await post(t, secret, {"ts": now_ms() - 10_000, "rh": 95})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) >= 1), what="evaluated")
        assert await alerts(t, rule=rule["id"]) == []  # one reading: pending
        await t.services.rules.sweep()
        assert [a["status"] for a in await alerts(t, rule=rule["id"])] == ["active"]


async def _silence(t: Running, device_id: str, seconds: int) -> None:
    async with t.services.engine.begin() as conn:
        await conn.execute(update(Device).where(Device.id == device_id).values(last_seen_at=now_ms() - seconds * 1000))


async def _online(t: Running, device_id: str) -> bool:
    r = await t.client.get(f"/api/v1/devices/{device_id}", headers=ADMIN)
    return bool(r.json()["online"])


async def test_offline_is_raised_by_the_sweep_and_cleared_when_the_device_is_back(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("n1", model="node")
        quick = await make_rule(t, name="nodes report every 10 s", kind="offline", for_s=10, models=["node"])
        await post(t, secret, {"temp": 1})
        await t.services.rules.sweep()
        assert await alerts(t, type="offline") == []  # heard from just now
        states = t.services.hub.subscribe(types=(model.STATE,), devices=["n1"])
        await _silence(t, "n1", 11)  # past its rule's 10 s, short of the default 30 s
        await t.services.rules.sweep()
        [alert] = await alerts(t, type="offline")
        assert (alert["device_id"], alert["rule"], alert["status"]) == ("n1", quick["id"], "active")
        assert not await _online(t, "n1")
        event = await asyncio.wait_for(states.next(), 5)
        assert event.data == {"online": False}  # type: ignore[union-attr]
        await t.services.rules.sweep()  # a second sweep changes nothing
        assert [(a["status"], a["count"]) for a in await alerts(t, type="offline")] == [("active", 1)]
        await post(t, secret, {"temp": 2})
        back = await eventually(lambda: _offline_with(t, "cleared"), what="cleared on return")
        assert back[0]["id"] == alert["id"]
        assert await _online(t, "n1")
        states.close()


async def _offline_with(t: Running, status: str) -> list[dict[str, Any]]:
    return [a for a in await alerts(t, type="offline") if a["status"] == status]


async def test_offline_detection_is_the_same_across_two_processes_and_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    settings = [make_settings(database_url, tmp_path / f"data{i}", **QUIET) for i in (1, 2)]
    async with running_app(settings[0]) as a, running_app(settings[1]) as b:
        secret = await a.create_device("twin")
        await post(a, secret, {"v": 1})
        await _silence(a, "twin", 60)
        await asyncio.gather(a.services.rules.sweep(), b.services.rules.sweep())
        await asyncio.gather(a.services.rules.sweep(), b.services.rules.sweep())
        assert [(x["status"], x["count"]) for x in await alerts(a, type="offline")] == [("active", 1)]
        assert await alerts(b, type="offline") == await alerts(a, type="offline")
    async with running_app(settings[0]) as again:
        await again.services.rules.sweep()
        assert [(x["status"], x["count"]) for x in await alerts(again, type="offline")] == [("active", 1)]
        await post(again, secret, {"v": 2})
        await eventually(lambda: _offline_with(again, "cleared"), what="cleared after the restart")


async def test_a_last_will_raises_offline_at_once(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        await t.create_device("lw1")
        async with t.services.engine.begin() as conn:
            await conn.execute(update(Device).where(Device.id == "lw1").values(online=False))
        from telemetra.events.model import ChangeEvent

        t.services.hub.publish([ChangeEvent(model.STATE, "lw1", now_ms(), {"online": False})])
        [alert] = await eventually(lambda: alerts(t, type="offline"), what="offline from the will")
        assert alert["device_id"] == "lw1" and alert["rule"] is None


async def test_two_processes_raise_one_threshold_alert(tmp_path: Path) -> None:
    from tests.conftest import postgres_database

    async with postgres_database() as url:
        settings = [make_settings(url, tmp_path / f"data{i}", **QUIET) for i in (1, 2)]
        async with running_app(settings[0]) as a, running_app(settings[1]) as b:
            secret = await a.create_device("shared")
            rule = await make_rule(a, name="over", key="x", op=">", value=5)
            await b.services.rules.reload()  # as its next sweep would
            await post(a, secret, {"ts": now_ms() - 1_000, "x": 9})
            # Both evaluated it (b through the event bridge): the positive control for "one alert".
            await eventually(lambda: asyncio.sleep(0, evaluations(a) >= 1 and evaluations(b) >= 1), what="both")
            got = await eventually(lambda: alerts(a, rule=rule["id"]), what="raised")
            assert [(x["status"], x["count"]) for x in got] == [("active", 1)]


async def test_rules_from_the_rules_file_are_loaded_at_start(database_url: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nname = "hot"\nkey = "t"\nop = ">"\nvalue = 30\nseverity = "critical"\n')
    settings = make_settings(database_url, tmp_path / "data", rules_file=path, **QUIET)
    async with running_app(settings) as t:
        r = await t.client.get("/api/v1/rules", headers=ADMIN)
        [rule] = r.json()["rules"]
        assert (rule["name"], rule["value"], rule["source"]) == ("hot", 30.0, "file")
        await make_rule(t, name="mine", key="h", op="<", value=1)
    path.write_text(
        '[[rules]]\nname = "hot"\nkey = "t"\nop = ">"\nvalue = 35\nseverity = "critical"\nkinds = ["gateway"]\n'
    )
    async with running_app(settings) as t:
        r = await t.client.get("/api/v1/rules", headers=ADMIN)
        assert sorted((x["name"], x["value"], x["source"]) for x in r.json()["rules"]) == [
            ("hot", 35.0, "file"),
            ("mine", 1.0, "api"),
        ]
        assert [x["kinds"] for x in r.json()["rules"] if x["name"] == "hot"] == [["gateway"]]
    path.write_text("[]")
    path = path.rename(tmp_path / "rules.json")
    async with running_app(settings.model_copy(update={"rules_file": path})) as t:
        r = await t.client.get("/api/v1/rules", headers=ADMIN)
        assert [x["name"] for x in r.json()["rules"]] == ["mine"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "r", "key": "t", "op": "=>", "value": 1}, "op"),
        ({"name": "r", "op": ">", "value": 1}, "key"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "devices": ["a"], "models": ["m"]}, "models"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "severity": "fatal"}, "severity"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "for_s": -1}, "for_s"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "devices": ["bad id!"]}, "devices.0"),
        ({"name": "", "key": "t", "op": ">", "value": 1}, "name"),
        ({"name": "r", "kind": "offline"}, "for_s"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "kinds": ["hub"]}, "kinds.0"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "kinds": []}, "kinds"),
        ({"name": "r", "key": "t", "op": ">", "value": 1, "devices": ["a"], "kinds": ["gateway"]}, "kinds"),
    ],
)
async def test_bad_rules_are_refused_naming_the_field(api: Running, body: dict[str, Any], field: str) -> None:
    r = await api.client.post("/api/v1/rules", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


async def test_rules_crud(api: Running) -> None:
    rule = await make_rule(api, name="r", key="t", op=">", value=1, devices=["d1"])
    r = await api.client.patch(f"/api/v1/rules/{rule['id']}", json={"value": 2, "devices": None}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert (r.json()["value"], r.json()["devices"]) == (2.0, None)
    r = await api.client.patch(f"/api/v1/rules/{rule['id']}", json={"key": None}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["field"] == "key"
    assert (await api.client.get(f"/api/v1/rules/{rule['id']}", headers=ADMIN)).json()["value"] == 2.0
    assert (await api.client.delete(f"/api/v1/rules/{rule['id']}", headers=ADMIN)).status_code == 204
    assert (await api.client.get(f"/api/v1/rules/{rule['id']}", headers=ADMIN)).status_code == 404
    assert (await api.client.delete(f"/api/v1/rules/{rule['id']}", headers=ADMIN)).status_code == 404


async def test_a_kinds_filter_watches_only_that_kind_of_device(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        gateway = await t.create_device("gw-1", kind="gateway", model="hub")
        device = await t.create_device("dev-1", model="hub")
        other = await t.create_device("gw-2", kind="gateway", model="other")
        rule = await make_rule(t, name="hot gateways", key="temp", op=">", value=50, kinds=["gateway"], models=["hub"])
        assert (rule["kinds"], rule["models"]) == (["gateway"], ["hub"])
        ts = now_ms() - 5_000
        await post(t, device, {"ts": ts, "temp": 70})
        await post(t, other, {"ts": ts, "temp": 70})
        await post(t, gateway, {"ts": ts, "temp": 70})
        [alert] = await eventually(lambda: alerts(t, rule=rule["id"]), what="the gateway's alert")
        assert alert["device_id"] == "gw-1"
        # The positive control: a second reading of the gateway is evaluated, the others never were.
        before = evaluations(t)
        await post(t, gateway, {"ts": ts + 1, "temp": 71})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) > before), what="the gateway's second reading")
        assert evaluations(t) == 2 and [a["device_id"] for a in await alerts(t, rule=rule["id"])] == ["gw-1"]
        r = await t.client.patch(f"/api/v1/rules/{rule['id']}", json={"kinds": None, "models": None}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["kinds"] is None, r.text


async def test_a_rate_of_change_rule(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("tank")
        rule = await make_rule(t, name="draining", kind="rate", key="level", op="<", value=-1.0, severity="critical")
        base = now_ms() - 100_000
        # -0.5/s: fine; then -2/s: raised; then +1/s: cleared.
        await post(t, secret, {"ts": base, "level": 100}, {"ts": base + 10_000, "level": 95})
        await eventually(lambda: asyncio.sleep(0, evaluations(t) >= 2), what="evaluated")
        assert await alerts(t, rule=rule["id"]) == []
        await post(t, secret, {"ts": base + 20_000, "level": 75})
        [alert] = await eventually(lambda: alerts(t, rule=rule["id"]), what="raised")
        assert (alert["type"], alert["value"]) == ("rate", -2.0)
        await post(t, secret, {"ts": base + 30_000, "level": 85})
        await eventually(lambda: _with_status(t, rule["id"], "cleared"), what="cleared")


async def test_a_nodata_rule_fires_at_the_sweep_and_clears_with_the_next_reading(app_factory: AppFactory) -> None:
    async with app_factory(**QUIET) as t:
        secret = await t.create_device("meter")
        rule = await make_rule(t, name="no flow", kind="nodata", key="flow", for_s=60)
        await post(t, secret, {"ts": now_ms() - 30_000, "flow": 1.0})
        await t.services.rules.sweep()
        assert await alerts(t, rule=rule["id"]) == []  # 30 s of 60
        async with t.services.engine.begin() as conn:  # a minute of silence, without waiting for it
            await conn.execute(
                update(LatestRow)
                .where(LatestRow.device_id == "meter", LatestRow.key == "flow")
                .values(ts=now_ms() - 61_000)
            )
        await t.services.rules.sweep()
        await t.services.rules.sweep()
        [alert] = await alerts(t, rule=rule["id"])
        assert (alert["type"], alert["status"], alert["count"]) == ("nodata", "active", 1)
        await post(t, secret, {"ts": now_ms(), "flow": 2.0})
        await eventually(lambda: _with_status(t, rule["id"], "cleared"), what="cleared by the reading")
