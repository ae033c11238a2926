"""The ``telemetra`` console script, run for real in a subprocess with its own data directory: migrate,
devices create/list/rotate, claim codes, settings errors, and ``serve`` generating an admin key on the
first start. Credentials the CLI prints are checked against the app started on the same SQLite file."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from telemetra.config import Settings
from tests.conftest import ADMIN, make_settings, running_app
from tests.support.procs import clean_environ, free_port

SCRIPT = Path(sys.executable).with_name("telemetra")
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "telemetra.cli"]


def clean_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = clean_environ()
    env.update({"TELEMETRA_DATA_DIR": str(data_dir), "TELEMETRA_MQTT_PORT": "0", **extra})
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty cwd: no .env of the repository's is picked up."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def cli(workdir: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        cwd=workdir,
        env=clean_env(workdir / "data", **extra_env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def app_settings(workdir: Path) -> Settings:
    data_dir = workdir / "data"
    return make_settings(f"sqlite+aiosqlite:///{(data_dir / 'telemetra.db').resolve()}", data_dir)


async def ingest_statuses(workdir: Path, keys: list[str]) -> list[int]:
    async with running_app(app_settings(workdir)) as t:
        statuses = []
        for key in keys:
            r = await t.client.post("/api/v1/ingest", json={"t": 1}, headers={"X-API-Key": key})
            statuses.append(r.status_code)
        return statuses


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TELEMETRA_DATABASE_URL": "mysql://db/x"}, "TELEMETRA_DATABASE_URL: must be a postgresql://"),
        ({"TELEMETRA_ENV": "production", "TELEMETRA_ADMIN_KEYS": "weakkey-Q9"}, "at least 32 characters"),
        ({"TELEMETRA_MQTT_PRESETS": "paku,paku-iot"}, "one device could publish as another"),
        ({"TELEMETRA_MQTT_ROUTES": "site/up=telemetry"}, "needs {device} exactly once"),
        ({"TELEMETRA_TRUSTED_NETWORKS": "10.0.0.0/40"}, "not an IP network"),
    ],
)
def test_invalid_settings_exit_non_zero_with_a_clear_message(workdir: Path, env: dict[str, str], message: str) -> None:
    result = cli(workdir, "migrate", **env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: invalid settings:")
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Value error" not in result.stderr  # not pydantic's wording
    assert "weakkey-Q9" not in result.stderr  # a key is never echoed


# ---------------------------------------------------------------------------------------------- serve


class Server:
    def __init__(self, workdir: Path, log: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [*COMMAND, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=workdir,
            env=clean_env(workdir / "data", TELEMETRA_LOG_LEVEL="WARNING", **env),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def wait_healthy(self, timeout: float = 30) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=1)
                if r.status_code == 200:
                    body: dict[str, object] = r.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"serve not healthy after {timeout} s:\n{self.output()}")

    def stop(self) -> bool:
        """SIGTERM; True when the server went down by itself (uvicorn re-raises the signal after its
        graceful shutdown, so the exit status is -SIGTERM or 0), False when it had to be killed."""
        graceful = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                graceful = False
                self.process.kill()
                self.process.wait()
        if not self._out.closed:
            self._out.close()
        return graceful and self.process.returncode in (0, -signal.SIGTERM)

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text()


@pytest.fixture
def serve(workdir: Path) -> Iterator[list[Server]]:
    servers: list[Server] = []
    yield servers
    for server in servers:
        server.stop()


def test_serve_generates_an_admin_key_once(workdir: Path, serve: list[Server]) -> None:
    first = Server(workdir, workdir / "serve-1.log")
    serve.append(first)
    health = first.wait_healthy()
    assert health["status"] == "healthy"

    key_file = workdir / "data" / "admin.key"
    assert key_file.exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32
    r = httpx.get(f"{first.url}/api/v1/devices", headers={"X-API-Key": key})
    assert r.status_code == 200 and r.json()["total"] == 0
    assert httpx.get(f"{first.url}/api/v1/devices", headers=ADMIN).status_code == 401  # no configured keys
    assert httpx.get(f"{first.url}/api/v1/devices").status_code == 401
    r = httpx.post(f"{first.url}/api/v1/devices", json={"id": "served"}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201
    device_key = r.json()["credentials"]["api_key"]
    assert httpx.post(f"{first.url}/api/v1/ingest", json={"t": 1}, headers={"X-API-Key": device_key}).status_code == 201

    assert first.stop()  # a clean shutdown on SIGTERM
    output = first.output()
    assert "Generated an admin key" in output and str(key_file) in output
    assert key not in output  # the output is the server's log: the key stays in its 0600 file

    # The second start keeps the key and does not print it.
    second = Server(workdir, workdir / "serve-2.log")
    serve.append(second)
    second.wait_healthy()
    assert httpx.get(f"{second.url}/api/v1/devices", headers={"X-API-Key": key}).json()["total"] == 1
    assert second.stop()
    assert "Generated an admin key" not in second.output() and key not in second.output()
    assert key_file.read_text().strip() == key


def test_trusted_network_behind_a_proxy_on_the_same_host(workdir: Path, serve: list[Server]) -> None:
    """The README's nginx setup: every request reaches Telemetra from 127.0.0.1, and uvicorn takes the
    client's address from X-Forwarded-For (127.0.0.1 is the proxy it trusts by default). So a trusted
    192.168.1.0/24 lets the LAN's key-less dashboards in, and neither the world nor the proxy itself."""
    server = Server(
        workdir,
        workdir / "serve.log",
        TELEMETRA_TRUSTED_NETWORKS="192.168.1.0/24",
        TELEMETRA_TRUSTED_ROLE="viewer",
        TELEMETRA_ADMIN_KEYS=ADMIN["X-API-Key"],
    )
    serve.append(server)
    server.wait_healthy()
    lan = httpx.get(f"{server.url}/api/v1/nodes", headers={"X-Forwarded-For": "192.168.1.20"})
    assert lan.status_code == 200 and lan.json() == []
    world = httpx.get(f"{server.url}/api/v1/nodes", headers={"X-Forwarded-For": "203.0.113.9"})
    assert world.status_code == 401
    assert httpx.get(f"{server.url}/api/v1/nodes").status_code == 401  # 127.0.0.1 is not in the network
    assert server.stop()
    assert "TELEMETRA_TRUSTED_NETWORKS is set" in server.output() and "viewer" in server.output()


