"""``telemetra backup FILE`` / ``telemetra restore FILE``: one archive with everything a server needs to come
back — the database, the firmware images and the generated admin key.

The archive is a gzipped tar:

- ``manifest.json`` — format, dialect, Telemetra version, time, what is inside;
- ``database.sqlite`` (SQLite's online backup API: a consistent copy while the server writes) or
  ``database.pgdump`` (``pg_dump --format=custom``, consistent by its snapshot);
- ``firmware/<uuid>.bin`` — the images the database's ``firmware`` rows point at;
- ``admin.key`` — the key the server generated, when the data directory has one.

Backup works while the server runs. Restore writes into the configured database and
``TELEMETRA_DATA_DIR``/``TELEMETRA_OTA_DIR`` with the server stopped, refusing to overwrite data that is
there without ``force``. A SQLite archive restores into SQLite and a PostgreSQL one into PostgreSQL.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import URL, make_url

from telemetra import __version__
from telemetra.bootstrap import ADMIN_KEY_FILE
from telemetra.config import Settings

FORMAT = "telemetra-backup/1"
_SQLITE_MEMBER = "database.sqlite"
_PG_MEMBER = "database.pgdump"
# Tables whose rows mean "this database holds data" (restore refuses to overwrite them without --force).
_DATA_TABLES = ("devices", "telemetry", "firmware")


class BackupError(RuntimeError):
    """Something the operator must fix; the message says what."""


@dataclass(frozen=True)
class Summary:
    path: Path
    dialect: str
    firmware_files: int
    admin_key: bool
    size_bytes: int


def _url(settings: Settings) -> URL:
    return make_url(settings.effective_database_url)


def _pg_env(url: URL) -> dict[str, str]:
    """libpq's variables, so the password is never on a command line (visible to every user in ps)."""
    env = dict(os.environ)
    env |= {"PGHOST": url.host or "localhost", "PGPORT": str(url.port or 5432), "PGDATABASE": url.database or ""}
    if url.username:
        env["PGUSER"] = url.username
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return env


def _run(args: list[str], env: dict[str, str]) -> None:
    if shutil.which(args[0]) is None:
        raise BackupError(f"{args[0]} not found: install the PostgreSQL client (apt-get install postgresql-client)")
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"{args[0]} failed: {done.stderr.strip()[-2000:]}")


def backup(settings: Settings, target: Path) -> Summary:
    url = _url(settings)
    dialect = url.get_backend_name()
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="telemetra-backup-", dir=target.parent) as tmp:
        work = Path(tmp)
        if dialect == "sqlite":
            source = Path(url.database or "")
            if not source.is_file():
                raise BackupError(f"no SQLite database at {source} (TELEMETRA_DATA_DIR / TELEMETRA_DATABASE_URL)")
            member, dump = _SQLITE_MEMBER, work / _SQLITE_MEMBER
            _sqlite_copy(source, dump)
        else:
            member, dump = _PG_MEMBER, work / _PG_MEMBER
            _run(["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--file={dump}"], _pg_env(url))
        firmware = sorted(p for p in settings.firmware_dir.glob("*.bin") if p.is_file())
        key_file = settings.data_dir / ADMIN_KEY_FILE
        manifest = {
            "format": FORMAT,
            "telemetra": __version__,
            "dialect": dialect,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "database": member,
            "firmware": [p.name for p in firmware],
            "admin_key": key_file.is_file(),
        }
        partial = work / "archive.tar.gz"
        with tarfile.open(partial, "w:gz") as tar:
            _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=2).encode())
            tar.add(dump, arcname=member)
            for path in firmware:
                tar.add(path, arcname=f"firmware/{path.name}")
            if key_file.is_file():
                tar.add(key_file, arcname=ADMIN_KEY_FILE)
        os.chmod(partial, 0o600)  # it holds the admin key and every device's secret hash
        os.replace(partial, target)  # never a half-written archive under the final name
    return Summary(target, dialect, len(firmware), key_file.is_file(), target.stat().st_size)


