"""``telemetra simulate``: virtual devices that send realistic telemetry (SPEC §9).

The simulator provisions its devices through the admin HTTP API — or reuses the credentials an earlier
run kept in ``<state-dir>/simulator-devices.json`` (mode 0600, per server URL) — then sends telemetry
with device timestamps over MQTT or HTTP, answers commands, applies configuration and reports state
until ``--duration`` is over or Ctrl-C, and prints what it sent. Device secrets are never printed.

Profiles:

- ``env``: temperature / humidity / pressure / battery random walks; ``event/boot`` at connect and on
  the odd simulated reboot (MQTT);
- ``heatpump``: seed 003's nested payload on ``heatpump/<id>/data`` with ``timestamp`` in ms and a
  retained ``status/online`` (stored only when the server runs the ``heatpump`` MQTT preset); over HTTP
  the same JSON goes to ``/api/v1/ingest``;
- ``mesh``: seed 000's gateway: one ``kind=gateway`` device sends for N child nodes, over HTTP with
  ``POST /api/v1/nodes/{node}/telemetry`` and the gateway's key (the nodes register themselves), over
  MQTT as one array per tick on the gateway's own telemetry topic.

MQTT devices also answer ``ota`` commands (``simulate_ota``): ranged download, SHA-256 check, progress on
``event/ota``, then the new ``fwVersion`` in their state; ``--ota-failure-rate`` plants failures.

MQTT uses one paho client per device, each with its own network thread (``loop_start``) — plenty for
the few hundred devices a simulator runs. Those threads only hand events to the asyncio loop with
``call_soon_threadsafe``; publishing happens on the loop. MQTT 3.1.1, so the embedded broker works too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from telemetra.aio import wait_set
from telemetra.simulate_ota import OtaAgent

log = logging.getLogger(__name__)

ProtocolName = Literal["mqtt", "http"]
ProfileName = Literal["env", "heatpump", "mesh"]
PROTOCOLS: tuple[ProtocolName, ...] = ("mqtt", "http")
PROFILES: tuple[ProfileName, ...] = ("env", "heatpump", "mesh")

STATE_FILE = "simulator-devices.json"
FIRMWARE = "1.0.0"
CONNECT_TIMEOUT_S = 15.0
DRAIN_TIMEOUT_S = 10.0
COMMAND_POLL_S = 3.0
MAX_MQTT_DEVICES = 1000  # one network thread each
# A sender that falls further behind its schedule than this restarts the schedule instead of bursting.
MAX_LAG_S = 1.0


def tls_context(cafile: Path | None) -> ssl.SSLContext:
    """Verifies the server (HTTPS and MQTTS) against ``cafile``, else the system's trust store."""
    return ssl.create_default_context(cafile=str(cafile) if cafile else None)


class SimulationError(RuntimeError):
    """Something the user must fix (admin key, server unreachable, no device could connect)."""


@dataclass(frozen=True)
class SimOptions:
    devices: int
    rate: float
    protocol: ProtocolName = "mqtt"
    profile: ProfileName = "env"
    url: str = "http://127.0.0.1:8000"
    admin_key: str | None = None
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_tls: bool = False  # MQTT over TLS (the server's settings say so: its TLS listener, or mqtts://)
    # The CA that signed the server's certificates (HTTPS and MQTTS); None: the system's trust store.
    cafile: Path | None = None
    prefix: str = "telemetra"
    duration: float | None = None
    id_prefix: str = "sim"
    qos: int = 1
    state_dir: Path = Path("telemetra-data")
    seed: int | None = None
    # OTA (issue 8): MQTT devices answer `ota` commands; this share of them fails (these versions only,
    # when given), chosen by a hash of device id and version.
    ota_failure_rate: float = 0.0
    ota_failure_versions: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise SimulationError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.profile not in PROFILES:
            raise SimulationError(f"profile must be one of {', '.join(PROFILES)}")
        if self.devices < 1:
            raise SimulationError("--devices must be at least 1")
        if self.protocol == "mqtt" and self.profile != "mesh" and self.devices > MAX_MQTT_DEVICES:
            raise SimulationError(f"at most {MAX_MQTT_DEVICES} MQTT devices (one client and thread each)")
        if not self.rate > 0:
            raise SimulationError("--rate must be greater than 0 (messages per second per device)")
        if self.duration is not None and self.duration <= 0:
            raise SimulationError("--duration must be greater than 0")
        if self.qos not in (0, 1, 2):
            raise SimulationError("--qos must be 0, 1 or 2")
        if not 0.0 <= self.ota_failure_rate <= 1.0:
            raise SimulationError("--ota-failure-rate must be between 0 and 1")


