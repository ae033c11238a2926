"""paku-iot's OTA clients against Telemetra (CLIENTS.md §4.6–§4.9), on SQLite and PostgreSQL: each test
sends what the GitHub workflow, ``test_ota_upload.sh``, ``check_esp8266_ota.sh`` or an edge device sends,
and asserts what that client parses — exact status codes, ``.releases[]``, ``.devices[]`` with a
string-comparable ``last_seen``, the checksum the workflow hands to the device."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from telemetra.domain.ota import device_bucket
from tests.api.shared_app import shared_app_fixture, unique
from tests.conftest import ADMIN, Running
from tests.ota.conftest import image

OPERATOR_KEY = "operator-key-for-the-paku-ota-tests-0123456789"
VIEWER_KEY = "viewer-key-for-the-paku-ota-tests-0123456789"
OPERATOR = {"X-API-Key": OPERATOR_KEY}
VIEWER = {"X-API-Key": VIEWER_KEY}

shared = shared_app_fixture(operator_keys=[OPERATOR_KEY], viewer_keys=[VIEWER_KEY])
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def _upload(
    t: Running,
    data: bytes,
    *,
    version: str,
    model: str,
    headers: dict[str, str] = OPERATOR,
    notes: str | None = "Automated OTA update from paku-core main branch",
) -> Any:
    """The workflow's step 2 (Python requests: metadata in the query, only ``file`` in the body)."""
    params = {"version": version, "device_model": model, "is_signed": "false"}
    if notes:
        params["release_notes"] = notes
    files = {"file": ("firmware.bin", data, "application/octet-stream")}
    return await t.client.post("/api/admin/firmware/upload", params=params, files=files, headers=headers)


async def _releases(t: Running, model: str, headers: dict[str, str] | None = None) -> Any:
    return await t.client.get(f"/api/admin/firmware/releases?device_model={model}&limit=50", headers=headers or {})


def _jq_releases(body: Any, version: str) -> list[dict[str, Any]]:
    """``.releases[]? | select(.version == "<VERSION>")``: anything else reads as "not found"."""
    if not isinstance(body, dict) or not isinstance(body.get("releases"), list):
        return []
    return [r for r in body["releases"] if isinstance(r, dict) and r.get("version") == version]


async def _device(t: Running, device_id: str, model: str, *, seen: bool = True) -> dict[str, str]:
    """A paku edge device registered with its model; ``seen``: it has sent something (``last_seen``)."""
    headers = {"X-API-Key": await t.create_device(device_id, model=model)}
    if seen:
        r = await t.client.post("/api/v1/ingest", json={"uptime_s": 12}, headers=headers)
        assert r.status_code == 201, r.text
    return headers


