"""``telemetra backup`` / ``telemetra restore`` for real (the console script in a subprocess), on SQLite and
PostgreSQL: devices, telemetry and firmware go in, the data is wiped, and restore brings back the same
answers from the API — including the firmware bytes and the generated admin key."""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
import subprocess
import tarfile
from pathlib import Path

import asyncpg
from sqlalchemy import make_url

from tests.conftest import ADMIN, AppFactory
from tests.mqtt.conftest import telemetra_binary
from tests.ota.conftest import image, upload


def cli(database_url: str, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    env |= {"TELEMETRA_DATABASE_URL": database_url, "TELEMETRA_DATA_DIR": str(data_dir)}
    # Nothing listens on this port: restore's "is a server running?" check finds none.
    env["TELEMETRA_PORT"] = "1"
    return subprocess.run(
        [*telemetra_binary(), *args], cwd=data_dir.parent, env=env, capture_output=True, text=True, timeout=120
    )


async def snapshot(app_factory: AppFactory) -> dict[str, object]:
    async with app_factory() as t:
        c = t.client
        devices = (await c.get("/api/v1/devices", headers=ADMIN)).json()
        series = (
            await c.get("/api/v1/devices/env-1/telemetry", params={"start": "2026-01-01T00:00:00Z"}, headers=ADMIN)
        ).json()
        firmware = (await c.get("/api/v1/firmware", headers=ADMIN)).json()
        blobs = [(await c.get(f"/api/v1/firmware/{f['id']}/download")).content for f in firmware["items"]]
        return {
            "devices": sorted((d["id"], d["model"]) for d in devices["devices"]),
            "series": series["series"],
            "firmware": sorted((f["version"], f["sha256"]) for f in firmware["items"]),
            "blobs": sorted(blobs),
        }


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


async def wipe(database_url: str, data_dir: Path) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        _remove([Path(f"{url.database}{suffix}") for suffix in ("", "-wal", "-shm")])
    else:
        conn = await asyncpg.connect(
            host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
        )
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()
    _remove([*(data_dir / "firmware").glob("*.bin"), data_dir / "admin.key"])


async def test_backup_wipe_restore_round_trip(app_factory: AppFactory, database_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with app_factory() as t:
        keys = {d: await t.create_device(d, model="env") for d in ("env-1", "env-2")}
        readings = [{"ts": f"2026-11-23T10:0{i}:00Z", "temperature": 20 + i} for i in range(5)]
        r = await t.client.post("/api/v1/ingest/batch", json=readings, headers={"X-API-Key": keys["env-1"]})
        assert r.status_code == 201, r.text
        for n, version in enumerate(("1.0.0", "1.1.0")):
            await upload(t.client, image(50_000, n), model="env", version=version)
    admin_key = secrets.token_urlsafe(32)
    (data_dir / "admin.key").write_text(admin_key + "\n")
    before = await snapshot(app_factory)
    assert len(before["devices"]) == 2 and len(before["firmware"]) == 2  # type: ignore[arg-type]
    assert len(before["series"]["temperature"]) == 5  # type: ignore[index]

    archive = tmp_path / "backups" / "telemetra.tar.gz"
    done = cli(database_url, data_dir, "backup", str(archive))
    assert done.returncode == 0, done.stderr
    assert "2 firmware image(s), admin key" in done.stdout
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "manifest.json" in names and "admin.key" in names
    assert sum(n.startswith("firmware/") for n in names) == 2

    # Restore refuses to overwrite what is there.
    refused = cli(database_url, data_dir, "restore", str(archive))
    assert refused.returncode == 1 and "not overwriting the database" in refused.stderr and "--force" in refused.stderr

    await wipe(database_url, data_dir)
    assert not (data_dir / "admin.key").exists()
    done = cli(database_url, data_dir, "restore", str(archive))
    assert done.returncode == 0, done.stderr
    assert (data_dir / "admin.key").read_text().strip() == admin_key
    assert stat.S_IMODE((data_dir / "admin.key").stat().st_mode) == 0o600
    assert await snapshot(app_factory) == before

    # --force replaces data that is there (a device added after the backup disappears).
    async with app_factory() as t:
        await t.create_device("later")
    forced = cli(database_url, data_dir, "restore", "--force", str(archive))
    assert forced.returncode == 0, forced.stderr
    assert await snapshot(app_factory) == before


def test_backup_of_a_running_sqlite_database_is_consistent(tmp_path: Path) -> None:
    """The online backup API copies a database another connection is writing to."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "telemetra.db"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE devices (id TEXT)")
    writer.executemany("INSERT INTO devices VALUES (?)", [(f"d{i}",) for i in range(1000)])
    writer.commit()  # committed, still in the WAL (no checkpoint): a file copy would miss it
    url = f"sqlite+aiosqlite:///{db}"
    done = cli(url, data_dir, "backup", str(tmp_path / "b.tar.gz"))
    assert done.returncode == 0, done.stderr
    writer.close()
    restored = tmp_path / "restored"
    restored.mkdir()
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        member = tar.extractfile("database.sqlite")
        assert member is not None
        (restored / "copy.db").write_bytes(member.read())
    assert sqlite3.connect(restored / "copy.db").execute("SELECT count(*) FROM devices").fetchone() == (1000,)


def test_restore_refuses_another_dialect_and_garbage(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    done = cli(f"sqlite+aiosqlite:///{data_dir / 'telemetra.db'}", data_dir, "restore", str(junk))
    assert done.returncode == 1 and "not a Telemetra backup" in done.stderr and "Traceback" not in done.stderr


def test_backup_script_rotates(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    sqlite3.connect(data_dir / "telemetra.db").execute("CREATE TABLE devices (id TEXT)").connection.commit()
    backups = tmp_path / "backups"
    backups.mkdir()
    for stamp in ("20260101T000000Z", "20260102T000000Z", "20260103T000000Z"):  # older runs
        (backups / f"telemetra-{stamp}.tar.gz").write_bytes(b"old")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    env |= {"TELEMETRA_DATA_DIR": str(data_dir), "TELEMETRA_BACKUP_KEEP": "2", "TELEMETRA_BIN": telemetra_binary()[0]}
    script = Path(__file__).resolve().parent.parent / "scripts" / "backup.sh"
    done = subprocess.run(
        [str(script), str(backups)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    kept = sorted(p.name for p in backups.iterdir())
    assert len(kept) == 2 and kept[0] == "telemetra-20260103T000000Z.tar.gz"
    assert kept[1].startswith("telemetra-2026") and (backups / kept[1]).stat().st_size > 100  # the new, real one
    assert "removed" in done.stdout and "20260101" in done.stdout