@dataclass
class Stats:
    messages: int = 0  # telemetry messages accepted (HTTP 2xx, MQTT PUBACK; QoS 0: handed to the socket)
    points: int = 0  # readings in those messages
    errors: int = 0
    commands: int = 0  # commands answered
    configs: int = 0  # configuration documents applied and reported
    events: int = 0  # events and alerts published (boot, alerts)
    last_error: str | None = None

    def error(self, text: str) -> None:
        self.errors += 1
        if text != self.last_error:
            log.warning("simulator: %s", text)
        self.last_error = text


@dataclass
class Summary:
    protocol: str
    profile: str
    url: str
    devices: list[str]
    created: int
    reused: int
    rotated: int
    seconds: float
    rate_asked: float
    messages: int
    points: int
    errors: int
    commands: int
    configs: int
    events: int
    last_error: str | None
    credentials_file: str
    ota_completed: int = 0
    ota_failed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"device_count": len(self.devices), "rate": round(self.rate, 3)}


# --- credentials -------------------------------------------------------------------------------------


def resolve_admin_key(explicit: str | None) -> str:
    """``--admin-key``, else the first of TELEMETRA_ADMIN_KEYS / API_SECRET_KEY (environment or .env),
    else the key the server generated in ``<TELEMETRA_DATA_DIR>/admin.key``."""
    if explicit:
        return explicit
    from pydantic import ValidationError

    from telemetra.bootstrap import ADMIN_KEY_FILE
    from telemetra.config import Settings

    try:
        settings: Settings | None = Settings()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError:
        settings = None
    if settings is not None and settings.all_admin_keys:
        return settings.all_admin_keys[0]
    for raw in (os.environ.get("TELEMETRA_ADMIN_KEYS"), os.environ.get("API_SECRET_KEY")):
        if raw and (first := next((k.strip() for k in raw.split(",") if k.strip()), None)):
            return first
    default_dir = Path(os.environ.get("TELEMETRA_DATA_DIR", "telemetra-data"))
    data_dir = settings.data_dir if settings is not None else default_dir
    path = data_dir / ADMIN_KEY_FILE
    with contextlib.suppress(OSError):
        key = path.read_text().strip()
        if key:
            return key
    raise SimulationError(
        f"no admin key: pass --admin-key, set TELEMETRA_ADMIN_KEYS, or run where the server keeps {path}"
    )


class CredentialStore:
    """Device secrets from earlier runs, per server URL, in a 0600 JSON file."""

    def __init__(self, path: Path, server: str) -> None:
        self.path = path
        self._server = server.rstrip("/")
        self._doc: dict[str, Any] = {"version": 1, "servers": {}}
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return
        if isinstance(loaded, dict) and isinstance(loaded.get("servers"), dict):
            self._doc = loaded

    def _devices(self) -> dict[str, Any]:
        servers: dict[str, Any] = self._doc["servers"]
        devices: dict[str, Any] = servers.setdefault(self._server, {})
        return devices

    def get(self, device_id: str) -> str | None:
        entry = self._devices().get(device_id)
        secret = entry.get("secret") if isinstance(entry, dict) else None
        return secret if isinstance(secret, str) and secret else None

    def put(self, device_id: str, secret: str, *, kind: str) -> None:
        self._devices()[device_id] = {"secret": secret, "kind": kind}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self._doc, handle, indent=2)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


@dataclass
class Member:
    """A device that holds credentials (for mesh: the gateway)."""

    id: str
    secret: str
    kind: str