def _seven_days_ago() -> str:
    return (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%S")


async def test_workflow_full_rollout(shared: Running) -> None:
    model = unique("lilygo-t-display-s3")
    version = "1.4.2-3-gabcdef"  # what the workflow's git-describe versioning makes
    data = image(70_000, seed=41)
    # Step 1: the existence check sends no key; the error body has no releases → "not found" → build.
    r = await _releases(shared, model)
    assert 400 <= r.status_code < 500 and r.status_code == 401, r.text
    assert _jq_releases(r.json(), version) == []
    # Step 2: upload, exactly 200.
    r = await _upload(shared, data, version=version, model=model)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok" and isinstance(body["message"], str)
    assert body["version"] == version and body["file_size"] == len(data)
    assert body["checksum_sha256"] == hashlib.sha256(data).hexdigest()
    # A rerun with a key finds it and reuses its checksum; the same upload again is a clear 409.
    found = _jq_releases((await _releases(shared, model, VIEWER)).json(), version)
    assert len(found) == 1 and found[0]["checksum_sha256"] == body["checksum_sha256"]
    assert found[0]["device_model"] == model and found[0]["file_size"] == len(data)
    assert found[0]["is_signed"] is False and found[0]["created_at"].endswith("Z")
    assert found[0]["release_notes"] == "Automated OTA update from paku-core main branch"
    r = await _upload(shared, data, version=version, model=model)
    assert r.status_code == 409 and r.json()["field"] == "version", r.text

    # Devices: three seen, one never seen.
    ids = [unique("ESP32") for _ in range(3)]
    devices = {d: await _device(shared, d, model) for d in ids}
    quiet = unique("ESP32")
    await _device(shared, quiet, model, seen=False)
    # Step 3: the rollout, exactly 200; its name is unique.
    rollout = {
        "name": f"{model}-{version}-full",
        "firmware_version": version,
        "device_model": model,
        "target_type": "all",
        "is_active": True,
    }
    r = await shared.client.post("/api/admin/rollout/create", json=rollout, headers=OPERATOR)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["devices"] == 4
    r = await shared.client.post("/api/admin/rollout/create", json=rollout, headers=OPERATOR)
    assert r.status_code == 409 and r.json()["field"] == "name", r.text
    # Step 4: discovery, `curl -f` (2xx) and `.devices[]? | select(.last_seen > "<7 days ago>") | .device_id`.
    r = await shared.client.get(f"/api/admin/devices?device_model={model}&limit=500", headers=OPERATOR)
    assert r.status_code == 200, r.text
    listed = r.json()["devices"]
    assert {d["device_id"] for d in listed} == {*ids, quiet}
    cutoff = _seven_days_ago()
    recent = [d["device_id"] for d in listed if isinstance(d["last_seen"], str) and d["last_seen"] > cutoff]
    assert sorted(recent) == sorted(ids)
    assert listed[-1]["device_id"] == quiet and listed[-1]["last_seen"] is None  # last_seen desc, never seen last
    seen = [d["last_seen"] for d in listed[:-1]]
    assert seen == sorted(seen, reverse=True)
    for d in listed:
        assert set(d) >= {"device_id", "device_model", "current_firmware_version", "last_seen", "created_at"}
        assert d["device_model"] == model
        datetime.strptime(d["created_at"][:19], "%Y-%m-%dT%H:%M:%S")

    # An edge device: check, download with the checksum the workflow sent, report.
    device = ids[0]
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": device, "device_model": model, "current_version": "1.4.1"}
    )
    assert r.status_code == 200, r.text
    offer = r.json()
    assert offer["update_available"] is True and offer["latest_version"] == version
    assert offer["current_version"] == "1.4.1"
    assert offer["download_url"] == f"/api/firmware/download/{version}?device_model={model}"
    assert offer["checksum_sha256"] == body["checksum_sha256"] and offer["file_size"] == len(data)
    r = await shared.client.get(offer["download_url"])  # no key, as the device calls it
    assert r.status_code == 200 and r.content == data
    assert r.headers["x-firmware-version"] == version
    assert r.headers["x-checksum-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert r.headers["content-length"] == str(len(data))
    etag = r.headers["etag"]
    part = await shared.client.get(offer["download_url"], headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    again = await shared.client.get(offer["download_url"], headers={"If-None-Match": etag})
    assert again.status_code == 304
    # The device reports in paku's words; the admin list answers in them.
    own = devices[device]
    for status, percent in (("downloading", 40), ("downloaded", 100), ("installing", None)):
        report = {"device_id": device, "firmware_version": version, "status": status, "progress_percent": percent}
        r = await shared.client.post(f"/api/device/{device}/update-status", json=report, headers=own)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok"
    r = await shared.client.get(f"/api/admin/update-status?device_id={device}&limit=10", headers=VIEWER)
    assert r.status_code == 200, r.text
    (update,) = r.json()["updates"]
    assert update["device_id"] == device and update["firmware_version"] == version
    assert update["status"] == "installing" and update["progress_percent"] == 100
    assert update["completed_at"] is None and update["reported_at"].endswith("Z")
    report = {"device_id": device, "firmware_version": version, "status": "success", "progress_percent": 100}
    r = await shared.client.post(f"/api/device/{device}/update-status", json=report, headers=own)
    assert r.status_code == 200, r.text
    r = await shared.client.get(
        f"/api/admin/update-status?device_id={device}&firmware_version={version}&limit=10", headers=VIEWER
    )
    (update,) = r.json()["updates"]
    assert update["status"] == "success" and update["completed_at"] is not None
    # Done: nothing more is offered to it; another device of the rollout still gets the offer.
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": device, "device_model": model, "current_version": version}
    )
    assert r.json()["update_available"] is False and r.json()["download_url"] is None
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": ids[1], "device_model": model, "current_version": "1.4.1"}
    )
    assert r.json()["update_available"] is True
    # A failure and a rollback are paku's "failed".
    report = {"device_id": ids[1], "firmware_version": version, "status": "rolled_back", "error_message": "boot loop"}
    r = await shared.client.post(f"/api/device/{ids[1]}/update-status", json=report, headers=devices[ids[1]])
    assert r.status_code == 200, r.text
    r = await shared.client.get(f"/api/admin/update-status?device_id={ids[1]}", headers=VIEWER)
    (update,) = r.json()["updates"]
    assert update["status"] == "failed" and update["error_message"] == "boot loop"


