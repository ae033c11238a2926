"""``telemetra serve`` that cannot start says why in one line, with what to change, and exits with the code
of that cause (issue 11). Each case runs the real console script in a subprocess, in an empty working
directory (no stray .env), against real ports, a real PostgreSQL and nothing mocked."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from telemetra import startup
from tests.conftest import PG_ADMIN_URL, missing_service, postgres_database
from tests.mqtt.conftest import telemetra_binary
from tests.support.mosquitto import free_port

_SEED = {"DATABASE_URL", "API_SECRET_KEY", "DEVICE_API_KEYS", "LOG_LEVEL", "LOG_FORMAT", "HOST", "PORT", "APP_ENV"}


def base_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k not in _SEED}
    env |= {"TELEMETRA_DATA_DIR": str(data_dir), "TELEMETRA_HOST": "127.0.0.1", "TELEMETRA_MQTT_PORT": "0"}
    env |= {"TELEMETRA_PORT": str(free_port()), **extra}
    return env


def serve(tmp_path: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(
        [*telemetra_binary(), "serve", *args],
        cwd=cwd,
        env=base_env(tmp_path / "data", **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one message: the last stderr line, starting `Error: `; no traceback anywhere."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port this test process listens on (so its pid is the holder the message must name)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def listening_pair() -> Iterator[int]:
    """Ports p and p + 1, both listened on by this test process: the next port up is no free suggestion."""
    for _ in range(50):
        first = socket.socket()
        first.bind(("127.0.0.1", 0))
        port = int(first.getsockname()[1])
        second = socket.socket()
        try:
            second.bind(("127.0.0.1", port + 1))
        except OSError:
            first.close()
            second.close()
            continue
        first.listen()
        second.listen()
        try:
            yield port
        finally:
            first.close()
            second.close()
        return
    raise AssertionError("no two consecutive free ports")


def test_http_port_in_use_names_the_setting_the_holder_and_a_free_port(tmp_path: Path, listening_pair: int) -> None:
    listening = listening_pair
    result = serve(tmp_path, TELEMETRA_PORT=str(listening))
    assert result.returncode == startup.EXIT_HTTP_PORT
    line = error_line(result)
    assert f"port {listening} on 127.0.0.1 is already in use" in line
    assert f"(pid {os.getpid()})" in line and "TELEMETRA_PORT" in line
    suggested = int(re.search(r"e\.g\. TELEMETRA_PORT=(\d+), free right now", line).group(1))  # type: ignore[union-attr]
    assert suggested not in (listening, listening + 1)  # both taken: the suggestion skips them
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", suggested))  # and it really is free
    assert not (tmp_path / "data" / "admin.key").exists()  # no key for a server that never ran


def test_mqtt_port_in_use_names_the_setting_the_holder_and_the_alternatives(tmp_path: Path, listening: int) -> None:
    result = serve(tmp_path, TELEMETRA_MQTT_PORT=str(listening), TELEMETRA_MQTT_HOST="127.0.0.1")
    assert result.returncode == startup.EXIT_MQTT_PORT
    line = error_line(result)
    assert "cannot start the embedded MQTT broker" in line and f"port {listening}" in line
    assert f"(pid {os.getpid()})" in line
    assert "TELEMETRA_MQTT_PORT" in line and "TELEMETRA_MQTT_URL" in line
    assert not (tmp_path / "data" / "admin.key").exists()


def test_database_unreachable_names_host_port_database_after_waiting(tmp_path: Path) -> None:
    port = free_port()
    result = serve(
        tmp_path,
        TELEMETRA_DATABASE_URL=f"postgresql://telemetra:pw@127.0.0.1:{port}/fleet",  # pragma: allowlist secret
        TELEMETRA_STARTUP_WAIT_S="2",
    )
    assert result.returncode == startup.EXIT_DATABASE_UNREACHABLE
    line = error_line(result)
    assert f"PostgreSQL at 127.0.0.1:{port}, database 'fleet'" in line
    assert "TELEMETRA_DATABASE_URL" in line and "TELEMETRA_STARTUP_WAIT_S" in line
    assert "pw" not in line.split("TELEMETRA")[0].replace("PostgreSQL", "")  # never the password
    # The wait is in the log: each retry with how long it waits.
    assert result.stderr.count("not available") >= 2 and "retrying in" in result.stderr
    assert not (tmp_path / "data" / "admin.key").exists()


async def _pg_reachable() -> None:
    try:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        missing_service(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    else:
        await conn.close()


def test_missing_database_is_waited_for_then_says_how_to_create_it(tmp_path: Path) -> None:
    asyncio.run(_pg_reachable())
    name = f"telemetra_absent_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    result = serve(tmp_path, TELEMETRA_DATABASE_URL=url, TELEMETRA_STARTUP_WAIT_S="2")
    assert result.returncode == startup.EXIT_DATABASE_MISSING
    line = error_line(result)
    assert f"database '{name}': the database does not exist; waited" in line
    assert "createdb -h 127.0.0.1 -p 5432" in line and "TELEMETRA_STARTUP_WAIT_S" in line
    # While it waited, each retry said what is missing and how to create it.
    hints = [entry for entry in result.stderr.splitlines() if "does not exist yet; create it: createdb" in entry]
    assert len(hints) >= 2 and all("retrying in" in entry for entry in hints), result.stderr
    assert not (tmp_path / "data" / "admin.key").exists()


async def _log_says(process: subprocess.Popen[bytes], log: Path, text: str, deadline: float) -> None:
    """Until the server's log holds ``text``; fails if the server exits or the deadline passes first."""
    while text not in log.read_text():  # noqa: ASYNC240 - a small log, read between sleeps
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()  # noqa: ASYNC240
        await asyncio.sleep(0.1)