class Provisioner:
    def __init__(self, http: httpx.AsyncClient, admin_key: str, store: CredentialStore) -> None:
        self._http = http
        self._admin = {"X-API-Key": admin_key}
        self._store = store
        self.created = self.reused = self.rotated = 0

    async def ensure(self, device_id: str, *, kind: str, model: str, name: str) -> Member:
        known = self._store.get(device_id)
        if known is not None and await self._works(device_id, known):
            self.reused += 1
            return Member(device_id, known, kind)
        body = {"id": device_id, "name": name, "model": model, "kind": kind, "metadata": {"simulated": True}}
        resp = await self._http.post("/api/v1/devices", json=body, headers=self._admin)
        if resp.status_code == 409:
            resp = await self._http.post(f"/api/v1/devices/{device_id}/rotate", headers=self._admin)
            self.rotated += resp.status_code == 200
        else:
            self.created += resp.status_code == 201
        if resp.status_code in (401, 403):
            raise SimulationError(f"the server refused the admin key ({resp.status_code}): pass --admin-key")
        if resp.status_code not in (200, 201):
            raise SimulationError(f"could not provision {device_id}: HTTP {resp.status_code} {resp.text[:300]}")
        secret = resp.json()["credentials"]["api_key"]
        self._store.put(device_id, secret, kind=kind)
        return Member(device_id, secret, kind)

    async def _works(self, device_id: str, secret: str) -> bool:
        """A kept secret still opens the device's own record (it may have been rotated or deleted)."""
        resp = await self._http.get(f"/api/v1/devices/{device_id}", headers={"X-API-Key": secret})
        return resp.status_code == 200


# --- what the devices send ---------------------------------------------------------------------------


def count_points(values: Any) -> int:
    """Readings the server stores for a value tree: numbers and booleans, nested objects flattened."""
    if isinstance(values, dict):
        return sum(count_points(v) for v in values.values())
    return 1 if isinstance(values, bool | int | float) else 0


def _walk(rng: random.Random, value: float, step: float, low: float, high: float) -> float:
    return min(high, max(low, value + rng.gauss(0.0, step)))


class DeviceClock:
    """Device timestamps in ms that never repeat for one device, so every reading is a new point."""

    def __init__(self) -> None:
        self._last = 0

    def stamp(self) -> int:
        now = int(time.time() * 1000)
        self._last = now if now > self._last else self._last + 1
        return self._last


class EnvSensor:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.temperature = rng.uniform(18.0, 24.0)
        self.humidity = rng.uniform(35.0, 60.0)
        self.pressure = rng.uniform(1005.0, 1020.0)
        self.battery = rng.uniform(80.0, 100.0)

    def values(self) -> dict[str, float]:
        r = self._rng
        self.temperature = _walk(r, self.temperature, 0.05, -10.0, 45.0)
        self.humidity = _walk(r, self.humidity, 0.2, 5.0, 100.0)
        self.pressure = _walk(r, self.pressure, 0.05, 950.0, 1050.0)
        self.battery = max(0.0, self.battery - abs(r.gauss(0.0, 0.002)))
        return {
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "pressure": round(self.pressure, 1),
            "battery": round(self.battery, 2),
        }


class HeatPump:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self.inlet = rng.uniform(40.0, 46.0)
        self.ambient = rng.uniform(0.0, 15.0)
        self.compressor = rng.uniform(60.0, 72.0)
        self.voltage = rng.uniform(228.0, 232.0)
        self.current = rng.uniform(6.0, 9.0)
        self.high = rng.uniform(260.0, 290.0)
        self.low = rng.uniform(65.0, 75.0)
        self.defrost = False

    def values(self) -> dict[str, Any]:
        r = self._rng
        self.inlet = _walk(r, self.inlet, 0.05, 25.0, 60.0)
        self.ambient = _walk(r, self.ambient, 0.02, -25.0, 40.0)
        self.compressor = _walk(r, self.compressor, 0.15, 40.0, 95.0)
        self.voltage = _walk(r, self.voltage, 0.3, 207.0, 253.0)
        self.current = _walk(r, self.current, 0.05, 2.0, 16.0)
        self.high = _walk(r, self.high, 0.5, 200.0, 350.0)
        self.low = _walk(r, self.low, 0.2, 40.0, 100.0)
        if r.random() < 0.002:
            self.defrost = not self.defrost
        return {
            "temperature": {
                "inlet": round(self.inlet, 1),
                "outlet": round(self.inlet + r.uniform(4.0, 6.0), 1),
                "ambient": round(self.ambient, 1),
                "compressor": round(self.compressor, 1),
            },
            "electrical": {
                "voltage": round(self.voltage, 1),
                "current": round(self.current, 2),
                "power": round(self.voltage * self.current * 0.98),
            },
            "pressure": {"high": round(self.high, 1), "low": round(self.low, 1)},
            "status": {"compressor": not self.defrost, "fan": True, "defrost": self.defrost},
        }


