"""Events come from the commit: what was really inserted, in the order it was taken, on both databases."""

from __future__ import annotations

import asyncio

from telemetra.domain.records import Batch, Telemetry, Value, ValueType
from telemetra.events import model
from telemetra.events.model import ChangeEvent, Gap
from tests.conftest import ADMIN, AppFactory

TS = 1_790_000_000_000


def drain(sub) -> list[ChangeEvent | Gap]:  # type: ignore[no-untyped-def]
    out = []
    while (item := sub.take_nowait()) is not None:
        out.append(item)
    return out


def reading(device: str, n: int) -> Batch:
    return Batch(telemetry=[Telemetry(device, TS + n, (Value("n", float(n), None, int(ValueType.NUMBER)),), True)])


async def test_a_redelivered_reading_is_stored_once_and_is_no_event(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        key = await t.create_device("dup")
        device = {"X-API-Key": key}
        events = t.services.hub.subscribe(types=[model.TELEMETRY])
        body = {"device_id": "dup", "ts": TS, "metrics": {"t": 1.5, "h": 40}}
        for _ in range(3):  # the same device-stamped reading, delivered three times
            assert (await t.client.post("/api/v1/ingest", json=body, headers=device)).status_code == 201
        # A reading that is half new: only its new key is an event.
        body2 = {"device_id": "dup", "ts": TS, "metrics": {"t": 1.5, "extra": 7}}
        assert (await t.client.post("/api/v1/ingest", json=body2, headers=device)).status_code == 201
        got = [e for e in drain(events) if isinstance(e, ChangeEvent)]
        assert [e.data["values"] for e in got] == [{"t": 1.5, "h": 40.0}, {"extra": 7.0}]
        r = await t.client.get(
            "/api/v1/devices/dup/telemetry", params={"keys": "t", "start": "2026-01-01T00:00:00Z"}, headers=ADMIN
        )
        assert len(r.json()["series"]["t"]) == 1  # and stored once


async def test_events_keep_each_devices_order_with_several_commits_in_flight(app_factory: AppFactory) -> None:
    async with app_factory(ingest_batch_max_points=40, ingest_commits_in_flight=4) as t:
        devices = [f"ord-{i}" for i in range(8)]
        for device in devices:
            await t.create_device(device)
        events = t.services.hub.subscribe(types=[model.TELEMETRY], maxsize=100_000)
        queue = t.services.queue
        # Interleaved and not awaited one by one: many small commits, several at once on PostgreSQL.
        futures = [queue.submit_nowait(reading(d, n), transport="test") for n in range(300) for d in devices]
        await asyncio.gather(*futures)
        got = [e for e in drain(events) if isinstance(e, ChangeEvent)]
        assert len(got) == 300 * len(devices)
        for device in devices:
            assert [e.data["values"]["n"] for e in got if e.device_id == device] == [float(n) for n in range(300)]
        ids = [e.id for e in got]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)


async def test_state_presence_and_command_status_are_events(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        key = await t.create_device("st")
        device = {"X-API-Key": key}
        events = t.services.hub.subscribe(types=[model.STATE, model.COMMAND, model.DEVICE], devices=["st"])
        assert (
            await t.client.post("/api/v1/ingest", json={"device_id": "st", "t": 1}, headers=device)
        ).status_code == 201
        r = await t.client.post("/api/v1/devices/st/commands", json={"name": "reboot"}, headers=ADMIN)
        assert r.status_code in (200, 201, 202), r.text
        command_id = r.json()["id"]
        polled = await t.client.get("/api/v1/device/commands", headers=device)
        assert [c["id"] for c in polled.json()["commands"]] == [command_id]
        ack = await t.client.post(f"/api/v1/device/commands/{command_id}/ack", json={"status": "ok"}, headers=device)
        assert ack.status_code == 200, ack.text
        r = await t.client.put("/api/v1/devices/st/config", json={"interval_s": 5}, headers=ADMIN)
        assert r.status_code == 200, r.text
        got = [e for e in drain(events) if isinstance(e, ChangeEvent)]
        states = [e for e in got if e.type == model.STATE]
        assert states[0].data.get("online") is True  # came online with its first post
        statuses = [e.data["status"] for e in got if e.type == model.COMMAND]
        assert statuses == ["queued", "sent", "acked"]
        changes = [e.data["change"] for e in got if e.type == model.DEVICE]
        if not changes:  # PostgreSQL: the trigger's NOTIFY arrives a moment after the answer
            async with asyncio.timeout(5):
                changes = [(await events.next()).data["change"]]  # type: ignore[union-attr]
        assert changes == ["config"]


async def test_ota_state_changes_are_events(app_factory: AppFactory) -> None:
    from tests.ota.conftest import image, upload

    async with app_factory(ota_step_s=0.05) as t:
        key = await t.create_device("ota-1", model="env")
        events = t.services.hub.subscribe(types=[model.OTA])
        fw = await upload(t.client, image(2000, 1), model="env", version="2.0.0")
        r = await t.client.post(
            "/api/v1/ota/updates", json={"firmware_id": fw["id"], "target_model": "env"}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        update_id = r.json()["id"]
        progress = f"/api/v1/ota/updates/{update_id}/node/ota-1/progress"
        for status in ("downloading", "installing", "completed"):
            r = await t.client.post(progress, json={"status": status}, headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
        seen: list[tuple[str | None, str]] = []
        async with asyncio.timeout(10):
            async for event in events:
                if isinstance(event, ChangeEvent):
                    assert event.data["update_id"] == update_id
                    seen.append((event.device_id, event.data["status"]))
                    if seen[-1] == (None, "completed"):  # the rollout itself, once its only device is done
                        break
        device_steps = [status for device, status in seen if device == "ota-1"]
        assert device_steps[-3:] == ["downloading", "installing", "completed"]
