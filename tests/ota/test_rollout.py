"""Rollouts in the app, on SQLite and PostgreSQL, with devices that answer over HTTP with their own keys:
waves advance; failures pause it at the first wave and resume counts from then; cancel stops
notifications (and withdraws queued ones); timeouts fire and retries notify again; a reported fwVersion
equal to the target completes a device; the state survives a restart; every wrong input is a 4xx."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from tests.conftest import ADMIN, AppFactory, Running
from tests.mqtt.conftest import eventually, metric_sum
from tests.ota.conftest import image, job, upload

FAST = {"ota_step_s": 0.05}


async def _fleet(t: Running, n: int, model: str = "env") -> dict[str, dict[str, str]]:
    """n devices of ``model``; id → headers with the device's own key."""
    return {f"{model}-{i:03d}": {"X-API-Key": await t.create_device(f"{model}-{i:03d}", model=model)} for i in range(n)}


async def _rollout(t: Running, **body: Any) -> dict[str, Any]:
    r = await t.client.post("/api/v1/ota/updates", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def _ota_commands(t: Running, device_id: str) -> list[dict[str, Any]]:
    r = await t.client.get(f"/api/v1/devices/{device_id}/commands", headers=ADMIN)
    assert r.status_code == 200
    return [c for c in r.json()["commands"] if c["name"] == "ota"]


async def _report(t: Running, update_id: int, device: str, headers: dict[str, str], status: str, **extra: Any) -> Any:
    r = await t.client.post(
        f"/api/v1/ota/updates/{update_id}/node/{device}/progress", json={"status": status, **extra}, headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()


def _with(update_id: int, t: Running, check: Callable[[dict[str, Any]], bool]) -> Callable[[], Awaitable[Any]]:
    async def read() -> Any:
        detail = await job(t.client, update_id)
        return detail if check(detail) else None

    return read


def _told(detail: dict[str, Any]) -> int:
    """Devices notified at least once."""
    return sum(1 for n in detail["nodes"] if n["attempts"])


async def _steps(t: Running) -> float:
    r = await t.client.get("/metrics")
    return metric_sum(r.text, "telemetra_ota_scheduler_steps_total")


async def _notified(detail: dict[str, Any], wave: int | None = None) -> list[str]:
    return [n["node_id"] for n in detail["nodes"] if n["attempts"] and (wave is None or n["wave"] == wave)]


async def test_waves_advance_and_devices_complete(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        fleet = await _fleet(t, 20)
        data = image(2000, 1)
        fw = await upload(t.client, data, model="env", version="2.0.0")
        update = await _rollout(t, firmware_id=fw["id"], target_model="env", waves=[10, 50, 100],
                                rate_per_minute=60_000, pause_failure_percent=None)  # fmt: skip
        assert (update["status"], update["delivery"]) == ("distributing", "devices")
        assert [w["percent"] for w in update["waves"]] == [10, 50, 100]
        assert [w["devices"] for w in update["waves"]] == [2, 8, 10]
        uid = update["id"]

        detail = await eventually(_with(uid, t, lambda d: _told(d) == 2))
        first = await _notified(detail)
        assert {n["wave"] for n in detail["nodes"] if n["node_id"] in first} == {0}
        command = (await _ota_commands(t, first[0]))[0]
        params = command["params"]
        assert set(params) == {"url", "sha256", "checksum", "md5", "size", "version", "signature", "update_id"}
        assert (params["sha256"], params["size"], params["version"], params["update_id"]) == (
            fw["sha256"],
            2000,
            "2.0.0",
            uid,
        )
        assert params["url"].endswith(f"/api/v1/firmware/{fw['id']}/download")
        # Nothing of wave 2 goes out while wave 1 is unfinished (the next wave opens only after it).
        steps = await _steps(t)
        await eventually(lambda: _above(t, steps + 3), what="three more scheduler steps")
        assert await _notified(await job(t.client, uid)) == first

        # Wave 1: one device reports over HTTP, the other reports the target fwVersion in its telemetry.
        a, b = first
        await _report(t, uid, a, fleet[a], "downloading", progress=40)
        assert (await _report(t, uid, a, fleet[a], "completed"))["node_status"] == "completed"
        r = await t.client.post(f"/api/v1/nodes/{b}/telemetry", json={"firmware": "v2.0"}, headers=fleet[b])
        assert r.status_code == 200
        detail = await eventually(_with(uid, t, lambda d: d["current_wave"] == 1 and _told(d) == 10))
        assert detail["waves"][0]["status"] == "completed" and detail["waves"][1]["status"] == "running"
        for device in await _notified(detail, 1):
            await _report(t, uid, device, fleet[device], "success")
        detail = await eventually(_with(uid, t, lambda d: d["current_wave"] == 2))
        for device in await _notified(await eventually(_with(uid, t, lambda d: _told(d) == 20)), 2):
            await _report(t, uid, device, fleet[device], "completed")
        detail = await eventually(_with(uid, t, lambda d: d["status"] == "completed"))
        assert [w["status"] for w in detail["waves"]] == ["completed"] * 3
        assert detail["progress"]["completed"] == 20 and detail["completed_at"] is not None


async def _above(t: Running, value: float) -> bool:
    return await _steps(t) >= value


async def test_failures_pause_the_first_wave_and_resume_counts_from_then(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        fleet = await _fleet(t, 30)
        fw = await upload(t.client, image(500), model="env", version="3.0.0")
        update = await _rollout(t, firmware_id=fw["id"], waves=[50, 100], rate_per_minute=60_000,
                                pause_failure_percent=20, pause_min_finished=5, max_retries=0)  # fmt: skip
        uid = update["id"]
        detail = await eventually(_with(uid, t, lambda d: _told(d) == 15))
        wave0 = await _notified(detail, 0)
        # 30 % of the first wave fails: 3 of the first 10 to finish.
        for i, device in enumerate(wave0[:10]):
            if i % 10 in (2, 5, 8):
                answer = await _report(t, uid, device, fleet[device], "failed", error_message="flash write error")
                assert answer["retry"] is False
            else:
                await _report(t, uid, device, fleet[device], "completed")
        detail = await eventually(_with(uid, t, lambda d: d["status"] == "paused"))
        assert detail["paused_reason"].startswith("wave 1:")
        assert detail["current_wave"] == 0 and detail["waves"][1]["status"] == "pending"
        steps = await _steps(t)
        for device in wave0[10:]:  # the rest of the wave finishes while paused: still no second wave
            await _report(t, uid, device, fleet[device], "completed")
        await eventually(lambda: _above(t, steps + 3), what="three more scheduler steps")
        detail = await job(t.client, uid)
        assert detail["status"] == "paused" and await _notified(detail, 1) == []

        # Pause and resume are idempotent; resuming accepts the failures so far.
        assert (await t.client.post(f"/api/v1/ota/updates/{uid}/pause", headers=ADMIN)).json()["status"] == "paused"
        r = await t.client.post(f"/api/v1/ota/updates/{uid}/resume", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "distributing"
        detail = await eventually(_with(uid, t, lambda d: d["current_wave"] == 1 and len(d["nodes"]) == 30
                                        and all(n["attempts"] for n in d["nodes"])))  # fmt: skip
        assert detail["status"] == "distributing"


async def test_cancel_stops_notifications_and_withdraws_queued_ones(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        await _fleet(t, 10)
        fw = await upload(t.client, image(500), model="env", version="4.0.0")
        update = await _rollout(t, firmware_id=fw["id"], target_model="env", rate_per_minute=600)  # one per 100 ms
        uid = update["id"]
        detail = await eventually(_with(uid, t, lambda d: 1 <= _told(d) < 10))
        r = await t.client.post(f"/api/v1/ota/updates/{uid}/cancel", headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        told = await _notified(await job(t.client, uid))
        steps = await _steps(t)
        # Positive control: the scheduler keeps stepping, long enough for several more at this rate.
        await eventually(lambda: _above(t, steps + 8), what="eight more scheduler steps")
        detail = await job(t.client, uid)
        assert await _notified(detail) == told and len(told) < 10
        assert detail["status"] == "cancelled"
        for device in told:  # the devices are offline: their queued notification will not go out
            assert [c["status"] for c in await _ota_commands(t, device)] == ["expired"]
        untold = [n["node_id"] for n in detail["nodes"] if not n["attempts"]]
        assert untold
        for device in untold:
            assert await _ota_commands(t, device) == []
        r = await t.client.post(f"/api/v1/ota/updates/{uid}/resume", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (409, "status")


async def test_timeouts_fire_and_a_retry_notifies_again(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        await _fleet(t, 2)
        fw = await upload(t.client, image(500), model="env", version="5.0.0")
        update = await _rollout(t, firmware_id=fw["id"], target_model="env", device_timeout_s=1, max_retries=1,
                                rate_per_minute=60_000, pause_failure_percent=None)  # fmt: skip
        uid = update["id"]
        detail = await eventually(
            _with(uid, t, lambda d: d["status"] == "failed"), within=30, what="two timeouts per device"
        )
        assert {n["status"] for n in detail["nodes"]} == {"timed_out"}
        assert {n["attempts"] for n in detail["nodes"]} == {2}  # notified, timed out, notified again, timed out
        assert all("no result within 1 s" in n["error_message"] for n in detail["nodes"])
        assert detail["error_message"] == "no device completed the update"
        for n in detail["nodes"]:
            assert len(await _ota_commands(t, n["node_id"])) == 2


async def test_a_rollout_survives_a_restart(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        fleet = await _fleet(t, 4)
        fw = await upload(t.client, image(500), model="env", version="6.0.0")
        update = await _rollout(t, firmware_id=fw["id"], waves=[50, 100], rate_per_minute=60_000)
        uid = update["id"]
        detail = await eventually(_with(uid, t, lambda d: _told(d) == 2))
        wave0 = await _notified(detail, 0)
    async with app_factory(**FAST) as t:  # a new process on the same database and data directory
        for device in wave0:
            await _report(t, uid, device, fleet[device], "completed")
        detail = await eventually(_with(uid, t, lambda d: _told(d) == 4))
        for device in await _notified(detail, 1):
            await _report(t, uid, device, fleet[device], "completed")
        await eventually(_with(uid, t, lambda d: d["status"] == "completed"))


async def test_wrong_inputs_name_their_field(app_factory: AppFactory) -> None:
    async with app_factory(**FAST) as t:
        c = t.client
        fleet = await _fleet(t, 3)
        other = await t.create_device("hp-1", model="heatpump")
        fw = await upload(c, image(500), model="env", version="7.0.0")

        async def refused(status: int, field: str, **body: Any) -> None:
            r = await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"], **body}, headers=ADMIN)
            assert (r.status_code, r.json()["field"]) == (status, field), r.text

        await refused(422, "target_model", target_model="heatpump")  # wrong model
        await refused(422, "target_device_ids", target_device_ids=["hp-1"])  # a device of another model
        await refused(404, "target_device_ids", target_device_ids=["env-000", "nope"])
        await refused(422, "target_device_ids", target_device_ids=["bad id!"])
        await refused(422, "waves", waves=[50, 10])
        await refused(422, "rate_per_minute", target_model="env", rate_per_minute=0)
        await refused(422, "target_device_ids", target_model="env", target_filter={"search": "none-match"})
        await refused(404, "firmware_id", firmware_id=999, target_model="env")
        await refused(422, "unexpected", target_model="env", unexpected=1)
        update = await _rollout(
            t, firmware_id=fw["id"], target_device_ids=["env-000", "env-001"], rate_per_minute=60_000
        )
        await refused(409, "target_device_ids", target_device_ids=["env-001", "env-002"])  # already in a rollout
        uid = update["id"]

        async def report(device: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, str]:
            r = await c.post(f"/api/v1/ota/updates/{uid}/node/{device}/progress", json=body, headers=headers)
            return r.status_code, r.json().get("field")

        assert await report("env-002", fleet["env-002"], {"status": "completed"}) == (404, "node_id")  # not in the job
        assert await report("env-001", fleet["env-000"], {"status": "completed"}) == (403, "node_id")  # not itself
        assert await report("env-000", {"X-API-Key": other}, {"status": "completed"}) == (403, "node_id")
        assert await report("env-000", fleet["env-000"], {"status": "exploded"}) == (422, "status")
        assert await report("env-000", fleet["env-000"], {"status": "downloading", "progress": 101}) == (
            422,
            "progress",
        )
        assert await report("env-000", fleet["env-000"], {"status": "completed"}) == (200, None)
        assert await report("env-000", fleet["env-000"], {"status": "completed"}) == (200, None)  # redelivered
        assert await report("env-000", fleet["env-000"], {"status": "failed"}) == (409, "status")
        r = await c.post(f"/api/v1/ota/updates/{uid}/node/env-000/progress", json={"status": "ok"})
        assert (r.status_code, r.json()["field"]) == (401, "X-API-Key")

        r = await c.post(f"/api/v1/ota/updates/{uid}/start", headers=ADMIN)  # a rollout starts itself
        assert (r.status_code, r.json()["field"]) == (409, "status")
        assert (await c.post(f"/api/v1/ota/updates/{uid}/complete", headers=ADMIN)).json()["status"] == "completed"
        for action in ("pause", "resume", "cancel", "start", "fail"):
            r = await c.post(f"/api/v1/ota/updates/{uid}/{action}", headers=ADMIN)
            assert (r.status_code, r.json()["field"]) == (409, "status"), action
        assert (await c.post(f"/api/v1/ota/updates/{uid}/complete", headers=ADMIN)).status_code == 200  # again: no-op
        gateway_job = (await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"]}, headers=ADMIN)).json()
        r = await c.post(f"/api/v1/ota/updates/{gateway_job['id']}/pause", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (409, "status")
        r = await c.get("/api/v1/ota/updates/999", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (404, "update_id")