class MeshNode:
    ROLES = ("PIR", "relay", "sensor")

    def __init__(self, rng: random.Random, node_id: str, index: int) -> None:
        self._rng = rng
        self.id = node_id
        self.name = f"{self.ROLES[index % 3].lower()}{index + 1}"
        self.role = self.ROLES[index % 3]
        self.started = time.monotonic() - rng.uniform(0, 3600)
        self.heap = rng.randint(150_000, 200_000)
        self.peers = rng.randint(1, 6)

    def values(self) -> dict[str, int]:
        r = self._rng
        self.heap = int(min(220_000, max(60_000, self.heap + r.gauss(0, 400))))
        if r.random() < 0.01:
            self.peers = max(0, min(10, self.peers + r.choice((-1, 1))))
        return {"uptime": int(time.monotonic() - self.started), "heap_free": self.heap, "peer_count": self.peers}

    def node_post(self) -> dict[str, Any]:
        """Seed 000's shape exactly: no device timestamp (the server stamps it)."""
        motion = "1" if self._rng.random() < 0.1 else "0"
        return {
            "name": self.name,
            **self.values(),
            "role": self.role,
            "firmware": FIRMWARE,
            "state": {"motion": motion},
        }


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Target:
    """Something that produces telemetry at the configured rate: a device, or a mesh node."""

    id: str
    member: Member
    clock: DeviceClock
    sensor: EnvSensor | HeatPump | MeshNode


class Simulation:
    def __init__(self, options: SimOptions, admin_key: str) -> None:
        self.o = options
        self.admin_key = admin_key
        self.stats = Stats()
        self.rng = random.Random(options.seed)
        self.stop = asyncio.Event()
        self.members: list[Member] = []
        self.targets: list[Target] = []
        self.store = CredentialStore(options.state_dir / STATE_FILE, options.url)
        self.notes: list[str] = []
        self.tls = tls_context(options.cafile)
        self.started = 0.0
        self.elapsed = 0.0
        self.in_flight = 0  # MQTT telemetry awaiting PUBACK
        self.drained = asyncio.Event()
        self.ota: OtaAgent | None = None  # set once the HTTP client exists (downloads go through it)

    # ids: sim-001…; mesh: sim-gw and its nodes sim-node-001…
    def _ids(self) -> list[str]:
        width = max(3, len(str(self.o.devices)))
        name = "node-" if self.o.profile == "mesh" else ""
        return [f"{self.o.id_prefix}-{name}{i:0{width}d}" for i in range(1, self.o.devices + 1)]

    async def provision(self, http: httpx.AsyncClient) -> Provisioner:
        prov = Provisioner(http, self.admin_key, self.store)
        model = f"sim-{self.o.profile}"
        try:
            if self.o.profile == "mesh":
                gateway = await prov.ensure(f"{self.o.id_prefix}-gw", kind="gateway", model=model, name="mesh gateway")
                self.members = [gateway]
            else:
                semaphore = asyncio.Semaphore(8)

                async def one(device_id: str) -> Member:
                    async with semaphore:
                        return await prov.ensure(device_id, kind="device", model=model, name=f"simulated {device_id}")

                self.members = list(await asyncio.gather(*(one(i) for i in self._ids())))
        except httpx.HTTPError as exc:
            raise SimulationError(f"cannot reach Telemetra at {self.o.url}: {exc}") from None
        finally:
            self.store.save()
        for index, target_id in enumerate(self._ids()):
            sensor: EnvSensor | HeatPump | MeshNode
            if self.o.profile == "mesh":
                sensor, member = MeshNode(self.rng, target_id, index), self.members[0]
            else:
                sensor = EnvSensor(self.rng) if self.o.profile == "env" else HeatPump(self.rng)
                member = self.members[index]
            self.targets.append(Target(target_id, member, DeviceClock(), sensor))
        return prov

    def telemetry(self, target: Target) -> tuple[dict[str, Any], int]:
        """(message, points) for one target, with a device timestamp where the profile's devices send one."""
        sensor = target.sensor
        if isinstance(sensor, MeshNode):
            values: dict[str, Any] = sensor.values()
            return {"device_id": target.id, "ts": target.clock.stamp(), **values}, count_points(values)
        values = sensor.values()
        if isinstance(sensor, HeatPump):
            return {"device": target.id, "timestamp": target.clock.stamp(), **values}, count_points(values)
        return {"ts": target.clock.stamp(), **values}, count_points(values)

    async def pace(self, send: Callable[[], Any], offset: float) -> None:
        """Call ``send`` ``rate`` times a second (offset within the first interval) until stopped."""
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.o.rate
        next_at = loop.time() + offset * interval
        while not self.stop.is_set():
            delay = next_at - loop.time()
            if delay > 0:
                await wait_set(self.stop, delay)
                if self.stop.is_set():
                    return
            result = send()
            if asyncio.iscoroutine(result):
                await result
            next_at += interval
            if loop.time() - next_at > MAX_LAG_S:
                next_at = loop.time()

    async def run_for_duration(self, progress: Progress | None) -> None:
        loop = asyncio.get_running_loop()
        self.started = loop.time()
        task_id = None
        if progress is not None:
            total = self.o.duration if self.o.duration else None
            task_id = progress.add_task("simulating", total=total, stats="")
        while not self.stop.is_set():
            elapsed = loop.time() - self.started
            if self.o.duration is not None and elapsed >= self.o.duration:
                self.stop.set()
                break
            if progress is not None and task_id is not None:
                s = self.stats
                progress.update(
                    task_id,
                    completed=min(elapsed, self.o.duration or elapsed),
                    stats=f"{s.messages:,} msgs  {s.points:,} points  {s.errors} errors  {s.commands} cmds",
                )
            wait = 0.25 if self.o.duration is None else min(0.25, max(0.0, self.o.duration - elapsed))
            await wait_set(self.stop, wait)
        self.elapsed = loop.time() - self.started
        if progress is not None and task_id is not None:
            progress.update(task_id, completed=self.o.duration or self.elapsed)