def _sqlite_copy(source: Path, target: Path) -> None:
    """SQLite's online backup: a consistent snapshot while the server keeps writing (pages that change
    during the copy are copied again)."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst, pages=4096)
        finally:
            dst.close()
    finally:
        src.close()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


@contextmanager
def _opened(source: Path) -> Iterator[tuple[tarfile.TarFile, dict[str, Any]]]:
    try:
        tar = tarfile.open(source, "r:gz")
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{source}: not a Telemetra backup ({exc})") from None
    with tar:
        try:
            manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        except (KeyError, AttributeError, ValueError):
            raise BackupError(f"{source}: not a Telemetra backup (no manifest.json)") from None
        if manifest.get("format") != FORMAT:
            raise BackupError(f"{source}: unknown backup format {manifest.get('format')!r} (this is {FORMAT})")
        yield tar, manifest


def restore(settings: Settings, source: Path, *, force: bool = False) -> dict[str, Any]:
    """Write the archive's database, firmware and admin key into the configured places. Without ``force``,
    refuses when any of them already holds something."""
    url = _url(settings)
    dialect = url.get_backend_name()
    with _opened(source) as (tar, manifest):
        if manifest["dialect"] != dialect:
            raise BackupError(
                f"{source} is a {manifest['dialect']} backup; the configured database is {dialect} "
                "(set TELEMETRA_DATABASE_URL to match)"
            )
        firmware_dir = settings.firmware_dir
        key_file = settings.data_dir / ADMIN_KEY_FILE
        existing = []
        if _database_has_data(url):
            existing.append(f"the database ({_where(url)})")
        if firmware_dir.is_dir() and any(firmware_dir.glob("*.bin")):
            existing.append(f"firmware images in {firmware_dir}")
        if manifest.get("admin_key") and key_file.exists():
            existing.append(f"an admin key in {key_file}")
        if existing and not force:
            raise BackupError(f"not overwriting {', '.join(existing)}; restore with --force to replace it")
        with tempfile.TemporaryDirectory(prefix="telemetra-restore-") as tmp:
            work = Path(tmp)
            member = manifest["database"]
            dump = work / member
            _extract(tar, member, dump)
            if dialect == "sqlite":
                _restore_sqlite(dump, Path(url.database or ""))
            else:
                _restore_pg(url, dump)
            if firmware_dir.is_dir():
                for old in firmware_dir.glob("*.bin"):
                    old.unlink()
            firmware_dir.mkdir(parents=True, exist_ok=True)
            for name in manifest.get("firmware", []):
                _extract(tar, f"firmware/{name}", firmware_dir / Path(name).name)
            if manifest.get("admin_key"):
                key_file.parent.mkdir(parents=True, exist_ok=True)
                key_file.unlink(missing_ok=True)
                _extract(tar, ADMIN_KEY_FILE, key_file)
                os.chmod(key_file, 0o600)
    return manifest


def _extract(tar: tarfile.TarFile, member: str, target: Path) -> None:
    handle = tar.extractfile(member)
    if handle is None:
        raise BackupError(f"the backup has no {member}")
    with handle, target.open("wb") as out:
        shutil.copyfileobj(handle, out, 1024 * 1024)


def _where(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database}"


def _database_has_data(url: URL) -> bool:
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or "")
        if not path.is_file():
            return False
        conn = sqlite3.connect(path)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return any(conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in _DATA_TABLES if t in names)
        finally:
            conn.close()
    return asyncio.run(_pg_has_data(url))


async def _pg_has_data(url: URL) -> bool:
    import asyncpg

    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    try:
        for table in _DATA_TABLES:
            if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"public.{table}"):
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                    return True
        # An empty schema of ours still needs clearing before pg_restore can create it again.
        return False
    finally:
        await conn.close()


def _restore_sqlite(dump: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    staged = target.with_name(target.name + ".restoring")
    shutil.copyfile(dump, staged)
    os.replace(staged, target)


def _restore_pg(url: URL, dump: Path) -> None:
    """Into a clean public schema (ours, whatever was in it, is dropped first)."""
    env = _pg_env(url)
    _run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-c", "DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public"], env
    )
    _run(["pg_restore", "--no-owner", "--no-privileges", "--exit-on-error", f"--dbname={url.database}", str(dump)], env)
