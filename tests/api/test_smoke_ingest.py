"""The core path end to end through the real ASGI app: provision, ingest, read back."""

from __future__ import annotations

from tests.conftest import ADMIN, Running


async def test_device_posts_and_reads_back(api: Running) -> None:
    key = await api.create_device("esp32_01", model="env-v1")
    r = await api.client.post(
        "/api/v1/ingest",
        json={"device_id": "esp32_01", "metrics": {"temperature": 31.4, "humidity": 62.1}},
        headers={"X-API-Key": key},
    )
    assert r.status_code == 201, r.text
    assert r.json()["points"] == 2
    latest = (await api.client.get("/api/v1/devices/esp32_01/latest", headers=ADMIN)).json()
    assert latest["values"]["temperature"]["value"] == 31.4
    assert latest["values"]["humidity"]["value"] == 62.1
    assert latest["values"]["temperature"]["ts"].endswith("Z")
    device = (await api.client.get("/api/v1/devices/esp32_01", headers=ADMIN)).json()
    assert device["online"] is True
    assert device["last_seen_at"] is not None


async def test_redelivered_device_timestamped_reading_is_stored_once(api: Running) -> None:
    key = await api.create_device("d1")
    message = {"ts": "2026-11-22T10:00:00.123Z", "values": {"t": 1.5}}
    for _ in range(3):
        r = await api.client.post("/api/v1/ingest", json=message, headers={"X-API-Key": key})
        assert r.status_code == 201
    history = (
        await api.client.get(
            "/api/v1/devices/d1/telemetry?start=2026-11-22T09:00:00Z&end=2026-11-22T11:00:00Z", headers=ADMIN
        )
    ).json()
    assert history["series"]["t"] == [{"ts": "2026-11-22T10:00:00.123Z", "value": 1.5}]


async def test_ingest_requests_are_counted_and_refused_in_the_api_shape(api: Running) -> None:
    """The ingest paths skip FastAPI's routing (api/fastpath.py): they must still be counted in /metrics
    under their route, and their refusals must come in the same JSON shape as everywhere else."""
    key = await api.create_device("counted")
    for _ in range(3):
        r = await api.client.post("/api/v1/ingest", json={"t": 1.0}, headers={"X-API-Key": key})
        assert r.status_code == 201, r.text
    r = await api.client.post("/api/v1/ingest/batch", json=[{"t": 2.0}], headers={"X-API-Key": "wrong"})
    assert r.status_code == 401
    assert r.json() == {"detail": "invalid API key", "field": "X-API-Key", "code": "unauthorized"}
    r = await api.client.post("/api/v1/ingest", content=b"{", headers={"X-API-Key": key})
    assert r.status_code == 400 and r.json()["field"] == "body"
    text = (await api.client.get("/metrics")).text
    assert 'telemetra_http_requests_total{method="POST",route="/api/v1/ingest",status="201"} 3.0' in text
    assert 'telemetra_http_requests_total{method="POST",route="/api/v1/ingest/batch",status="401"} 1.0' in text
    assert 'telemetra_http_requests_total{method="POST",route="/api/v1/ingest",status="400"} 1.0' in text