# --- HTTP devices ------------------------------------------------------------------------------------


class HttpDevices:
    def __init__(self, sim: Simulation, http: httpx.AsyncClient) -> None:
        self.sim = sim
        self.http = http

    async def run(self) -> None:
        sim = self.sim
        tasks = [asyncio.create_task(sim.pace(functools.partial(self._send, t), sim.rng.random())) for t in sim.targets]
        tasks += [asyncio.create_task(self._poll_commands(m)) for m in sim.members]
        await sim.stop.wait()
        # Let sends in flight finish (they count when answered); pollers stop at once.
        await asyncio.wait(tasks[: len(sim.targets)], timeout=DRAIN_TIMEOUT_S)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, target: Target) -> None:
        sim = self.sim
        headers = {"X-API-Key": target.member.secret, "Content-Type": "application/json"}
        if isinstance(target.sensor, MeshNode):
            doc = target.sensor.node_post()
            points = count_points({k: v for k, v in doc.items() if k not in ("name", "role", "firmware", "state")})
            path = f"/api/v1/nodes/{target.id}/telemetry"
        else:
            doc, points = sim.telemetry(target)
            path = "/api/v1/ingest"
        try:
            resp = await self.http.post(path, content=orjson.dumps(doc), headers=headers)
        except httpx.HTTPError as exc:
            sim.stats.error(f"{target.id}: {type(exc).__name__}: {exc}")
            return
        if resp.is_success:
            sim.stats.messages += 1
            sim.stats.points += points
        else:
            sim.stats.error(f"{target.id}: HTTP {resp.status_code} {resp.text[:200]}")

    async def _poll_commands(self, member: Member) -> None:
        sim = self.sim
        headers = {"X-API-Key": member.secret}
        await asyncio.sleep(sim.rng.uniform(0, COMMAND_POLL_S))
        while not sim.stop.is_set():
            try:
                resp = await self.http.get("/api/v1/device/commands", params={"wait": 0}, headers=headers)
                if resp.is_success:
                    for command in resp.json().get("commands", []):
                        body = {"status": "ok", "result": {"echo": command.get("name")}}
                        ack = await self.http.post(
                            f"/api/v1/device/commands/{command['id']}/ack", json=body, headers=headers
                        )
                        if ack.is_success:
                            sim.stats.commands += 1
                        else:
                            sim.stats.error(f"{member.id}: command ack HTTP {ack.status_code}")
                else:
                    sim.stats.error(f"{member.id}: command poll HTTP {resp.status_code}")
            except httpx.HTTPError as exc:
                sim.stats.error(f"{member.id}: command poll {type(exc).__name__}")
            await wait_set(sim.stop, COMMAND_POLL_S)


# --- MQTT devices ------------------------------------------------------------------------------------