# ------------------------------------------------------------------------- the CLI on a running server


@pytest.fixture
def running(workdir: Path, serve: list[Server]) -> Server:
    server = Server(workdir, workdir / "serve.log")
    serve.append(server)
    server.wait_healthy()
    return server


def on(server: Server, workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The CLI with the server's own settings (its port; the admin key it generated in the data dir)."""
    return cli(workdir, *args, TELEMETRA_HOST="0.0.0.0", TELEMETRA_PORT=str(server.port), **env)


def ingest(server: Server, key: str) -> int:
    return httpx.post(f"{server.url}/api/v1/ingest", json={"t": 1}, headers={"X-API-Key": key}).status_code


def test_devices_commands_act_on_the_running_server_at_once(workdir: Path, running: Server) -> None:
    created = json.loads(ok(on(running, workdir, "devices", "create", "X", "--model", "m", "--name", "Boiler")))
    assert created["device_id"] == "X" and created["mqtt"] == {"username": "X", "password": created["api_key"]}
    first_key = created["api_key"]
    assert ingest(running, first_key) == 201  # the server knows it at once

    listed = json.loads(ok(on(running, workdir, "devices", "list", "--json")))
    assert listed["total"] == 1
    (row,) = listed["devices"]
    assert (row["id"], row["kind"], row["model"], row["name"], row["online"]) == ("X", "device", "m", "Boiler", True)
    assert first_key not in json.dumps(listed)
    table = ok(on(running, workdir, "devices", "list"))
    assert "online" in table and "yes" in table and "X" in table

    rotated = json.loads(ok(on(running, workdir, "devices", "rotate", "X")))
    assert rotated["api_key"] != first_key
    assert (ingest(running, first_key), ingest(running, rotated["api_key"])) == (401, 201)

    assert ok(on(running, workdir, "devices", "disable", "X")).strip() == "X disabled"
    assert ingest(running, rotated["api_key"]) == 403
    assert json.loads(ok(on(running, workdir, "devices", "show", "X", "--json")))["disabled"] is True
    assert "disabled" in ok(on(running, workdir, "devices", "list"))
    assert ok(on(running, workdir, "devices", "enable", "X")).strip() == "X enabled"
    assert ingest(running, rotated["api_key"]) == 201
    assert "Boiler" in ok(on(running, workdir, "devices", "show", "X"))

    assert json.loads(ok(on(running, workdir, "devices", "delete", "X", "--yes", "--json"))) == {"deleted": "X"}
    assert ingest(running, rotated["api_key"]) == 401
    missing = on(running, workdir, "devices", "rotate", "nope")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "Traceback" not in missing.stderr
    bad_id = on(running, workdir, "devices", "create", "has space")
    assert bad_id.returncode == 2 and "DEVICE_ID" in bad_id.stderr
    reserved = on(running, workdir, "devices", "create", "Admin")
    assert reserved.returncode == 2 and "reserved" in reserved.stderr


def test_creating_an_existing_device_is_a_clear_error(workdir: Path, running: Server) -> None:
    ok(on(running, workdir, "devices", "create", "X"))
    again = on(running, workdir, "devices", "create", "X")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr


def test_claim_codes(workdir: Path, running: Server) -> None:
    out = ok(on(running, workdir, "claim-codes", "--count", "2", "--prefix", "kit", "--model", "env-v2"))
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert len(lines) == 2 and all(len(parts) == 2 for parts in lines)
    for device_id, code in lines:
        assert device_id.startswith("kit-")
        assert len(code) == 19 and code.count("-") == 3
    assert lines[0][1] != lines[1][1]
    out = ok(on(running, workdir, "devices", "claim-codes", "--prefix", "kit", "--model", "env-v2"))
    lines += [line.split("\t") for line in out.strip().splitlines()]
    listed = json.loads(ok(on(running, workdir, "devices", "list", "--json", "--model", "env-v2")))
    assert sorted(d["id"] for d in listed["devices"]) == sorted(d for d, _ in lines)
    bad = on(running, workdir, "claim-codes", "--count", "0")
    assert bad.returncode == 2 and "--count" in bad.stderr


def test_url_and_key_options_and_a_server_that_is_not_running(workdir: Path, running: Server) -> None:
    key = (workdir / "data" / "admin.key").read_text().strip()
    # Another data dir and port in the environment: --url and --key win.
    other = cli(workdir, "devices", "list", "--json", "--url", running.url, "--key", key, TELEMETRA_PORT="1")
    assert json.loads(ok(other))["total"] == 0
    down = cli(workdir, "devices", "list", TELEMETRA_PORT=str(free_port()))
    assert down.returncode == 1 and "cannot reach Telemetra at http://127.0.0.1:" in down.stderr
    assert "is `telemetra serve` running?" in down.stderr and "Traceback" not in down.stderr


def test_version_and_help_on_every_option(workdir: Path) -> None:
    import click

    from telemetra import __version__
    from telemetra.cli import main

    assert ok(cli(workdir, "--version")).strip() == f"telemetra {__version__}"

    def commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
        found = []
        for name, command in group.commands.items():
            found.append((f"{path} {name}", command))
            if isinstance(command, click.Group):
                found += commands(command, f"{path} {name}")
        return found

    missing = [
        f"{path} {param.opts[0]}"
        for path, command in commands(main, "telemetra")
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert missing == []
