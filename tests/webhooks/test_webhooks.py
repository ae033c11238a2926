"""Webhooks end to end, on SQLite and PostgreSQL, against a real local HTTP receiver: events raised through
the API and ingest arrive signed; a receiver that fails is retried with backoff; deliveries survive a
restart, and two processes on one database deliver each event once."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from telemetra.domain import webhooks as W
from telemetra.domain.timeutil import now_ms
from telemetra.storage.schema import Device, WebhookDeliveryRow
from tests.conftest import ADMIN, AppFactory, Running, make_settings, running_app
from tests.support.waiting import eventually
from tests.webhooks.receiver import Receiver

QUICK = {
    "webhook_retry_base_s": 0.05,
    "webhook_retry_max_s": 0.2,
    "presence_sweep_s": 3600,
    "offline_after_s": 30,
}
OPERATOR_KEY = "test-operator-key-0123456789abcdefghij"  # pragma: allowlist secret


@pytest.fixture
def receiver() -> Any:
    r = Receiver().up()
    yield r
    r.down()


async def make_webhook(t: Running, url: str, events: list[str], **body: Any) -> dict[str, Any]:
    r = await t.client.post("/api/v1/webhooks", json={"url": url, "events": events, **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def log(t: Running, webhook_id: int, **params: Any) -> list[dict[str, Any]]:
    r = await t.client.get(f"/api/v1/webhooks/{webhook_id}/deliveries", params=params, headers=ADMIN)
    assert r.status_code == 200, r.text
    found: list[dict[str, Any]] = r.json()["deliveries"]
    return found


def signed_by(secret: str, received: Any) -> bool:
    headers = {k.lower(): v for k, v in received.headers.items()}
    return W.verify(secret, int(headers["x-telemetra-timestamp"]), received.body, headers["x-telemetra-signature"])


async def test_an_alert_arrives_signed_after_the_receiver_fails_twice(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    async with app_factory(**QUICK) as t:
        hook = await make_webhook(t, receiver.url, ["alert.raised"])
        assert hook["secret"].startswith("whsec_")
        secret = await t.create_device("boiler-1")
        r = await t.client.post(
            "/api/v1/rules", json={"name": "hot", "key": "temp", "op": ">", "value": 50}, headers=ADMIN
        )
        rule = r.json()
        receiver.fail_next(2, status=503)
        r = await t.client.post("/api/v1/ingest", json={"temp": 60}, headers={"X-API-Key": secret})
        assert r.status_code < 300, r.text
        [ok] = await eventually(lambda: asyncio.sleep(0, receiver.delivered()), what="the delivery")
        assert [x.answered for x in receiver.received] == [503, 503, 200]
        assert len({x.headers["X-Telemetra-Delivery"] for x in receiver.received}) == 1  # one delivery, 3 tries
        assert all(signed_by(hook["secret"], x) for x in receiver.received)
        assert not signed_by("another-secret-of-some-length", ok)
        assert ok.headers["X-Telemetra-Event"] == "alert.raised"
        body = ok.json
        assert (body["type"], body["device_id"]) == ("alert.raised", "boiler-1")
        assert (body["data"]["alert"]["rule"], body["data"]["alert"]["status"]) == (rule["id"], "active")
        assert body["id"].startswith("evt_")
        [entry] = await eventually(lambda: log(t, hook["id"], status="delivered"), what="the log says delivered")
        assert (entry["attempts"], entry["response_status"], entry["event"]) == (3, 200, "alert.raised")
        assert entry["id"] == int(ok.headers["X-Telemetra-Delivery"])
        assert entry["body"] == ok.body.decode()


async def test_presence_and_registry_changes_are_delivered_once_each(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    async with app_factory(**QUICK) as t:
        await make_webhook(t, receiver.url, ["device.created", "device.online", "device.offline", "device.deleted"])
        secret = await t.create_device("n1")
        for value in (1, 2, 3):  # the first reading brings it online; the others change nothing
            r = await t.client.post("/api/v1/ingest", json={"v": value}, headers={"X-API-Key": secret})
            assert r.status_code < 300
        await eventually(lambda: asyncio.sleep(0, len(receiver.delivered()) >= 2), what="created and online")
        async with t.services.engine.begin() as conn:
            await conn.execute(update(Device).where(Device.id == "n1").values(last_seen_at=now_ms() - 60_000))
        await t.services.rules.sweep()
        r = await t.client.delete("/api/v1/devices/n1", headers=ADMIN)
        assert r.status_code == 204
        names = ["device.created", "device.online", "device.offline", "device.deleted"]
        await eventually(lambda: asyncio.sleep(0, len(receiver.delivered()) >= 4), what="offline and deleted")
        # Once each; not in order: deliveries run concurrently and a retried one comes after later ones.
        assert sorted(x.json["type"] for x in receiver.delivered()) == sorted(names)
        assert all(x.json["device_id"] == "n1" for x in receiver.delivered())


async def test_a_delivery_that_keeps_failing_is_given_up_then_retried_by_hand(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    async with app_factory(**QUICK, webhook_max_attempts=3) as t:
        hook = await make_webhook(t, receiver.url, ["device.created"])
        receiver.fail_next(3, status=500)
        await t.create_device("d1")
        [failed] = await eventually(lambda: log(t, hook["id"], status="failed"), what="given up")
        assert (failed["attempts"], failed["response_status"]) == (3, 500)
        assert failed["error"].startswith("HTTP 500")
        assert receiver.delivered() == []
        r = await t.client.get(f"/api/v1/webhooks/{hook['id']}", headers=ADMIN)
        assert r.json()["deliveries"] == {"pending": 0, "delivered": 0, "failed": 1}
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{failed['id']}/retry", headers=ADMIN)
        assert r.status_code == 202, r.text
        await eventually(lambda: asyncio.sleep(0, receiver.delivered()), what="the retried delivery")
        [done] = await eventually(lambda: log(t, hook["id"], status="delivered"), what="delivered in the log")
        assert (done["id"], done["attempts"]) == (failed["id"], 1)


async def test_retry_after_is_respected(app_factory: AppFactory, receiver: Receiver) -> None:
    async with app_factory(**(QUICK | {"webhook_retry_max_s": 5})) as t:
        hook = await make_webhook(t, receiver.url, ["webhook.test"])
        receiver.retry_after = "1"
        receiver.fail_next(1, status=429)
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ADMIN)
        assert r.status_code == 202, r.text
        await eventually(lambda: asyncio.sleep(0, receiver.delivered()), what="the test event")
        [entry] = await log(t, hook["id"])
        first, second = (x for x in receiver.received)
        assert entry["attempts"] == 2 and first.answered == 429
        # The second attempt came no sooner than the receiver asked (1 s), not after the 0.05 s backoff.
        gap = int(second.headers["X-Telemetra-Timestamp"]) - int(first.headers["X-Telemetra-Timestamp"])
        assert gap >= 1


async def test_deliveries_survive_a_restart_none_lost_none_twice(
    database_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    # Attempts to spare: the refused ones before the restart must not use them all up.
    settings = make_settings(database_url, tmp_path / "data", **(QUICK | {"webhook_max_attempts": 100}))
    port = receiver.port
    async with running_app(settings) as t:
        hook = await make_webhook(t, receiver.url, ["device.created"])
        receiver.down()  # refused from now on
        for i in range(20):
            await t.create_device(f"r{i}")

        async def attempted() -> bool:
            rows = await log(t, hook["id"], status="pending")
            return len(rows) == 20 and all(r["error"] for r in rows)

        await eventually(attempted, what="every delivery tried and refused")
        [entry, *_] = await log(t, hook["id"])
        assert "ConnectError" in entry["error"]
    receiver.up(port)
    async with running_app(settings) as again:
        await eventually(lambda: asyncio.sleep(0, len(receiver.delivered()) >= 20), what="all 20 after the restart")
        await eventually(
            lambda: log(again, hook["id"], status="delivered", limit=50),
            what="the log",
        )
        async with again.services.engine.connect() as conn:
            rows = await conn.scalar(select(func.count()).select_from(WebhookDeliveryRow.__table__))
    devices = Counter(x.json["device_id"] for x in receiver.delivered())
    assert devices == Counter(f"r{i}" for i in range(20))  # each exactly once
    assert rows == 20


async def test_two_processes_deliver_each_event_once(tmp_path: Path, receiver: Receiver) -> None:
    from tests.conftest import postgres_database

    async with postgres_database() as url:
        settings = [make_settings(url, tmp_path / f"data{i}", **QUICK) for i in (1, 2)]
        async with running_app(settings[0]) as a, running_app(settings[1]) as b:
            await make_webhook(a, receiver.url, ["device.created", "alert.raised"])
            for t in (a, b):  # both know the webhook at once (each would within RELOAD_S anyway)
                await t.services.webhooks.reload()
            for i in range(10):
                await (a if i % 2 else b).create_device(f"p{i}")
            await eventually(lambda: asyncio.sleep(0, len(receiver.delivered()) >= 10), what="ten deliveries")
            async with a.services.engine.connect() as conn:
                rows = await conn.scalar(select(func.count()).select_from(WebhookDeliveryRow.__table__))
            assert rows == 10
            assert b.services.webhooks.enqueued + a.services.webhooks.enqueued == 10
        assert Counter(x.json["device_id"] for x in receiver.delivered()) == Counter(f"p{i}" for i in range(10))


async def test_the_api_checks_what_it_is_given(app_factory: AppFactory, receiver: Receiver) -> None:
    async with app_factory(operator_keys=[OPERATOR_KEY]) as t:
        for body, field in (
            ({"url": "ftp://example.com/x", "events": ["*"]}, "url"),
            ({"url": "http://", "events": ["*"]}, "url"),
            ({"url": "https://example.com/x", "events": ["alert.rased"]}, "events"),
            ({"url": "https://example.com/x", "events": []}, "events"),
            ({"url": "https://example.com/x", "events": ["*"], "secret": "x" * 8}, "secret"),
        ):
            r = await t.client.post("/api/v1/webhooks", json=body, headers=ADMIN)
            assert r.status_code == 422, (body, r.text)
            assert field in r.text, (body, r.text)
        operator = {"X-API-Key": OPERATOR_KEY}
        r = await t.client.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["*"]}, headers=operator)
        assert r.status_code == 403
        hook = await make_webhook(t, receiver.url, ["alert.*"], secret="s" * 32, name="ops")
        assert hook["secret"] == "s" * 32
        r = await t.client.get("/api/v1/webhooks", headers=operator)
        assert r.status_code == 200
        [listed] = r.json()["webhooks"]
        assert "secret" not in listed and listed["name"] == "ops" and listed["events"] == ["alert.*"]
        assert "s" * 32 not in r.text
        r = await t.client.patch(f"/api/v1/webhooks/{hook['id']}", json={"enabled": False}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["enabled"] is False and "secret" not in r.json()
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ADMIN)
        assert r.status_code == 409 and "enabled" in r.text
        r = await t.client.patch(f"/api/v1/webhooks/{hook['id']}", json={"url": None}, headers=ADMIN)
        assert r.status_code == 422 and "url" in r.text
        r = await t.client.delete(f"/api/v1/webhooks/{hook['id']}", headers=ADMIN)
        assert r.status_code == 204
        r = await t.client.get(f"/api/v1/webhooks/{hook['id']}", headers=ADMIN)
        assert r.status_code == 404


async def test_rotating_the_secret_signs_what_is_sent_next_with_the_new_one_only(
    app_factory: AppFactory, receiver: Receiver
) -> None:
    async with app_factory(**QUICK, webhook_max_attempts=1, operator_keys=[OPERATOR_KEY]) as t:
        hook = await make_webhook(t, receiver.url, ["webhook.test"])
        old = hook["secret"]
        receiver.fail_next(1, status=503)  # a delivery that failed under the old secret, retried after
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ADMIN)
        failed = r.json()["delivery_id"]
        await eventually(lambda: log(t, hook["id"], status="failed"), what="the test delivery failed")
        assert signed_by(old, receiver.received[0])

        operator = {"X-API-Key": OPERATOR_KEY}
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret", headers=operator)
        assert r.status_code == 403, r.text
        r = await t.client.post("/api/v1/webhooks/999999/rotate-secret", headers=ADMIN)
        assert r.status_code == 404 and "webhook_id" in r.text
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret", headers=ADMIN)
        assert r.status_code == 200, r.text
        rotated = r.json()
        new = rotated["secret"]
        assert new.startswith("whsec_") and len(new) >= 40 and new != old
        assert (rotated["id"], rotated["url"], rotated["events"], rotated["enabled"]) == (
            hook["id"],
            receiver.url,
            ["webhook.test"],
            True,
        )
        assert rotated["deliveries"]["failed"] == 1
        for path in ("/api/v1/webhooks", f"/api/v1/webhooks/{hook['id']}"):  # shown once
            r = await t.client.get(path, headers=ADMIN)
            assert r.status_code == 200 and new not in r.text and "secret" not in r.text

        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=ADMIN)
        fresh = str(r.json()["delivery_id"])
        r = await t.client.post(f"/api/v1/webhooks/{hook['id']}/deliveries/{failed}/retry", headers=ADMIN)
        assert r.status_code == 202, r.text

        def arrived() -> list[Any]:
            return [x for x in receiver.delivered() if x.headers["X-Telemetra-Delivery"] in (fresh, str(failed))]

        got = await eventually(lambda: asyncio.sleep(0, len(arrived()) == 2 and arrived()), what="both delivered")
        assert all(signed_by(new, x) and not signed_by(old, x) for x in got)


def test_signatures_and_backoff() -> None:
    body = b'{"a":1}'
    sig = W.signature("secret", 1700000000, body)
    assert sig.startswith("sha256=") and W.verify("secret", 1700000000, body, sig)
    assert not W.verify("secret", 1700000001, body, sig)  # the timestamp is signed too
    assert not W.verify("secret", 1700000000, b'{"a":2}', sig)
    delays = [W.retry_delay_s(n, base_s=10, max_s=3600) for n in range(1, 12)]
    assert 5 <= delays[0] <= 10 and 40 <= delays[3] <= 80 and all(1800 <= d <= 3600 for d in delays[-2:])
    assert W.retry_delay_s(1, base_s=10, max_s=3600, retry_after_s=120) >= 120
    assert W.unknown_patterns(["alert.*", "*", "rollout.device.*", "device.ofline"]) == ["device.ofline"]
    assert W.subscribed(["rollout.*"], "rollout.device.failed") and not W.subscribed(["alert.*"], "device.online")