class MqttDevice:
    """One device's paho client. paho's thread posts every event to the loop; all publishing is on the loop."""

    def __init__(self, sim: Simulation, member: Member, loop: asyncio.AbstractEventLoop) -> None:
        self.sim = sim
        self.member = member
        self.loop = loop
        prefix, dev = sim.o.prefix, member.id
        self.heatpump = sim.o.profile == "heatpump"
        self.telemetry_topic = f"heatpump/{dev}/data" if self.heatpump else f"{prefix}/{dev}/telemetry"
        self.state_topic = f"{prefix}/{dev}/state"
        self.cmd_topic = f"{prefix}/{dev}/cmd"
        self.config_topic = f"{prefix}/{dev}/config"
        self.ack_topic = f"{prefix}/{dev}/event/ack"
        self.rssi = sim.rng.randint(-80, -45)
        self.fw_version = FIRMWARE  # changes when an `ota` command installs another
        self.ready: asyncio.Future[None] = loop.create_future()
        self.connected = False
        self.pending: dict[int, tuple[int, int]] = {}  # mid -> (messages, points) awaiting PUBACK
        self.last_alert = 0.0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{dev}"[:64], protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.username_pw_set(dev, member.secret)
        if sim.o.mqtt_tls:
            self.client.tls_set_context(sim.tls)
        if self.heatpump:
            self.client.will_set(f"heatpump/{dev}/status/online", "false", qos=1, retain=True)
        else:
            self.client.will_set(self.state_topic, "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish

    # paho's thread: hand over, nothing else
    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed at shutdown
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._post(self._connected, reason)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._post(self._disconnected, reason)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._post(self._message, message.topic, message.payload)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        self._post(self._published, mid, reason)

    # the loop
    def start(self) -> None:
        self.client.connect_async(self.sim.o.mqtt_host, self.sim.o.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _connected(self, reason: ReasonCode) -> None:
        if reason.is_failure:
            hint = ""
            if self.heatpump:
                hint = (
                    " (heatpump devices need the server's heatpump MQTT preset, TELEMETRA_MQTT_PRESETS="
                    "default,heatpump: without it the broker refuses their heatpump/… Last Will)"
                )
            self.sim.stats.error(f"{self.member.id}: MQTT connection refused: {reason}{hint}")
            self.client.disconnect()  # stop paho retrying with refused credentials
            if not self.ready.done():
                self.ready.set_exception(SimulationError(f"{self.member.id}: MQTT connection refused: {reason}{hint}"))
            return
        self.connected = True
        self.client.subscribe([(self.cmd_topic, 1), (self.config_topic, 1)])
        self._report_state(None)
        if self.heatpump:
            self.client.publish(f"heatpump/{self.member.id}/status/online", "true", qos=1, retain=True)
        elif self.sim.o.profile == "env":
            self.event("boot", {"reason": "power_on", "fwVersion": self.fw_version})
        if not self.ready.done():
            self.ready.set_result(None)

    def _disconnected(self, reason: ReasonCode) -> None:
        if self.connected and not self.sim.stop.is_set():
            self.sim.stats.error(f"{self.member.id}: MQTT disconnected: {reason}")
        self.connected = False

    def _report_state(self, config: dict[str, Any] | None) -> None:
        doc: dict[str, Any] = {"online": True, "rssi": self.rssi, "fwVersion": self.fw_version}
        if config is not None:
            doc["config"] = config
        self.client.publish(self.state_topic, orjson.dumps(doc), qos=1, retain=True)

    @property
    def device_id(self) -> str:
        return self.member.id

    def report_state(self) -> None:
        self._report_state(None)

    def event(self, name: str, doc: dict[str, Any]) -> None:
        self.client.publish(f"{self.sim.o.prefix}/{self.member.id}/event/{name}", orjson.dumps(doc), qos=1)
        self.sim.stats.events += 1

    def _message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            self.sim.stats.error(f"{self.member.id}: not JSON on {topic}")
            return
        if not isinstance(doc, dict):
            return
        if topic == self.cmd_topic:
            name = doc.get("name")
            answer = {"id": doc.get("id"), "status": "ok", "result": {"echo": name}}
            self.client.publish(self.ack_topic, orjson.dumps(answer), qos=1)
            self.sim.stats.commands += 1
            params = doc.get("params")
            if name == "ota" and self.sim.ota is not None and isinstance(params, dict):
                self.sim.ota.handle(self, params)
            if name == "reboot" and self.sim.o.profile == "env":
                self.event("boot", {"reason": "command", "fwVersion": self.fw_version})
        elif topic == self.config_topic:
            self._report_state(doc)
            self.sim.stats.configs += 1

    def _published(self, mid: int, reason: ReasonCode) -> None:
        entry = self.pending.pop(mid, None)
        if entry is None:
            return
        self.sim.in_flight -= 1
        if self.sim.in_flight == 0:
            self.sim.drained.set()
        if reason.is_failure:
            self.sim.stats.error(f"{self.member.id}: publish refused: {reason}")
        else:
            self.sim.stats.messages += entry[0]
            self.sim.stats.points += entry[1]

    def publish_telemetry(self, doc: Any, messages: int, points: int) -> None:
        qos = self.sim.o.qos
        info = self.client.publish(self.telemetry_topic, orjson.dumps(doc), qos=qos)
        if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.pending[info.mid] = (messages, points)  # paho sends it after a reconnect
            self.sim.in_flight += 1
        elif info.rc == mqtt.MQTT_ERR_SUCCESS:
            self.sim.stats.messages += messages
            self.sim.stats.points += points
        else:
            self.sim.stats.error(f"{self.member.id}: publish failed: {mqtt.error_string(info.rc)}")

    async def close(self) -> None:
        if self.connected:
            if self.heatpump:
                self.client.publish(f"heatpump/{self.member.id}/status/online", "false", qos=1, retain=True)
            self.client.publish(self.state_topic, "offline", qos=1, retain=True)
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)


class MqttDevices:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.devices: list[MqttDevice] = []

    async def run(self) -> None:
        sim = self.sim
        loop = asyncio.get_running_loop()
        self.devices = [MqttDevice(sim, m, loop) for m in sim.members]
        by_id = {d.member.id: d for d in self.devices}
        try:
            for device in self.devices:
                device.start()
            await asyncio.wait([d.ready for d in self.devices], timeout=CONNECT_TIMEOUT_S)
            live = [d for d in self.devices if d.ready.done() and d.ready.exception() is None]
            if not live:
                first = next((d.ready.exception() for d in self.devices if d.ready.done()), None)
                reason = str(first) if first else f"no CONNACK within {CONNECT_TIMEOUT_S:.0f} s"
                where = f"{'mqtts' if sim.o.mqtt_tls else 'mqtt'}://{sim.o.mqtt_host}:{sim.o.mqtt_port}"
                raise SimulationError(f"no device could connect to {where}: {reason}")
            if len(live) < len(self.devices):
                sim.notes.append(f"{len(self.devices) - len(live)} of {len(self.devices)} devices could not connect")
            if sim.o.profile == "mesh":
                gateway = self.devices[0]
                tasks = [asyncio.create_task(sim.pace(functools.partial(self._mesh_tick, gateway), 0.0))]
            else:
                tasks = [
                    asyncio.create_task(sim.pace(functools.partial(self._send, by_id[t.member.id], t), offset))
                    for t, offset in ((t, sim.rng.random()) for t in sim.targets)
                    if by_id[t.member.id] in live
                ]
            await sim.stop.wait()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._drain()
        finally:
            if sim.ota is not None:
                await sim.ota.close()
            await asyncio.gather(*(d.close() for d in self.devices), return_exceptions=True)

    def _send(self, device: MqttDevice, target: Target) -> None:
        doc, points = self.sim.telemetry(target)
        device.publish_telemetry(doc, 1, points)
        rng = self.sim.rng
        if self.sim.o.profile == "env" and rng.random() < 0.0005:
            device.event("boot", {"reason": "watchdog", "fwVersion": device.fw_version})
        sensor = target.sensor
        if isinstance(sensor, HeatPump) and sensor.compressor > 85 and time.monotonic() - device.last_alert > 60:
            device.last_alert = time.monotonic()
            alert = {
                "type": "high_temp",
                "level": "warning",
                "value": round(sensor.compressor, 1),
                "message": "compressor temperature high",
            }
            device.client.publish(f"heatpump/{device.member.id}/alerts", orjson.dumps(alert), qos=1)
            self.sim.stats.events += 1

    def _mesh_tick(self, gateway: MqttDevice) -> None:
        readings = [self.sim.telemetry(t) for t in self.sim.targets]
        gateway.publish_telemetry([doc for doc, _ in readings], len(readings), sum(p for _, p in readings))

    async def _drain(self) -> None:
        """Wait for the PUBACKs of what is still in flight: a message counts once the broker has it."""
        if self.sim.in_flight:
            self.sim.drained.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.sim.drained.wait(), DRAIN_TIMEOUT_S)
        lost = sum(len(d.pending) for d in self.devices)
        if lost:
            self.sim.stats.error(f"{lost} telemetry messages got no PUBACK within {DRAIN_TIMEOUT_S:.0f} s")