async def _healthy(process: subprocess.Popen[bytes], log: Path, port: str, deadline: float) -> None:
    """Until the server answers ``/health`` with 200; fails if it exits or the deadline passes first."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()  # noqa: ASYNC240
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def test_serve_waits_for_a_database_created_after_it_started(tmp_path: Path) -> None:
    """Compose (or an operator) may create the database after Telemetra is up: it keeps retrying, then runs."""
    await _pg_reachable()
    name = f"telemetra_late_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    env = base_env(tmp_path / "data", TELEMETRA_DATABASE_URL=url, TELEMETRA_ADMIN_KEYS="k" * 40)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - starts it, does not wait
            [*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    admin = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        deadline = time.monotonic() + 30
        await _log_says(process, log, "does not exist yet; create it", deadline)  # waiting for it, and saying so
        await admin.execute(f'CREATE DATABASE "{name}"')
        await _healthy(process, log, env["TELEMETRA_PORT"], deadline)
        assert " ready on postgresql" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=20)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def test_external_broker_unreachable(tmp_path: Path) -> None:
    port = free_port()
    result = serve(tmp_path, TELEMETRA_MQTT_URL=f"mqtt://svc:pw@127.0.0.1:{port}", TELEMETRA_STARTUP_WAIT_S="1")
    assert result.returncode == startup.EXIT_BROKER_UNREACHABLE
    line = error_line(result)
    assert f"cannot reach the MQTT broker at 127.0.0.1:{port}" in line and "TELEMETRA_MQTT_URL" in line


def test_bad_tls_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    result = serve(tmp_path, TELEMETRA_MQTT_URL="mqtts://svc:pw@127.0.0.1:8883", TELEMETRA_MQTT_TLS_CA=str(missing))
    assert result.returncode == startup.EXIT_TLS
    assert f"TELEMETRA_MQTT_TLS_CA={missing} is not a readable file" in error_line(result)

    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    result = serve(tmp_path, TELEMETRA_MQTT_URL="mqtts://svc:pw@127.0.0.1:8883", TELEMETRA_MQTT_TLS_CA=str(garbage))
    assert result.returncode == startup.EXIT_TLS
    assert f"TELEMETRA_MQTT_TLS_CA={garbage} is not a PEM CA certificate" in error_line(result)


def test_placeholder_secret_refused_outside_development(tmp_path: Path) -> None:
    placeholder = "change-me-to-a-long-random-string-0123456789"  # what deploy/.env.example used to hold
    result = serve(tmp_path, TELEMETRA_ENV="production", TELEMETRA_ADMIN_KEYS=placeholder)
    assert result.returncode == startup.EXIT_SETTINGS
    assert "TELEMETRA_ADMIN_KEYS: placeholder or example secret outside development" in result.stderr
    assert placeholder not in result.stderr and "Traceback" not in result.stderr


def test_unknown_settings_are_warned_with_the_closest_name(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / ".env").write_text("TELEMETRA_DATA_DIRR=/tmp/x\nMQTT_PORT=1884\n")
    result = subprocess.run(
        [*telemetra_binary(), "migrate"],
        cwd=cwd,
        env=base_env(tmp_path / "data", TELEMETRA_MQT_PORT="1884"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    warnings = result.stderr
    assert "unknown environment variable TELEMETRA_MQT_PORT is ignored; did you mean TELEMETRA_MQTT_PORT?" in warnings
    assert "unknown .env key TELEMETRA_DATA_DIRR is ignored; did you mean TELEMETRA_DATA_DIR?" in warnings
    assert "unknown .env key MQTT_PORT is ignored; did you mean TELEMETRA_MQTT_PORT?" in warnings


class _Forwarder:
    """A TCP port that refuses connections until ``open`` is called, then forwards them to ``target``:
    a database that comes up after Telemetra (compose start-up order)."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port, self.target = port, target
        self._sock: socket.socket | None = None

    def open(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


async def test_serve_waits_for_a_database_that_comes_up_later(tmp_path: Path) -> None:
    async with postgres_database() as url:
        forwarder = _Forwarder(free_port(), ("127.0.0.1", 5432))
        late_url = url.replace("127.0.0.1:5432", f"127.0.0.1:{forwarder.port}")
        assert late_url != url
        env = base_env(tmp_path / "data", TELEMETRA_DATABASE_URL=late_url, TELEMETRA_ADMIN_KEYS="k" * 40)
        log = tmp_path / "serve.log"
        with log.open("w") as out:
            process = subprocess.Popen(  # noqa: ASYNC220 - starts it, does not wait
                [*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + 30
            await _log_says(process, log, "retrying in", deadline)  # it is waiting, and says so
            forwarder.open()
            await _healthy(process, log, env["TELEMETRA_PORT"], deadline)
            assert f"127.0.0.1:{forwarder.port}" in log.read_text()  # the progress names where it waits
        finally:
            process.terminate()
            process.wait(timeout=20)
            forwarder.close()


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_ready_line_gives_the_urls_and_the_log_has_no_colour_codes(tmp_path: Path, fmt: str) -> None:
    env = base_env(tmp_path / "data", TELEMETRA_LOG_FORMAT=fmt)
    base = f"http://127.0.0.1:{env['TELEMETRA_PORT']}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "Application startup complete" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        (ready,) = [line for line in log.read_text().splitlines() if " ready on sqlite" in line]
        assert f"dashboard {base}/ " in ready and f"API docs {base}/docs" in ready, ready
        assert httpx.get(f"{base}/docs").status_code == 200  # the URL it gives works
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = log.read_text()
    assert "Finished server process" in text  # uvicorn's lines, which carry a coloured copy, are all in
    assert "\x1b[" not in text and "color_message" not in text, text