async def test_upload_script_test_builds(shared: Running) -> None:
    """``test_ota_upload.sh``: a ``test-<timestamp>`` version, an empty ``Expect:``, then the health probe."""
    model = unique("lilygo-t-display-s3")
    version = f"test-{int(time.time())}"
    data = image(5000, seed=7)
    params = {"version": version, "device_model": model, "is_signed": "false", "release_notes": "Test upload"}
    r = await shared.client.post(
        "/api/admin/firmware/upload",
        params=params,
        files={"file": ("firmware.bin", data)},
        headers={**OPERATOR, "Expect": ""},
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == version and r.json()["checksum_sha256"] == hashlib.sha256(data).hexdigest()
    found = _jq_releases((await _releases(shared, model, VIEWER)).json(), version)
    assert len(found) == 1 and found[0]["stored_version"] == f"0.0.0-paku.{version}"
    r = await shared.client.get(f"/api/firmware/download/{version}?device_model={model}")
    assert r.status_code == 200 and r.content == data and r.headers["x-firmware-version"] == version
    # Without device_model, the newest upload of that version.
    r = await shared.client.get(f"/api/firmware/download/{version}")
    assert r.status_code == 200 and r.content == data
    r = await shared.client.get("/api/device/health")
    assert r.status_code == 200 and r.json()["status"] == "healthy"
    # Telemetra's own manifest still orders it (a pre-release below every real version).
    r = await shared.client.get(f"/ota/manifest.json?model={model}&prerelease=true")
    assert r.status_code == 200 and r.json()["firmware"][0]["version"] == f"0.0.0-paku.{version}"


@pytest.mark.parametrize(
    ("version", "field"),
    [
        ("1.2.x", "version"),
        ("1.2.3.4", "version"),
        ("test 1", "version"),
        ("test.01", "version"),
        ("-test", "version"),
        ("x" * 60, "version"),
    ],
)
async def test_versions_that_cannot_be_stored_are_422(shared: Running, version: str, field: str) -> None:
    r = await _upload(shared, b"\x01" * 100, version=version, model=unique("m"))
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


async def test_releases_newest_first_and_limited(shared: Running) -> None:
    model = unique("esp32-heater")
    for i, version in enumerate(("1.0.0", "1.2.0", "1.1.0")):
        r = await _upload(shared, image(100, seed=100 + i), version=version, model=model, notes=None)
        assert r.status_code == 200, r.text
    r = await shared.client.get(f"/api/admin/firmware/releases?device_model={model}&limit=50", headers=VIEWER)
    releases = r.json()["releases"]
    assert [x["version"] for x in releases] == ["1.1.0", "1.2.0", "1.0.0"]  # upload order, as paku's service
    assert releases[0]["release_notes"] is None
    r = await shared.client.get(f"/api/admin/firmware/releases?device_model={model}&limit=1", headers=VIEWER)
    assert len(r.json()["releases"]) == 1
    r = await shared.client.get(f"/api/admin/firmware/releases?device_model={model}&limit=101", headers=VIEWER)
    assert r.status_code == 422 and r.json()["field"] == "limit"


async def test_canary_and_single_device_rollouts(shared: Running) -> None:
    model = unique("esp8266-wired-sensors")
    r = await _upload(shared, image(300, seed=9), version="2.0.0", model=model)
    assert r.status_code == 200, r.text
    ids = [unique("ESP8266") for _ in range(12)]
    for d in ids:
        await _device(shared, d, model)
    # check_esp8266_ota.sh: `.devices[]? | device_id, last_seen`.
    r = await shared.client.get(f"/api/admin/devices?device_model={model}&limit=10", headers=ADMIN)
    assert r.status_code == 200 and len(r.json()["devices"]) == 10
    assert all(isinstance(d["device_id"], str) and isinstance(d["last_seen"], str) for d in r.json()["devices"])

    base = {"firmware_version": "2.0.0", "device_model": model, "is_active": True}
    canary = {**base, "name": f"{model}-2.0.0-canary-50", "target_type": "canary", "rollout_percentage": 50}
    r = await shared.client.post("/api/admin/rollout/create", json=canary, headers=OPERATOR)
    assert r.status_code == 200, r.text
    expected = [d for d in ids if device_bucket(d) < 50]
    assert r.json()["devices"] == len(expected)
    if expected:
        r = await shared.client.get("/api/admin/update-status?firmware_version=2.0.0&limit=500", headers=VIEWER)
        listed = {u["device_id"] for u in r.json()["updates"] if u["device_id"] in ids}
        assert listed == set(expected)
        assert all(u["status"] == "pending" for u in r.json()["updates"] if u["device_id"] in ids)
    outside = next(d for d in ids if device_bucket(d) >= 50)
    # single-device: the workflow sends target_device_ids; paku's server read target_filter.device_ids.
    for n, key in enumerate(("target_device_ids", "target_filter")):
        target = [outside] if key == "target_device_ids" else {"device_ids": [outside]}
        single = {**base, "name": f"{model}-2.0.0-single-device-{n}", "target_type": "specific", key: target}
        r = await shared.client.post("/api/admin/rollout/create", json=single, headers=OPERATOR)
        if n == 0:
            assert r.status_code == 200 and r.json()["devices"] == 1, r.text
        else:  # the device is in the first single-device rollout still: told apart, not flashed twice
            assert r.status_code == 409 and r.json()["field"] == "target_device_ids", r.text
    # An unknown device, a missing firmware, a model without devices yet.
    unknown = {**base, "name": unique("r"), "target_type": "specific", "target_device_ids": ["ESP8266-NOPE"]}
    r = await shared.client.post("/api/admin/rollout/create", json=unknown, headers=OPERATOR)
    assert r.status_code == 404 and r.json()["field"] == "target_device_ids", r.text
    r = await shared.client.post(
        "/api/admin/rollout/create", json={**base, "name": unique("r"), "firmware_version": "9.9.9"}, headers=OPERATOR
    )
    assert r.status_code == 404 and r.json()["field"] == "firmware_version"
    lonely = unique("waveshare-s3-touch-lcd-5")
    assert (await _upload(shared, image(10, seed=3), version="1.0.0", model=lonely)).status_code == 200
    r = await shared.client.post(
        "/api/admin/rollout/create",
        json={"name": unique("r"), "firmware_version": "1.0.0", "device_model": lonely, "target_type": "all"},
        headers=OPERATOR,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["devices"] == 0 and r.json()["rollout_id"] is None
    # Bad bodies name the field.
    for bad, field in (
        ({**base, "name": unique("r"), "rollout_percentage": 101}, "rollout_percentage"),
        ({**base, "name": unique("r"), "target_type": "everyone"}, "target_type"),
        ({**base, "name": unique("r"), "target_type": "specific"}, "target_filter.device_ids"),
        ({k: v for k, v in base.items() if k != "device_model"} | {"name": unique("r")}, "device_model"),
    ):
        r = await shared.client.post("/api/admin/rollout/create", json=bad, headers=OPERATOR)
        assert r.status_code == 422 and r.json()["field"] == field, (bad, r.text)


async def test_inactive_rollout_offers_nothing(shared: Running) -> None:
    model = unique("esp32-ch340c-30pin")
    assert (await _upload(shared, image(200, seed=5), version="3.1.0", model=model)).status_code == 200
    device = unique("ESP32")
    await _device(shared, device, model)
    body = {"name": unique("r"), "firmware_version": "3.1.0", "device_model": model, "is_active": False}
    r = await shared.client.post("/api/admin/rollout/create", json=body, headers=OPERATOR)
    assert r.status_code == 200 and r.json()["rollout_status"] == "paused", r.text
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": device, "device_model": model, "current_version": "3.0.0"}
    )
    assert r.status_code == 200 and r.json()["update_available"] is False
    assert r.json()["latest_version"] == "3.1.0"


async def test_who_may_call_what(shared: Running) -> None:
    model = unique("esp32-heater")
    data = image(100, seed=77)
    # Admin endpoints: no key → 401, a viewer may read but not upload or roll out.
    for headers, expected in (({}, 401), ({"X-API-Key": "wrong"}, 401), (VIEWER, 403)):
        r = await _upload(shared, data, version="1.0.0", model=model, headers=headers)
        assert r.status_code == expected and r.json()["field"] == "X-API-Key", r.text
        r = await shared.client.post(
            "/api/admin/rollout/create",
            json={"name": "x", "firmware_version": "1.0.0", "device_model": model},
            headers=headers,
        )
        assert r.status_code == expected, r.text
    for path in ("/api/admin/firmware/releases", "/api/admin/devices", "/api/admin/update-status"):
        assert (await shared.client.get(path)).status_code == 401
        assert (await shared.client.get(path, headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await shared.client.get(path, headers=VIEWER)).status_code == 200
    # Device side: a device reports only for itself; a report needs a rollout of that version.
    a, b = unique("ESP32"), unique("ESP32")
    key_a = await _device(shared, a, model)
    key_b = await _device(shared, b, model)
    report = {"device_id": a, "firmware_version": "1.0.0", "status": "downloading"}
    assert (await shared.client.post(f"/api/device/{a}/update-status", json=report)).status_code == 401
    r = await shared.client.post(f"/api/device/{a}/update-status", json=report, headers=key_b)
    assert r.status_code == 403, r.text
    r = await shared.client.post(f"/api/device/{a}/update-status", json=report, headers=key_a)
    assert r.status_code == 404 and r.json()["field"] == "firmware_version", r.text
    r = await shared.client.post(f"/api/device/{a}/update-status", json={**report, "status": "done"}, headers=key_a)
    assert r.status_code == 422 and r.json()["field"] == "status", r.text
    r = await shared.client.post(f"/api/device/{a}/update-status", json={**report, "device_id": b}, headers=key_a)
    assert r.status_code == 422 and r.json()["field"] == "device_id", r.text
    # The check and the download are open; an unknown version is a 404, not a 500.
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": a, "device_model": model, "current_version": "0.1.0"}
    )
    assert r.status_code == 200 and r.json()["update_available"] is False and r.json()["latest_version"] is None
    r = await shared.client.get("/api/firmware/check", params={"device_id": a, "device_model": model})
    assert r.status_code == 422 and r.json()["field"] == "current_version"
    for version in ("9.9.9", "not a version", "test-1"):
        r = await shared.client.get(f"/api/firmware/download/{version}?device_model={model}")
        assert r.status_code == 404 and r.json()["field"] == "version", r.text


async def test_heater_builds_reach_the_boards_devices(shared: Running) -> None:
    """The workflow's ``lilygo-t-display-s3-heater`` build goes to devices that report the board's model
    (its discovery strips ``-heater``): full and single-device rollouts take them, and their check offers it."""
    board = unique("lilygo-t-display-s3")
    build = f"{board}-heater"
    assert (await _upload(shared, image(400, seed=21), version="2.2.0", model=build)).status_code == 200
    ids = [unique("ESP32") for _ in range(2)]
    for d in ids:
        await _device(shared, d, board)
    other = unique("ESP32")
    await _device(shared, other, unique("waveshare-s3-touch-lcd-43"))
    base = {"firmware_version": "2.2.0", "device_model": build}
    r = await shared.client.post(
        "/api/admin/rollout/create", json={**base, "name": unique("full"), "target_type": "all"}, headers=OPERATOR
    )
    assert r.status_code == 200 and r.json()["devices"] == 2, r.text
    r = await shared.client.get(
        "/api/firmware/check", params={"device_id": ids[0], "device_model": board, "current_version": "2.1.0"}
    )
    assert r.json()["update_available"] is True
    assert r.json()["download_url"] == f"/api/firmware/download/2.2.0?device_model={build}"
    # Single-device names a board device too (here it is still in the full rollout: 409, not two images).
    r = await shared.client.post(
        "/api/admin/rollout/create",
        json={**base, "name": unique("single"), "target_type": "specific", "target_device_ids": [ids[0]]},
        headers=OPERATOR,
    )
    assert r.status_code == 409 and r.json()["field"] == "target_device_ids", r.text
    # A device of an unrelated model is still refused by name.
    r = await shared.client.post(
        "/api/admin/rollout/create",
        json={**base, "name": unique("wrong"), "target_type": "specific", "target_device_ids": [other]},
        headers=OPERATOR,
    )
    assert r.status_code == 422 and r.json()["field"] == "target_device_ids", r.text