# --- entry points ------------------------------------------------------------------------------------


async def simulate(options: SimOptions, *, console: Console | None = None) -> Summary:
    options.validate()
    admin_key = resolve_admin_key(options.admin_key)
    sim = Simulation(options, admin_key)
    err = console or Console(stderr=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, sim.stop.set)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(
            base_url=options.url.rstrip("/"), timeout=10.0, limits=limits, verify=sim.tls
        ) as http:
            sim.ota = OtaAgent(
                http, failure_rate=options.ota_failure_rate, failure_versions=options.ota_failure_versions
            )
            prov = await sim.provision(http)
            if options.protocol == "mqtt" and options.profile == "heatpump":
                sim.notes.append(
                    "heatpump/<id>/data is stored only when the server runs the heatpump MQTT preset "
                    "(TELEMETRA_MQTT_PRESETS=default,heatpump)"
                )
            progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[stats]}"),
                console=err,
                disable=not err.is_terminal,
                transient=False,
            )
            runner = HttpDevices(sim, http).run() if options.protocol == "http" else MqttDevices(sim).run()
            with progress:
                worker = asyncio.create_task(runner)
                clock = asyncio.create_task(sim.run_for_duration(progress))
                done, _ = await asyncio.wait([worker, clock], return_when=asyncio.FIRST_COMPLETED)
                failure = worker.exception() if worker in done else None
                if failure is not None:
                    sim.stop.set()
                    clock.cancel()
                    await asyncio.gather(clock, return_exceptions=True)
                    raise failure
                await asyncio.gather(worker, clock)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    ids = [t.id for t in sim.targets] + ([m.id for m in sim.members] if options.profile == "mesh" else [])
    s = sim.stats
    return Summary(
        protocol=options.protocol,
        profile=options.profile,
        url=options.url,
        devices=ids,
        created=prov.created,
        reused=prov.reused,
        rotated=prov.rotated,
        seconds=round(sim.elapsed, 3),
        rate_asked=options.rate,
        messages=s.messages,
        points=s.points,
        errors=s.errors,
        commands=s.commands,
        configs=s.configs,
        events=s.events,
        last_error=s.last_error,
        credentials_file=str(sim.store.path),
        notes=sim.notes,
        ota_completed=sim.ota.counts.completed if sim.ota else 0,
        ota_failed=sim.ota.counts.failed if sim.ota else 0,
    )


