"""Shared fixtures for the MQTT end-to-end tests (test_collector, test_commands).

``mqtt_app`` runs the real app (lifespan and all) against a real broker, once per broker mode:

- ``embedded``: the in-process amqtt broker on a free port, authenticating against the registry and
  handing what devices publish straight to the ingest path (there is no service account to connect);
- ``mosquitto``: a private Mosquitto with dynamic security (``tests/support/mosquitto.py``); the app
  gets ``mqtt_url=mqtt://telemetra-svc:<random>@127.0.0.1:<port>`` plus the dynsec admin, so it creates
  its own service account and every device's credentials and ACL through the control topic.

``TelemetraProcess`` runs ``telemetra serve`` as a real subprocess (crash and shared-subscription
tests), and ``StoredSeq`` reads what it stored straight from the database.

Storage is SQLite unless a test overrides the ``mqtt_db`` fixture by parametrising it
(``@pytest.mark.parametrize("mqtt_db", ["sqlite", "postgres"])``); settings overrides go the same way
through ``mqtt_overrides``. Devices are real paho clients (MQTT 3.1.1: the embedded broker speaks
nothing newer, and one protocol keeps both modes identical).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import paho.mqtt.client as mqtt
import pytest

from tests.conftest import ADMIN, ADMIN_KEY, Running, make_settings, postgres_database, running_app
from tests.support.mosquitto import MosquittoInstance, PahoTestClient, free_port, start_mosquitto
from tests.support.procs import clean_environ
from tests.support.waiting import eventually as _eventually

T = TypeVar("T")

SERVICE_USER_MOSQUITTO = "telemetra-svc"
EVENTUALLY_S = 8.0


@dataclass(frozen=True)
class Endpoint:
    """What ``PahoTestClient`` reads from a broker: where to connect."""

    host: str
    port: int


class Device(PahoTestClient):
    """A paho device: adds a Last Will and dropping the connection without DISCONNECT."""

    def __init__(
        self,
        endpoint: Endpoint,
        username: str | None,
        password: str | None,
        *,
        will: tuple[str, str] | None = None,
        protocol: int = mqtt.MQTTv311,
        client_id: str | None = None,
        timeout: float = 5.0,
        persistent: bool = False,
    ) -> None:
        super().__init__(
            endpoint,  # type: ignore[arg-type]  # duck-typed: only host and port are read
            username,
            password,
            protocol=protocol,
            client_id=client_id,
            timeout=timeout,
            persistent=persistent,
        )
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)

    async def drop(self) -> None:
        """Vanish as a device losing power does: close the socket, no DISCONNECT (the will must fire)."""
        sock = self._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(self._client.loop_stop)
        sock.close()


@dataclass
class MqttApp:
    mode: str
    running: Running
    endpoint: Endpoint
    service_username: str
    service_password: str
    mosquitto: MosquittoInstance | None
    _devices: list[Device] = field(default_factory=list)

    @property
    def client(self) -> httpx.AsyncClient:
        return self.running.client

    @property
    def services(self) -> Any:
        return self.running.services

    async def create_device(self, device_id: str, **fields: Any) -> str:
        return await self.running.create_device(device_id, **fields)

    def device(self, username: str | None, password: str | None, **kwargs: Any) -> Device:
        # Real firmware connects with its device id as client id (seed 003); on Mosquitto that is the only
        # id a device may use (TELEMETRA_MQTT_BIND_CLIENT_ID).
        kwargs.setdefault("client_id", username)
        client = Device(self.endpoint, username, password, **kwargs)
        self._devices.append(client)
        return client

    async def connect_device(self, username: str, password: str, **kwargs: Any) -> Device:
        client = self.device(username, password, **kwargs)
        rc = await client.connect()
        assert not rc.is_failure, f"{username} refused: {rc}"
        return client

    async def connect_service(self) -> Device:
        """A second connection with the backend's service account (may publish anywhere). Mosquitto
        only: the embedded broker hands devices' messages to ingest in process and has no such account."""
        assert self.mode == "mosquitto", "the embedded broker has no service account"
        return await self.connect_device(self.service_username, self.service_password)

    async def get(self, path: str, **kwargs: Any) -> Any:
        r = await self.client.get(path, headers=ADMIN, **kwargs)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over the series matching ``labels``."""
        r = await self.client.get("/metrics")
        assert r.status_code == 200
        return metric_sum(r.text, name, **labels)

    async def close_devices(self) -> None:
        for client in self._devices:
            try:
                await asyncio.wait_for(client.close(), 5)
            except Exception:  # a dropped or refused client has nothing left to close
                pass


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


async def eventually(check: Callable[[], Awaitable[T]], *, within: float = EVENTUALLY_S, what: str = "") -> T:
    return await _eventually(check, within=within, what=what)


@asynccontextmanager
async def start_mqtt_app(mode: str, tmp_path: Path, *, db: str = "sqlite", **overrides: Any) -> AsyncIterator[MqttApp]:
    async with AsyncExitStack() as stack:
        if db == "postgres":
            url = await stack.enter_async_context(postgres_database())
        else:
            url = f"sqlite+aiosqlite:///{tmp_path / 'telemetra.db'}"
        mosquitto: MosquittoInstance | None = None
        if mode == "mosquitto":
            mosquitto = start_mosquitto(tmp_path / "mosquitto", dynsec=True)
            stack.callback(mosquitto.stop)
            service_user, service_password = SERVICE_USER_MOSQUITTO, secrets.token_urlsafe(18)
            mqtt_settings: dict[str, Any] = {
                "mqtt_url": f"mqtt://{service_user}:{service_password}@{mosquitto.host}:{mosquitto.port}",
                "mqtt_dynsec_username": mosquitto.admin_username,
                "mqtt_dynsec_password": mosquitto.admin_password,
            }
        elif mode == "embedded":
            mqtt_settings = {"mqtt_port": free_port(), "mqtt_host": "127.0.0.1"}
        else:
            raise ValueError(mode)
        settings = make_settings(
            url,
            tmp_path / "data",
            **{"mqtt_client_id": f"telemetra-test-{secrets.token_hex(4)}", **mqtt_settings, **overrides},
        )
        running = await stack.enter_async_context(running_app(settings))
        if mosquitto is not None:
            collector = running.services.mqtt_collector
            await eventually(lambda: _true(collector.connected), what="the collector to connect")
            endpoint = Endpoint(mosquitto.host, mosquitto.port)
        else:
            # In process: no collector and no service account, what devices publish goes straight in.
            endpoint = Endpoint("127.0.0.1", running.services.mqtt_broker.port)
            service_user, service_password = "", ""
        app = MqttApp(mode, running, endpoint, service_user, service_password, mosquitto)
        stack.push_async_callback(app.close_devices)
        yield app


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def mqtt_db() -> str:
    return "sqlite"


@pytest.fixture
def mqtt_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture(params=["embedded", "mosquitto"])
async def mqtt_app(
    request: pytest.FixtureRequest, tmp_path: Path, mqtt_db: str, mqtt_overrides: dict[str, Any]
) -> AsyncIterator[MqttApp]:
    async with start_mqtt_app(request.param, tmp_path, db=mqtt_db, **mqtt_overrides) as app:
        yield app


# -- Telemetra as a real process ------------------------------------------------------------------------

HEALTH_TIMEOUT_S = 30.0


def telemetra_binary() -> list[str]:
    script = Path(sys.executable).parent / "telemetra"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from telemetra.cli import main; main()"]


class TelemetraProcess:
    """``telemetra serve`` on its own HTTP port and data directory; stderr goes to a file for post-mortems."""

    def __init__(self, workdir: Path, *, port: int, env: dict[str, str], name: str = "telemetra") -> None:
        self.workdir = workdir
        self.port = port
        self.name = name
        self.data_dir = workdir / "data"
        self.env = clean_environ()
        self.env.update(
            {"TELEMETRA_ADMIN_KEYS": ADMIN_KEY, "TELEMETRA_HOST": "127.0.0.1", "TELEMETRA_LOG_LEVEL": "INFO"}
        )
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.log"

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*telemetra_binary(), "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
                cwd=self.workdir,  # no stray .env from the repository
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
        """Block until /health is 200 with MQTT connected; fail with the process's output otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
                try:
                    r = client.get("/health")
                    last = f"{r.status_code} {r.text}"
                    if r.status_code == 200 and r.json()["checks"]["mqtt"]["status"] == "ok":
                        body: dict[str, Any] = r.json()
                        return body
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.1)
        pytest.fail(f"{self.name} not healthy after {timeout}s (last: {last}):\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final acks, no DISCONNECT."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def output(self, tail: int = 6000) -> str:
        parts = []
        for n in range(1, self.starts + 1):
            path = self.workdir / f"{self.name}.{n}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"---- {self.name} run {n} ----\n{text[-tail:]}")
        return "\n".join(parts)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=ADMIN, timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        with httpx.Client(base_url=self.base_url, timeout=5) as client:
            r = client.get("/metrics")
        assert r.status_code == 200, r.text
        return metric_sum(r.text, name, **labels)


def create_device_over_http(process: TelemetraProcess, device_id: str) -> str:
    with process.http() as client:
        r = client.post("/api/v1/devices", json={"id": device_id})
    assert r.status_code == 201, r.text
    secret: str = r.json()["credentials"]["api_key"]
    return secret


@dataclass(frozen=True)
class SeqCounts:
    rows: int
    distinct_ts: int
    values: list[int]


def stored_seq(database_url: str, device_id: str, key: str = "seq") -> SeqCounts:
    """Read the ``seq`` series straight from the table (blocking; call from a thread)."""
    sql = "SELECT ts, value_num FROM telemetry WHERE device_id = {p1} AND key = {p2}"
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
            rows = conn.execute(sql.format(p1="?", p2="?"), (device_id, key)).fetchall()
    else:
        dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

        async def fetch() -> list[Any]:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                return list(await conn.fetch(sql.format(p1="$1", p2="$2"), device_id, key))
            finally:
                await conn.close()

        rows = [tuple(r) for r in asyncio.run(fetch())]
    return SeqCounts(len(rows), len({r[0] for r in rows}), sorted(int(r[1]) for r in rows))


def wait_until_stable(
    read: Callable[[], SeqCounts], *, expected: int, timeout: float = 30.0, quiet_s: float = 3.0
) -> SeqCounts:
    """Poll until ``expected`` rows are in (then a short quiet time to catch late duplicates), or the
    count stops growing for ``quiet_s``, or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = read()
    changed = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if now.rows != last.rows:
            changed = time.monotonic()
        last = now
        quiet = time.monotonic() - changed
        if (last.rows >= expected and quiet >= 1.0) or quiet >= quiet_s:
            break
    return last


class SeqPublisher:
    """A device publishing ``{"ts": base+i, "seq": i}`` at QoS 1 over MQTT 5 (PUBACK carries a reason code),
    waiting for each PUBACK and keeping the seqs the broker accepted."""

    def __init__(self, host: str, port: int, device_id: str, secret: str) -> None:
        self.device_id = device_id
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(device_id, secret)
        self.reasons: dict[int, Any] = {}
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.reasons.__setitem__(mid, rc)
        self.client.connect(host, port, 30)
        self.client.loop_start()
        deadline = time.monotonic() + 5
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.client.is_connected(), f"publisher {device_id} could not connect"
        self.base = int(time.time() * 1000) - 3_600_000
        self.accepted: list[int] = []
        self.refused: list[int] = []

    def publish(self, seq: int, *, timeout: float = 10.0) -> None:
        payload = b'{"ts":%d,"seq":%d}' % (self.base + seq, seq)
        info = self.client.publish(f"telemetra/{self.device_id}/telemetry", payload, qos=1)
        info.wait_for_publish(timeout)
        rc = self.reasons.pop(info.mid, None)
        if info.is_published() and rc is not None and not rc.is_failure:
            self.accepted.append(seq)
        else:
            self.refused.append(seq)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
