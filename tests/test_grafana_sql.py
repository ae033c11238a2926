"""deploy/grafana: every SQL query of the provisioned dashboard (panels and variables), with Grafana's
macros expanded as Grafana expands them, run on a real PostgreSQL that Telemetra migrated and filled, as the
read-only role deploy/postgres/init-grafana.sh creates — set up in the order compose does it (the role and
its default privileges first, on an empty database; Telemetra's tables afterwards)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import ADMIN, PG_ADMIN_URL, make_settings, missing_service, running_app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
(DASHBOARD,) = (DEPLOY / "grafana" / "dashboards").glob("*.json")


@dataclass
class Cluster:
    database: str
    owner: str  # POSTGRES_USER of the compose file: owns the database, runs Telemetra (superuser, as there)
    reader: str  # the Grafana role


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    suffix = uuid.uuid4().hex[:10]
    found = Cluster(f"telemetra_grafana_{suffix}", f"telemetra_owner_{suffix}", f"grafana_{suffix}")
    try:
        admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
        raise
    try:
        await admin.execute(f'CREATE ROLE "{found.owner}" LOGIN SUPERUSER')
        await admin.execute(f'CREATE DATABASE "{found.database}" OWNER "{found.owner}"')
        yield found
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{found.database}" WITH (FORCE)')
        await admin.execute(f'DROP ROLE IF EXISTS "{found.reader}"')
        await admin.execute(f'DROP ROLE IF EXISTS "{found.owner}"')
        await admin.close()


def _server() -> tuple[str, str]:
    """Host and port of the test PostgreSQL."""
    location = PG_ADMIN_URL.split("://", 1)[1].split("@")[-1].split("/")[0]
    host, _, port = location.partition(":")
    return host, port or "5432"


def run_init_script(cluster: Cluster, tmp_path: Path) -> None:
    """deploy/postgres/init-grafana.sh as the postgres image's entrypoint runs it (psql as POSTGRES_USER)."""
    password = tmp_path / "grafana_db_password"
    password.write_text("a-random-test-password\n")  # pragma: allowlist secret (trust auth ignores it)
    host, port = _server()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG")},
        "PGHOST": host,
        "PGPORT": port,
        "POSTGRES_USER": cluster.owner,
        "POSTGRES_DB": cluster.database,
        "GRAFANA_DB_USER": cluster.reader,
        "GRAFANA_DB_PASSWORD_FILE": str(password),
    }
    done = subprocess.run(
        ["sh", str(DEPLOY / "postgres" / "init-grafana.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def expand(sql: str, *, start_ms: int, end_ms: int, variables: dict[str, str | list[str]]) -> str:
    """Grafana's expansion for a SQL data source of what the dashboard uses: $__unixEpochFrom()/To() are
    integer seconds; a multi-value variable is its values single-quoted and comma-separated, a single-value
    one its raw value. Anything left over fails (a macro this expansion does not know)."""
    sql = sql.replace("$__unixEpochFrom()", str(start_ms // 1000)).replace("$__unixEpochTo()", str(end_ms // 1000))
    for name, value in sorted(variables.items(), key=lambda item: -len(item[0])):
        if isinstance(value, list):
            value = ",".join("'" + v.replace("'", "''") + "'" for v in value)
        sql = sql.replace(f"${name}", value)
    assert "$" not in sql, f"unexpanded macro or variable in {sql!r}"
    return sql


def dashboard_queries() -> tuple[dict[str, str], list[tuple[str, str]]]:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v["query"] for v in dashboard["templating"]["list"]}
    panels = [(p["title"], t["rawSql"]) for p in dashboard["panels"] for t in p["targets"]]
    return variables, panels


async def test_every_dashboard_query_runs_as_the_read_only_role(cluster: Cluster, tmp_path: Path) -> None:
    run_init_script(cluster, tmp_path)  # first, on the empty database, as on the volume's first start
    host, port = _server()
    owner_url = f"postgresql+asyncpg://{cluster.owner}@{host}:{port}/{cluster.database}"
    async with running_app(make_settings(owner_url, tmp_path / "data")) as t:
        for device_id in ("boiler-1", "boiler-2"):
            r = await t.client.post("/api/v1/devices", json={"id": device_id, "model": "boiler"}, headers=ADMIN)
            assert r.status_code == 201, r.text
            key = r.json()["credentials"]["api_key"]
            for value in (20.5, 21.5):
                r = await t.client.post("/api/v1/ingest", json={"temperature": value}, headers={"X-API-Key": key})
                assert r.status_code in (200, 201, 202), r.text

    now_ms = int(time.time() * 1000)
    reader = await asyncpg.connect(host=host, port=int(port), user=cluster.reader, database=cluster.database)
    try:
        variables, panels = dashboard_queries()
        devices = [row[0] for row in await reader.fetch(variables["device"])]
        assert devices == ["boiler-1", "boiler-2"]
        keys = [row[0] for row in await reader.fetch(variables["key"])]
        assert "temperature" in keys
        chosen: dict[str, str | list[str]] = {"device": devices, "key": "temperature"}  # multi / single
        results: dict[str, list[asyncpg.Record]] = {}
        for title, raw in panels:
            sql = expand(raw, start_ms=now_ms - 24 * 3600_000, end_ms=now_ms + 60_000, variables=chosen)
            results[title] = await reader.fetch(sql)  # an int4 overflow or a missing grant raises here
        series = results["$key by device"]
        assert sorted((r["metric"], r["value"]) for r in series) == [
            ("boiler-1", 20.5),
            ("boiler-1", 21.5),
            ("boiler-2", 20.5),
            ("boiler-2", 21.5),
        ]
        assert all(abs(r["time"].timestamp() * 1000 - now_ms) < 120_000 for r in series)
        assert {r["id"] for r in results["Devices"]} == {"boiler-1", "boiler-2"}
        # Read-only: the role can look, not change.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.execute("DELETE FROM devices")
    finally:
        await reader.close()


def test_expansion_knows_every_macro_the_dashboard_uses() -> None:
    """The panels' SQL uses only what ``expand`` knows (a new macro would fail the test above with a
    reason, not pass by never being replaced)."""
    _variables, panels = dashboard_queries()
    used = {m for _title, raw in panels for m in re.findall(r"\$\w+(?:\(\))?", raw)}
    assert used <= {"$__unixEpochFrom()", "$__unixEpochTo()", "$key", "$device"}, used