def print_summary(summary: Summary, *, as_json: bool, console: Console | None = None) -> None:
    if as_json:
        print(json.dumps(summary.as_dict()))
        return
    out = console or Console()
    per_device = summary.rate / max(1, len(summary.devices) - (1 if summary.profile == "mesh" else 0))
    table = Table(show_header=False, title=f"telemetra simulate: {summary.profile} over {summary.protocol}")
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "devices",
        f"{len(summary.devices)} ({summary.created} created, {summary.reused} reused, {summary.rotated} re-keyed)",
    )
    table.add_row("messages sent", f"{summary.messages:,}")
    table.add_row("points sent", f"{summary.points:,}")
    table.add_row("errors", f"{summary.errors:,}" + (f"  (last: {summary.last_error})" if summary.last_error else ""))
    table.add_row("commands answered", f"{summary.commands:,}")
    table.add_row("configs applied", f"{summary.configs:,}")
    table.add_row("events published", f"{summary.events:,}")
    if summary.ota_completed or summary.ota_failed:
        table.add_row("firmware updates", f"{summary.ota_completed:,} installed, {summary.ota_failed:,} failed")
    table.add_row("elapsed", f"{summary.seconds:.1f} s")
    table.add_row(
        "rate achieved", f"{summary.rate:,.1f} msg/s ({per_device:.2f} per device; asked {summary.rate_asked:g})"
    )
    table.add_row("credentials kept in", summary.credentials_file)
    for note in summary.notes:
        table.add_row("note", note)
    out.print(table)


def run(options: SimOptions) -> Summary:
    """Synchronous entry point for the CLI."""
    return asyncio.run(simulate(options))
