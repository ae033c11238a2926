"""The firmware store over HTTP, on SQLite and PostgreSQL: upload → manifest → download (whole, by ETag,
in resumed ranges) → the hashes match; signatures verify with the published key; every wrong input is a
4xx naming its field; delete frees the (model, version) pair and refuses while a rollout runs."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from telemetra.ota.signing import verify
from tests.conftest import ADMIN, AppFactory
from tests.ota.conftest import image, upload


def _store_files(data_dir: Path) -> list[Path]:
    store = data_dir / "firmware"
    return sorted(p for p in store.rglob("*") if p.is_file())


async def test_upload_manifest_download_round_trip(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        versions = ["1.0.0", "1.2.0", "v1.10.0", "2.0.0-rc.1", "1.10.1-beta.2"]
        images = {v: image(3000 + i * 111, seed=i) for i, v in enumerate(versions)}
        uploaded = {v: await upload(c, data, model="env-v1", version=v) for v, data in images.items()}
        assert uploaded["v1.10.0"]["version"] == "1.10.0"  # the leading v is dropped
        fw = uploaded["1.2.0"]
        data = images["1.2.0"]
        assert fw["size_bytes"] == len(data) and isinstance(fw["id"], int)
        assert fw["sha256"] == hashlib.sha256(data).hexdigest()
        assert fw["md5"] == fw["md5_hash"] == hashlib.md5(data).hexdigest()
        assert (fw["node_type"], fw["hardware"], fw["is_stable"], fw["prerelease"]) == ("env-v1", "ESP32", False, False)
        await upload(c, image(10, 99), model="other", version="5.0.0")

        # The manifest orders by semantic version: 1.10.0 is newer than 1.2.0, pre-releases stay back.
        async def offered(**params: str) -> list[str]:
            r = await c.get("/ota/manifest.json", params=params)
            assert r.status_code == 200, r.text
            return [e["version"] for e in r.json()["firmware"]]

        assert await offered(model="env-v1", current="1.2.0") == ["1.10.0"]
        assert await offered(model="env-v1", current="1.10.0") == []
        assert await offered(model="env-v1", current="3.0.0") == []  # newer than everything: nothing
        assert await offered(model="env-v1", current="1.10.0", prerelease="true") == ["2.0.0-rc.1"]
        assert await offered(model="env-v1", current="1.10.1-beta.1") == ["2.0.0-rc.1"]  # runs a pre-release
        assert await offered(model="env-v1") == ["1.10.0", "1.2.0", "1.0.0"]
        assert await offered() == ["1.10.0", "1.2.0", "1.0.0", "5.0.0"]
        r = await c.get("/ota/manifest.json", params={"model": "env-v1", "current": "1.2.0"})
        entry = r.json()["firmware"][0]
        assert set(entry) >= {"model", "version", "url", "sha256", "size"}
        assert entry["url"] == f"http://testserver/api/v1/firmware/{uploaded['v1.10.0']['id']}/download"

        # Whole download: the bytes, the headers a raw-socket gateway needs, no key.
        url = f"/api/v1/firmware/{fw['id']}/download"
        r = await c.get(url)
        assert r.status_code == 200 and r.content == data
        h = r.headers
        assert h["content-length"] == str(len(data)) and h["accept-ranges"] == "bytes"
        assert h["etag"] == f'"{fw["sha256"]}"'
        assert h["x-md5"] == fw["md5"] and h["x-checksum-sha256"] == fw["sha256"]
        assert "transfer-encoding" not in h and "content-encoding" not in h
        assert h["content-disposition"].startswith("attachment")

        # By ETag: nothing sent again.
        r = await c.get(url, headers={"If-None-Match": h["etag"]})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == h["etag"]
        r = await c.get(url, headers={"If-None-Match": '"something-else"'})
        assert r.status_code == 200 and r.content == data

        # Resumed: the first part, then the rest from where it stopped, If-Range guarding the resume.
        first = await c.get(url, headers={"Range": "bytes=0-999"})
        assert first.status_code == 206 and first.headers["content-range"] == f"bytes 0-999/{len(data)}"
        rest = await c.get(url, headers={"Range": "bytes=1000-", "If-Range": h["etag"]})
        assert rest.status_code == 206 and rest.headers["content-length"] == str(len(data) - 1000)
        assert hashlib.sha256(first.content + rest.content).hexdigest() == fw["sha256"]
        tail = await c.get(url, headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        stale = await c.get(url, headers={"Range": "bytes=1000-", "If-Range": '"an-older-image"'})
        assert stale.status_code == 200 and stale.content == data  # changed since: the whole file
        head = await c.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data)) and head.content == b""


async def test_wrong_download_and_manifest_requests_name_their_field(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        fw = await upload(c, image(2048), model="m1", version="1.0.0")
        url = f"/api/v1/firmware/{fw['id']}/download"
        r = await c.get(url, headers={"Range": "bytes=2048-"})
        assert r.status_code == 416 and r.json()["field"] == "Range"
        assert r.headers["content-range"] == "bytes */2048"
        for bad in ("bytes=10-5", "bytes=0-1,4-5", "pages=1-2"):
            r = await c.get(url, headers={"Range": bad})
            assert (r.status_code, r.json()["field"]) == (400, "Range"), bad
        r = await c.get("/api/v1/firmware/999/download")
        assert (r.status_code, r.json()["field"]) == (404, "firmware_id")
        r = await c.get("/ota/manifest.json", params={"model": "no-such-model", "current": "1.0.0"})
        assert (r.status_code, r.json()["field"]) == (404, "model")
        r = await c.get("/ota/manifest.json", params={"model": "m1", "current": "one"})
        assert (r.status_code, r.json()["field"]) == (422, "current")
        r = await c.get("/ota/manifest.json", params={"current": "1.0.0"})
        assert (r.status_code, r.json()["field"]) == (422, "model")


async def test_upload_refusals(app_factory: AppFactory, tmp_path: Path) -> None:
    async with app_factory(ota_max_firmware_bytes=10_000) as t:
        c = t.client
        await upload(c, image(500), model="m", version="1.0.0")

        async def refused(status: int, field: str, **kwargs: object) -> None:
            kwargs.setdefault("headers", ADMIN)
            r = await c.post("/api/v1/firmware/upload", **kwargs)  # type: ignore[arg-type]
            assert r.status_code == status, r.text
            assert r.json()["field"] == field, r.text

        one = {"file": ("fw.bin", image(500, 1))}
        await refused(409, "version", files=one, data={"model": "m", "version": "1.0.0"})  # duplicate
        await refused(409, "version", files=one, data={"model": "m", "version": "v1.0"})  # the same, normalised
        await refused(422, "file", files={"file": ("e.bin", b"")}, data={"model": "m", "version": "2.0.0"})
        await refused(413, "file", files={"file": ("big.bin", image(10_001))}, data={"model": "m", "version": "3.0.0"})
        await refused(422, "version", files=one, data={"model": "m", "version": "1.2.3.4"})
        await refused(422, "version", files=one, data={"model": "m", "version": "7"})
        await refused(422, "version", files=one, data={"model": "m"})
        await refused(422, "model", files=one, data={"version": "4.0.0"})
        await refused(422, "node_type", files=one, data={"node_type": "bad model!", "version": "4.0.0"})
        await refused(422, "is_stable", files=one, data={"model": "m", "version": "4.0.0", "is_stable": "maybe"})
        await refused(422, "file", data={"model": "m", "version": "4.0.0"})  # a form without a file
        await refused(422, "file", json={"model": "m"})  # not multipart at all
        await refused(
            400,
            "body",
            content=b"--x\r\nnot a form",
            headers={**ADMIN, "content-type": "multipart/form-data; boundary=x"},
        )
        r = await c.post("/api/v1/firmware/upload", files=one, data={"model": "m", "version": "5.0.0"})
        assert r.status_code == 401  # an admin key is required
        # Nothing that was refused stayed on disk; the one image that was stored is there.
        assert len(_store_files(t.settings.data_dir)) == 1
        # Fields in the query string work too (curl -F file=@fw.bin '…?model=&version=').
        r = await c.post("/api/v1/firmware", params={"model": "m", "version": "6.0.0"}, files=one, headers=ADMIN)
        assert r.status_code == 200 and r.json()["version"] == "6.0.0"


async def test_list_filters_star_and_delete(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        a = await upload(c, image(100, 1), model="pir", version="1.0.0", release_notes="", is_stable="true")
        b = await upload(c, image(100, 2), model="pir", version="1.1.0", hardware="ESP32-S3", notes="faster")
        await upload(c, image(100, 3), model="led", version="1.0.0")
        assert a["release_notes"] is None and a["is_stable"] is True  # iotmesh: an empty form value is null
        assert b["release_notes"] == "faster" and b["hardware"] == "ESP32-S3"
        r = await c.get("/api/v1/firmware", params={"node_type": "pir"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["total"] == 2
        assert [f["version"] for f in r.json()["items"]] == ["1.1.0", "1.0.0"]
        r = await c.get("/api/v1/firmware", params={"hardware": "ESP32-S3"}, headers=ADMIN)
        assert [f["id"] for f in r.json()["items"]] == [b["id"]]
        r = await c.get(f"/api/v1/firmware/{a['id']}", headers=ADMIN)
        assert r.json()["sha256"] == a["sha256"]

        r = await c.patch(f"/api/v1/firmware/{b['id']}/stable", params={"is_stable": "true"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["is_stable"] is True
        r = await c.patch(f"/api/v1/firmware/{b['id']}/stable", headers=ADMIN)  # toggles
        assert r.json()["is_stable"] is False
        r = await c.get("/api/v1/firmware", params={"is_stable": "true"}, headers=ADMIN)
        assert [f["id"] for f in r.json()["items"]] == [a["id"]]
        r = await c.get("/ota/manifest.json", params={"model": "pir", "stable": "true"})
        assert [e["version"] for e in r.json()["firmware"]] == ["1.0.0"]

        # Delete removes the file and its finished jobs, and frees the pair for a new upload.
        job = (await c.post("/api/v1/ota/updates", json={"firmware_id": a["id"]}, headers=ADMIN)).json()
        files_before = len(_store_files(t.settings.data_dir))
        r = await c.delete(f"/api/v1/firmware/{a['id']}", headers=ADMIN)
        assert r.status_code == 200 and r.json()["filename"] == "fw.bin"
        assert len(_store_files(t.settings.data_dir)) == files_before - 1
        assert (await c.get(f"/api/v1/ota/updates/{job['id']}", headers=ADMIN)).status_code == 404
        assert (await c.get(f"/api/v1/firmware/{a['id']}", headers=ADMIN)).status_code == 404
        await upload(c, image(100, 4), model="pir", version="1.0.0")
        r = await c.delete(f"/api/v1/firmware/{a['id']}", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (404, "firmware_id")


async def test_delete_is_refused_while_a_rollout_runs(app_factory: AppFactory) -> None:
    async with app_factory() as t:
        c = t.client
        await t.create_device("env-1", model="env")
        fw = await upload(c, image(100), model="env", version="2.0.0")
        r = await c.post("/api/v1/ota/updates", json={"firmware_id": fw["id"], "target_model": "env"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["status"] == "distributing"
        rollout = r.json()["id"]
        r = await c.delete(f"/api/v1/firmware/{fw['id']}", headers=ADMIN)
        assert (r.status_code, r.json()["field"]) == (409, "firmware_id")
        assert (await c.post(f"/api/v1/ota/updates/{rollout}/cancel", headers=ADMIN)).json()["status"] == "cancelled"
        r = await c.delete(f"/api/v1/firmware/{fw['id']}", headers=ADMIN)
        assert r.status_code == 200


async def test_signatures_verify_with_the_published_key(app_factory: AppFactory, tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    key_file = tmp_path / "signing.pem"
    key_file.write_bytes(pem)
    async with app_factory(ota_signing_key_file=key_file) as t:
        c = t.client
        data = image(4096, 7)
        fw = await upload(c, data, model="env", version="1.0.0")
        r = await c.get("/ota/public-key")
        assert r.status_code == 200
        public = base64.b64decode(r.json()["public_key"])
        assert fw["signature"] and verify(public, hashlib.sha256(data).hexdigest(), fw["signature"])
        assert not verify(public, hashlib.sha256(data + b"x").hexdigest(), fw["signature"])
        download = await c.get(f"/api/v1/firmware/{fw['id']}/download")
        assert download.headers["x-signature-ed25519"] == fw["signature"]
        manifest = (await c.get("/ota/manifest.json", params={"model": "env"})).json()
        assert manifest["firmware"][0]["signature"] == fw["signature"]
    async with app_factory() as t:  # no key configured: no signature, and no public key
        r = await t.client.get("/ota/public-key")
        assert r.status_code == 404
        listed = (await t.client.get("/api/v1/firmware", headers=ADMIN)).json()["items"]
        assert listed[0]["signature"] is None


async def test_require_key_closes_downloads_and_the_manifest(app_factory: AppFactory) -> None:
    async with app_factory(ota_require_key=True) as t:
        c = t.client
        secret = await t.create_device("env-1", model="env")
        fw = await upload(c, image(100), model="env", version="1.0.0")
        for path in (f"/api/v1/firmware/{fw['id']}/download", "/ota/manifest.json"):
            r = await c.get(path)
            assert (r.status_code, r.json()["field"]) == (401, "X-API-Key")
            assert (await c.get(path, headers={"X-API-Key": secret})).status_code == 200
