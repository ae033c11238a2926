"""MQTT ingest benchmark: N devices publish QoS 1 telemetry through a broker into Telemetra on PostgreSQL.

Scenarios, all in one run on this machine (broker, Telemetra, PostgreSQL and the load generator share it):

- ``bare``: the same publishers through the same Mosquitto to one paho subscriber (QoS 1, nothing
  stored) — the ceiling the broker and the Python clients allow here;
- ``mosquitto``: Telemetra (``telemetra serve``, external broker with dynamic security, PostgreSQL);
- ``embedded``: Telemetra with its embedded amqtt broker (devices speak MQTT 3.1.1, as amqtt requires);
- ``bare-amqtt``: the publishers through an amqtt broker alone (amqtt's own ``Broker``, anonymous, every
  client allowed) to one paho subscriber — the ceiling of the embedded path.

Publishers: ``--procs`` processes, each one thread driving its share of the devices' paho clients
(one client and credential per device, MQTT 3.1.1, QoS 1, at most ``--window`` unacknowledged messages
per client) over one ``select`` loop. Messages are ``{"ts":<ms, unique per device>,"temperature":…,
"humidity":…,"voltage":…}`` — three readings; ``ts`` is the publish time, so publish→stored latency is
read off the database. Prints messages acked by the broker per second, messages stored per second
(sustained: until the last one is committed), readings/s, loss (acked − stored, must be 0), latency
p50/p99, server RSS and CPU, ratios, and PASS/MISS against 4,000 msg/s (Mosquitto) and 2,000 msg/s
(embedded) with zero loss.

    .venv/bin/python bench/mqtt_ingest.py [--devices 100] [--procs 2] [--duration 15] [--rate 0] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support.mosquitto

VENV_BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("TELEMETRA_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PREFIX = "telemetra"
READINGS_PER_MESSAGE = 3
TARGET_MSGS_S = 4_000
# Issue 6's target for the embedded broker on this 2-core box (it carries less than Mosquitto: amqtt alone
# is about 0.4 of bare Mosquitto here).
TARGET_EMBEDDED_MSGS_S = 2_000
SERVICE_USER = "svc"
LATENCY_POLL_S = 0.02
COUNT_POLL_S = 0.25
# count(*) over the telemetry table costs ~20 ms per 200k rows on this machine: only once a second while
# the publishers run (the steady rate needs no more), every COUNT_POLL_S while waiting for the last commit.
COUNT_POLL_LOADED_S = 1.0
LATENCY_SAMPLE_DEVICES = 16

log = logging.getLogger(__name__)


# --- options and results ---------------------------------------------------------------------------


@dataclass
class Options:
    devices: int
    procs: int
    window: int
    duration: float
    rate: float
    scenarios: list[str]
    drain_timeout: float
    json_path: Path | None
    profile_pid_file: Path | None
    servers: int = 1
    max_backlog: int = 20_000
    workdir: Path | None = None
    quiet: float = 5.0
    server_env: dict[str, str] = field(default_factory=dict)
    warmup: float = 2.0
    latency_fraction: float = 0.5
    latency_duration: float = 5.0
    service_password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)


@dataclass
class Result:
    scenario: str
    broker: str
    stores: bool
    seconds: float = 0.0  # first publish → last PUBACK
    sent: int = 0
    acked: int = 0
    publish_errors: int = 0
    stored: int = 0  # messages (rows of one key); bare: messages the subscriber received
    readings: int = 0  # rows (Telemetra) — READINGS_PER_MESSAGE per message
    backlog_at_end: int = 0  # acked − stored when publishing stopped
    stored_seconds: float = 0.0  # first publish → last message stored
    steady_s: float = 0.0  # messages stored per second while publishing, after the warm-up
    gate_closed_s: float = 0.0  # full-speed mode: time the publishers were held at the backlog cap
    latency_rate: float = 0.0  # msg/s offered in the latency phase
    latency_acked: int = 0
    latency_stored: int = 0
    latency_samples: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    rss_peak_mb: float = 0.0
    rss_hwm_mb: float = 0.0
    broker_rss_mb: float = 0.0
    commits: int = 0  # group commits of the capacity phase (from /metrics)
    commit_points: float = 0.0  # mean points per commit
    commit_ms: float = 0.0  # mean time to write and commit one batch
    cpu: dict[str, float] = field(default_factory=dict)  # seconds of CPU per component while measured
    note: str = ""

    @property
    def acked_s(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    @property
    def stored_s(self) -> float:
        """Overall: every stored message over first publish → last commit (a drain counts against it)."""
        return self.stored / self.stored_seconds if self.stored_seconds else 0.0

    @property
    def loss(self) -> int:
        return self.acked - self.stored + self.latency_acked - self.latency_stored

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "acked_s": self.acked_s,
            "stored_s": self.stored_s,
            "readings_s": self.steady_s * READINGS_PER_MESSAGE,
            "loss": self.loss,
        }


# --- machine, processes ----------------------------------------------------------------------------


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {len(os.sched_getaffinity(0))} cores (nproc), {model}, Python {platform.python_version()}, "
        f"{platform.platform()}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def proc_status_kb(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU seconds per component between ``start()`` and ``stop()``."""

    def __init__(self, components: dict[str, Callable[[], list[int]]]) -> None:
        self._components = components
        self._before: dict[str, dict[int, float]] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self._components.items()}

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        for name, pids in after.items():
            before = self._before.get(name, {})
            self.used[name] = sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in pids.items())
        return self.used


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"rss-{pid}")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def terminate(process: subprocess.Popen[bytes] | mp.process.BaseProcess, timeout: float = 20) -> None:
    if isinstance(process, subprocess.Popen):
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return
    if process.is_alive():
        process.terminate()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- publishers (child processes) ------------------------------------------------------------------


@dataclass
class PublisherSpec:
    host: str
    port: int
    devices: list[tuple[str, str]]  # (device id, secret)
    window: int
    duration: float
    rate: float  # messages/s for this process; 0 = as fast as the backlog gate allows
    drain_timeout: float
    index: int = 0


@dataclass
class _Dev:
    id: str
    topic: str
    client: mqtt.Client
    connected: bool = False
    refused: str | None = None
    inflight: int = 0
    acked: int = 0
    last_ts: int = 0
    seq: int = 0


def publisher_main(spec: PublisherSpec, conn: Connection, sent_counts: Any, gate: Any) -> None:
    """One process: connect every client, report ready, wait for the start time, publish, report counts.

    ``sent_counts[spec.index]`` publishes this process's count to the parent; without a rate, publishing
    pauses while the parent holds ``gate`` at 0 (the backlog between acked and stored is at its cap)."""
    devs: list[_Dev] = []
    sel = selectors.DefaultSelector()
    last_ack = [0.0]

    def on_connect(_c: mqtt.Client, dev: _Dev, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            dev.refused = str(reason)
        else:
            dev.connected = True

    def on_publish(_c: mqtt.Client, dev: _Dev, _mid: int, _reason: ReasonCode, _p: Any) -> None:
        dev.inflight -= 1
        dev.acked += 1
        last_ack[0] = time.time()

    for device_id, secret in spec.devices:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
            reconnect_on_failure=False,
        )
        dev = _Dev(device_id, f"{PREFIX}/{device_id}/telemetry", client)
        client.user_data_set(dev)
        client.username_pw_set(device_id, secret)
        client.max_inflight_messages_set(spec.window)
        client.max_queued_messages_set(0)
        client.on_connect = on_connect
        client.on_publish = on_publish
        client.connect(spec.host, spec.port, keepalive=60)
        sock = client.socket()
        assert sock is not None
        sel.register(sock, selectors.EVENT_READ, dev)
        devs.append(dev)

    def pump_io(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            key.data.client.loop_read()
        for dev in devs:
            if dev.client.want_write():
                dev.client.loop_write()

    deadline = time.time() + 30
    while not all(d.connected or d.refused for d in devs) and time.time() < deadline:
        pump_io(0.05)
    refused = [f"{d.id}: {d.refused or 'no CONNACK'}" for d in devs if not d.connected]
    conn.send({"ready": not refused, "refused": refused[:5]})
    if refused:
        return
    start_at: float = conn.recv()
    while time.time() < start_at:
        pump_io(min(0.05, max(0.0, start_at - time.time())))

    rng = random.Random(os.getpid())
    window, rate = spec.window, spec.rate
    end = start_at + spec.duration
    cpu0 = time.process_time()
    sent = errors = 0
    misc_at = time.time() + 1
    order = list(range(len(devs)))
    turn = 0
    while True:
        now = time.time()
        if now < end:
            if rate:
                budget = int((now - start_at) * rate) - sent
            else:
                budget = 1 << 30 if gate.value else 0
            # Round-robin start so a tight budget does not favour the first clients.
            turn = (turn + 1) % len(order)
            for i in order[turn:] + order[:turn]:
                if budget <= 0:
                    break
                dev = devs[i]
                while dev.inflight < window and budget > 0:
                    ms = int(time.time() * 1000)
                    dev.last_ts = ts = ms if ms > dev.last_ts else dev.last_ts + 1
                    dev.seq += 1
                    payload = b'{"ts":%d,"temperature":%.1f,"humidity":%.1f,"voltage":%.2f}' % (
                        ts,
                        20 + rng.random() * 5,
                        40 + rng.random() * 20,
                        3.7 + rng.random() * 0.4,
                    )
                    info = dev.client.publish(dev.topic, payload, qos=1)
                    if info.rc == mqtt.MQTT_ERR_SUCCESS:
                        dev.inflight += 1
                        sent += 1
                        budget -= 1
                    else:
                        errors += 1
                        break
        elif not any(d.inflight for d in devs) or now > end + spec.drain_timeout:
            break
        sent_counts[spec.index] = sent
        pump_io(0.001 if now < end else 0.01)
        if now > misc_at:
            misc_at = now + 1
            for dev in devs:
                dev.client.loop_misc()
    cpu = time.process_time() - cpu0
    for dev in devs:
        dev.client.disconnect()
        with contextlib.suppress(Exception):
            dev.client.loop_write()
    conn.send(
        {
            "sent": sent,
            "acked": sum(d.acked for d in devs),
            "errors": errors,
            "last_ack": last_ack[0],
            "cpu": cpu,
            "unacked": sum(d.inflight for d in devs),
        }
    )


class Publishers:
    """``procs`` publisher processes sharing the devices; started together at one wall-clock instant."""

    def __init__(
        self,
        host: str,
        port: int,
        devices: list[tuple[str, str]],
        opts: Options,
        *,
        rate: float | None = None,
        duration: float | None = None,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        n = max(1, min(opts.procs, len(devices)))
        rate = opts.rate if rate is None else rate
        self.duration = opts.duration if duration is None else duration
        self.sent_counts = ctx.Array("q", n, lock=False)
        self.gate = ctx.Value("b", 1, lock=False)
        for i in range(n):
            share = devices[i::n]
            spec = PublisherSpec(
                host,
                port,
                share,
                opts.window,
                self.duration,
                rate * len(share) / len(devices) if rate else 0.0,
                opts.drain_timeout,
                i,
            )
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=publisher_main,
                args=(spec, child, self.sent_counts, self.gate),
                name=f"publisher-{i}",
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)
            self.conns.append(parent)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None and p.is_alive()]

    def sent(self) -> int:
        return int(sum(self.sent_counts))

    def wait_ready(self, timeout: float = 60) -> None:
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError("a publisher did not connect in time")
            msg = conn.recv()
            if not msg["ready"]:
                raise RuntimeError(f"publisher clients refused: {msg['refused']}")

    def start(self, delay: float = 0.3) -> float:
        start_at = time.time() + delay
        for conn in self.conns:
            conn.send(start_at)
        return start_at

    def results(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        for conn in self.conns:
            if not conn.poll(timeout):
                raise RuntimeError("a publisher did not finish in time")
            out.append(conn.recv())
        for proc in self.procs:
            proc.join(5)
        return out

    def stop(self) -> None:
        for proc in self.procs:
            terminate(proc)


class BacklogGate:
    """Full-speed mode: holds the publishers while (sent − stored) ≥ ``cap`` messages, so they offer what
    the system sustains plus a bounded queue — instead of piling up a backlog in the broker (and spending
    CPU the server needs) that then has to drain. ``stored`` may be an estimate; checked every 5 ms."""

    def __init__(self, pubs: Publishers, stored: Callable[[], float], cap: int) -> None:
        self._pubs = pubs
        self._stored = stored
        self._cap = cap
        self.closed_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="backlog-gate")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            open_ = self._pubs.sent() - self._stored() < self._cap
            self._pubs.gate.value = 1 if open_ else 0
            if not open_:
                self.closed_s += 0.005

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pubs.gate.value = 1


# --- subscriber for the bare scenarios (child process) ---------------------------------------------


def subscriber_main(
    host: str, port: int, username: str | None, password: str | None, mqtt5: bool, conn: Connection, shared_count: Any
) -> None:
    """Count QoS 1 messages on telemetra/+/telemetry (live in ``shared_count``); report (count, time of the
    last one) on request."""
    count = 0
    last = 0.0
    subscribed = threading.Event()
    if mqtt5:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-sub-{os.getpid()}", protocol=mqtt.MQTTv5)
    else:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bare-sub-{os.getpid()}", protocol=mqtt.MQTTv311, clean_session=True
        )
    if username:
        client.username_pw_set(username, password)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        c.subscribe(f"{PREFIX}/+/telemetry", qos=1)

    def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, _rcs: Any, _p: Any) -> None:
        subscribed.set()

    def on_message(_c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        nonlocal count, last
        count += 1
        last = time.time()
        shared_count.value = count

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=60)
    client.loop_start()
    conn.send({"ready": subscribed.wait(20)})
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        conn.send({"count": count, "last": last, "cpu": time.process_time()})
    client.disconnect()
    client.loop_stop()


class Subscriber:
    def __init__(self, host: str, port: int, username: str | None, password: str | None, *, mqtt5: bool) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.count = ctx.Value("q", 0, lock=False)
        self.proc = ctx.Process(
            target=subscriber_main,
            args=(host, port, username, password, mqtt5, child, self.count),
            daemon=True,
            name="bare-subscriber",
        )
        self.proc.start()
        if not self.conn.poll(30) or not self.conn.recv()["ready"]:
            raise RuntimeError("the baseline subscriber could not subscribe")

    def read(self) -> tuple[int, float]:
        self.conn.send("read")
        msg = self.conn.recv()
        return int(msg["count"]), float(msg["last"])

    def stop(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send("stop")
        self.proc.join(5)
        terminate(self.proc)


# --- PostgreSQL --------------------------------------------------------------------------------------


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A fresh database (created and dropped through asyncpg); yields its asyncpg DSN."""
    name = f"{prefix}_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def pg_version() -> str:
    async def run() -> str:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    return asyncio.run(run())


class StoreWatcher:
    """Polls the telemetry table from a thread of its own.

    Latency: every ``LATENCY_POLL_S`` it fetches the sample devices' new ``temperature`` rows; a row's
    latency is (the poll that first saw it) − (its ``ts``, which the publisher set to the publish time),
    so it includes up to one poll interval of observation delay. Count: every ``count_interval`` the
    number of stored messages, to find when the last one was committed.
    """

    def __init__(self, dsn: str, sample: list[str]) -> None:
        self.dsn = dsn
        self.sample = sample
        self.latencies: list[float] = []
        self.sample_rows = 0  # rows of the sample devices seen so far (× devices/samples ≈ all stored)
        self.count_interval = COUNT_POLL_LOADED_S
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._measure_latency = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True, name="store-watch")

    def start(self) -> None:
        self._measure_latency.set()
        self._thread.start()

    def stop_latency(self) -> None:
        self._measure_latency.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def latest(self) -> tuple[float, int]:
        return self.timeline[-1] if self.timeline else (time.time(), 0)

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            last = {d: int(time.time() * 1000) for d in self.sample}
            next_count = 0.0
            while not self._stop.is_set():
                now = time.time()
                if self._measure_latency.is_set():
                    rows = await conn.fetch(
                        "SELECT device_id, ts FROM telemetry WHERE key = 'temperature' "
                        "AND device_id = ANY($1::text[]) AND ts > $2",
                        self.sample,
                        min(last.values()),
                    )
                    seen = time.time() * 1000
                    for row in rows:
                        if row["ts"] > last[row["device_id"]]:
                            self.latencies.append(seen - row["ts"])
                            self.sample_rows += 1
                    for row in rows:
                        last[row["device_id"]] = max(last[row["device_id"]], row["ts"])
                if now >= next_count:
                    next_count = now + self.count_interval
                    n = await conn.fetchval("SELECT count(*) FROM telemetry WHERE key = 'temperature'")
                    self.timeline.append((time.time(), int(n)))
                await asyncio.sleep(LATENCY_POLL_S)
        finally:
            await conn.close()


def settle(read: Callable[[], int], expected: int, timeout: float, quiet_s: float = 5.0) -> int:
    """The stored count once it reaches ``expected``, stops growing for ``quiet_s``, or ``timeout`` passes."""
    t0 = changed = time.monotonic()
    count = read()
    while count < expected and time.monotonic() - changed < quiet_s and time.monotonic() - t0 < timeout:
        time.sleep(COUNT_POLL_S)
        now = read()
        if now != count:
            count, changed = now, time.monotonic()
    return count


# --- Mosquitto and dynamic security ------------------------------------------------------------------


def mosquitto_version(binary: str) -> str:
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, check=False).stdout
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version", "").strip() or "unknown"


async def dynsec_provision(
    host: str, port: int, admin_user: str, admin_password: str, service_password: str, devices: list[tuple[str, str]]
) -> None:
    """For the bare scenario: the service account and device clients, as Telemetra would create them."""
    from telemetra.mqtt.dynsec import DynsecProvisioner

    roots = (f"{PREFIX}/{{device}}/",)
    downlink = (f"{PREFIX}/{{device}}/cmd", f"{PREFIX}/{{device}}/config")
    async with DynsecProvisioner(
        host=host, port=port, username=admin_user, password=admin_password, device_roots=roots, downlink=downlink
    ) as prov:
        await prov.ensure_service_account(SERVICE_USER, service_password)
        for device_id, secret in devices:
            await prov.upsert_device(device_id, secret)


# --- Telemetra ---------------------------------------------------------------------------------------


@dataclass
class Telemetra:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    admin_key: str
    mqtt_port: int


@contextmanager
def telemetra(
    workdir: Path, name: str, env_extra: dict[str, str], mqtt_port: int, user_env: dict[str, str]
) -> Iterator[Telemetra]:
    port = free_port()
    admin_key = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    # JSON logs as in deploy/compose.prod.yaml (the console renderer draws rich tracebacks on the event loop).
    env |= {
        "TELEMETRA_ADMIN_KEYS": admin_key,
        "TELEMETRA_LOG_LEVEL": "WARNING",
        "TELEMETRA_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    env |= env_extra | user_env
    log_path = workdir / f"telemetra-{name}.log"
    cmd = [
        str(VENV_BIN / "telemetra"),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(workdir / f"data-{name}"),
    ]
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Telemetra(process, f"http://127.0.0.1:{port}", log_path, admin_key, mqtt_port)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"telemetra exited ({process.returncode}):\n{tail(log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"{server.url}/health", timeout=2)
                if resp.status_code == 200 and resp.json()["checks"]["mqtt"]["status"] == "ok":
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"telemetra not healthy in 60 s:\n{tail(log_path)}")
            time.sleep(0.2)
        yield server
    finally:
        terminate(process)


def scrape_commits(servers: list[Telemetra]) -> tuple[float, float, float]:
    """(commits, points, seconds in commits) summed over the servers' /metrics."""
    totals = {
        "telemetra_batch_points_count": 0.0,
        "telemetra_batch_points_sum": 0.0,
        "telemetra_batch_seconds_sum": 0.0,
    }
    for server in servers:
        with contextlib.suppress(httpx.HTTPError):
            text = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": server.admin_key}, timeout=5).text
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in totals:
                    totals[name] += float(value)
    return (
        totals["telemetra_batch_points_count"],
        totals["telemetra_batch_points_sum"],
        totals["telemetra_batch_seconds_sum"],
    )


def provision(server: Telemetra, ids: list[str]) -> list[tuple[str, str]]:
    """Devices over the admin API (with an external broker, Telemetra mirrors each into dynsec first)."""
    out = []
    with httpx.Client(base_url=server.url, headers={"X-API-Key": server.admin_key}, timeout=30) as http:
        for device_id in ids:
            resp = http.post("/api/v1/devices", json={"id": device_id, "model": "bench"})
            resp.raise_for_status()
            out.append((device_id, resp.json()["credentials"]["api_key"]))
    return out


# --- scenarios ---------------------------------------------------------------------------------------


def sample_ids(ids: list[str], procs: int, k: int) -> list[str]:
    """``k`` devices spread over the list and over the publisher processes (device j is in process j % procs)."""
    n = max(1, min(procs, len(ids)))
    out: list[str] = []
    for i in range(min(k, len(ids))):
        j = i * len(ids) // min(k, len(ids))
        j = min(len(ids) - 1, j + (i - j) % n)
        if ids[j] not in out:
            out.append(ids[j])
    return out


def finish_publish(result: Result, start_at: float, outcomes: list[dict[str, Any]]) -> float:
    result.sent = sum(o["sent"] for o in outcomes)
    result.acked = sum(o["acked"] for o in outcomes)
    result.publish_errors = sum(o["errors"] for o in outcomes) + sum(o["unacked"] for o in outcomes)
    last_ack = max((o["last_ack"] for o in outcomes), default=start_at)
    result.seconds = max(1e-9, last_ack - start_at)
    result.cpu["publishers"] = sum(o["cpu"] for o in outcomes)
    return last_ack


def percentiles(result: Result, values: list[float]) -> None:
    result.latency_samples = len(values)
    if len(values) >= 2:
        q = statistics.quantiles(values, n=100, method="inclusive")
        result.p50_ms, result.p99_ms, result.max_ms = q[49], q[98], max(values)


class CountTimeline:
    """(time, count) every 0.1 s from a cheap counter (the bare subscriber's shared count)."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read = read
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="count-timeline")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.points.append((time.time(), self.read()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def steady_rate(points: list[tuple[float, int]], start: float, end: float) -> float:
    """Messages/s stored between ``start`` and ``end`` from a (time, count) timeline."""
    inside = [(t, n) for t, n in points if start <= t <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return 0.0
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0)


def run_bare(
    result: Result,
    host: str,
    port: int,
    devices: list[tuple[str, str]],
    opts: Options,
    sub_auth: tuple[str | None, str | None],
    broker_pids: Callable[[], list[int]],
    *,
    mqtt5: bool,
) -> Result:
    sub = Subscriber(host, port, *sub_auth, mqtt5=mqtt5)
    pubs = Publishers(host, port, devices, opts)
    timeline = CountTimeline(lambda: int(sub.count.value))
    try:
        pubs.wait_ready()
        meter = CpuMeter({"broker": broker_pids, "subscriber": lambda: [sub.proc.pid or 0]})
        meter.start()
        gate = None if opts.rate else BacklogGate(pubs, lambda: float(sub.count.value), opts.max_backlog)
        start_at = pubs.start()
        outcomes = pubs.results(opts.duration + opts.drain_timeout + 60)
        if gate is not None:
            gate.stop()
            result.gate_closed_s = gate.closed_s
        last_ack = finish_publish(result, start_at, outcomes)
        result.backlog_at_end = result.acked - sub.read()[0]
        count = settle(lambda: sub.read()[0], result.acked, opts.drain_timeout, quiet_s=2.0)
        result.cpu |= meter.stop()
        result.stored = count
        # The subscriber's clock of its last message is exact; publishing time is the floor.
        result.stored_seconds = max(last_ack, sub.read()[1]) - start_at
        result.steady_s = steady_rate(timeline.points, start_at + opts.warmup, start_at + opts.duration)
    finally:
        timeline.stop()
        pubs.stop()
        sub.stop()
    return result


def run_telemetra(
    result: Result,
    servers: list[Telemetra],
    dsn: str,
    devices: list[tuple[str, str]],
    opts: Options,
    broker_pids: Callable[[], list[int]],
) -> Result:
    """Capacity phase (full speed behind the backlog gate, or --rate), then, at full speed, a latency phase
    at a fraction of the capacity found: latency under saturation only measures the queue."""
    ids = [d for d, _ in devices]
    watcher = StoreWatcher(dsn, sample_ids(ids, opts.procs, LATENCY_SAMPLE_DEVICES))
    samplers = [RssSampler(s.process.pid) for s in servers]
    port = servers[0].mqtt_port
    try:
        pubs = Publishers("127.0.0.1", port, devices, opts)
        try:
            pubs.wait_ready()
            meter = CpuMeter(
                {
                    "telemetra": lambda: [s.process.pid for s in servers],
                    "postgres": lambda: pids_named("postgres"),
                    "broker": broker_pids,
                }
            )
            watcher.start()
            meter.start()
            if opts.profile_pid_file:
                opts.profile_pid_file.write_text(" ".join(str(s.process.pid) for s in servers))
            before = scrape_commits(servers)
            scale = len(ids) / len(watcher.sample)
            gate = None if opts.rate else BacklogGate(pubs, lambda: watcher.sample_rows * scale, opts.max_backlog)
            start_at = pubs.start()
            outcomes = pubs.results(opts.duration + opts.drain_timeout + 60)
            if gate is not None:
                gate.stop()
                result.gate_closed_s = gate.closed_s
        finally:
            pubs.stop()
        last_ack = finish_publish(result, start_at, outcomes)
        watcher.count_interval = COUNT_POLL_S
        time.sleep(COUNT_POLL_S * 2)
        result.backlog_at_end = result.acked - watcher.latest()[1]
        count = settle(lambda: watcher.latest()[1], result.acked, opts.drain_timeout, quiet_s=opts.quiet)
        result.cpu |= meter.stop()
        after = scrape_commits(servers)
        commits, points, seconds = (a - b for a, b in zip(after, before, strict=True))
        result.commits = int(commits)
        if commits:
            result.commit_points, result.commit_ms = points / commits, seconds / commits * 1000
        result.stored = count
        if count < result.acked:
            for server in servers:
                print(
                    f"  stored {count:,} of {result.acked:,} acked; {server.log.name} (last lines):\n"
                    + tail(server.log, 25),
                    flush=True,
                )
        # When the last message was committed: the first count poll that saw the final count.
        done_at = next((t for t, n in watcher.timeline if n >= count), time.time())
        result.stored_seconds = max(last_ack, done_at) - start_at
        result.steady_s = steady_rate(watcher.timeline, start_at + opts.warmup, start_at + opts.duration)
        first_latency = 0
        if not opts.rate and opts.latency_duration > 0 and result.steady_s > 0:
            # Latency phase: open loop at a fraction of the steady rate just measured.
            result.latency_rate = round(result.steady_s * opts.latency_fraction, -1) or 10.0
            pubs = Publishers(
                "127.0.0.1", port, devices, opts, rate=result.latency_rate, duration=opts.latency_duration
            )
            try:
                pubs.wait_ready()
                first_latency = len(watcher.latencies)
                watcher.count_interval = COUNT_POLL_LOADED_S
                pubs.start()
                outcomes = pubs.results(opts.latency_duration + opts.drain_timeout + 60)
            finally:
                pubs.stop()
            watcher.count_interval = COUNT_POLL_S
            result.latency_acked = sum(o["acked"] for o in outcomes)
            target = count + result.latency_acked
            result.latency_stored = (
                settle(lambda: watcher.latest()[1], target, opts.drain_timeout, quiet_s=opts.quiet) - count
            )
        watcher.stop_latency()
        percentiles(result, watcher.latencies[first_latency:])
    finally:
        watcher.stop()
        for sampler in samplers:
            sampler.stop()

    async def rows() -> int:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM telemetry"))
        finally:
            await conn.close()

    result.readings = asyncio.run(rows())
    # Several servers: the sum of their peaks (an upper bound of the simultaneous total).
    result.rss_peak_mb = sum(s.peak_kb for s in samplers) / 1024
    result.rss_hwm_mb = sum(proc_status_kb(s.process.pid, "VmHWM") for s in servers) / 1024
    return result


def scenario_bare_mosquitto(mosq: Any, opts: Options) -> Result:
    result = Result("bare", "mosquitto", stores=False, note="paho → Mosquitto → paho subscriber, nothing stored")
    devices = [(f"bare-{i:03d}", secrets.token_urlsafe(16)) for i in range(opts.devices)]
    service_password = opts.service_password
    asyncio.run(
        dynsec_provision(mosq.host, mosq.port, mosq.admin_username, mosq.admin_password, service_password, devices)
    )
    run_bare(
        result,
        mosq.host,
        mosq.port,
        devices,
        opts,
        (SERVICE_USER, service_password),
        lambda: [mosq.process.pid],
        mqtt5=True,
    )
    result.broker_rss_mb = proc_status_kb(mosq.process.pid, "VmRSS") / 1024
    return result


def scenario_telemetra_mosquitto(mosq: Any, opts: Options, workdir: Path) -> Result:
    label = "telemetra" if opts.servers == 1 else f"telemetra×{opts.servers}"
    note = "external Mosquitto (dynsec), PostgreSQL"
    if opts.servers > 1:
        note += f"; {opts.servers} Telemetra processes sharing $share/telemetra/… (RSS and CPU summed)"
    result = Result(label, "mosquitto", stores=True, note=note)
    service_password = opts.service_password
    with pg_database("telemetra_mqtt_bench") as dsn:
        env = {
            "TELEMETRA_DATABASE_URL": dsn,
            "TELEMETRA_MQTT_URL": f"mqtt://{SERVICE_USER}:{service_password}@{mosq.host}:{mosq.port}",
            "TELEMETRA_MQTT_DYNSEC_USERNAME": mosq.admin_username,
            "TELEMETRA_MQTT_DYNSEC_PASSWORD": mosq.admin_password,
        }
        with contextlib.ExitStack() as stack:
            servers = [
                stack.enter_context(telemetra(workdir, f"mosquitto-{i}", env, mosq.port, opts.server_env))
                for i in range(opts.servers)
            ]
            devices = provision(servers[0], [f"bench-{i:03d}" for i in range(opts.devices)])
            run_telemetra(result, servers, dsn, devices, opts, lambda: [mosq.process.pid])
    result.broker_rss_mb = proc_status_kb(mosq.process.pid, "VmRSS") / 1024
    return result


def scenario_telemetra_embedded(opts: Options, workdir: Path) -> Result:
    result = Result("telemetra", "embedded", stores=True, note="embedded amqtt broker (MQTT 3.1.1), PostgreSQL")
    mqtt_port = free_port()
    with pg_database("telemetra_mqtt_bench") as dsn:
        env = {"TELEMETRA_DATABASE_URL": dsn, "TELEMETRA_MQTT_PORT": str(mqtt_port), "TELEMETRA_MQTT_HOST": "127.0.0.1"}
        with telemetra(workdir, "embedded", env, mqtt_port, opts.server_env) as server:
            devices = provision(server, [f"bench-{i:03d}" for i in range(opts.devices)])
            run_telemetra(result, [server], dsn, devices, opts, lambda: [])  # the broker is Telemetra's own
    return result


AMQTT_BROKER = r"""
import asyncio, logging, sys
from amqtt.broker import Broker
from amqtt.contexts import BrokerConfig, ListenerConfig, ListenerType

async def main(port):
    logging.getLogger("amqtt").setLevel(logging.WARNING)
    config = BrokerConfig(
        listeners={"default": ListenerConfig(type=ListenerType.TCP, bind=f"127.0.0.1:{port}")},
        plugins={"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    )
    broker = Broker(config)
    await broker.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


def scenario_bare_amqtt(opts: Options, workdir: Path) -> Result:
    result = Result(
        "bare",
        "amqtt",
        stores=False,
        note="paho → amqtt (amqtt's Broker alone, anonymous, all allowed) → paho subscriber",
    )
    port = free_port()
    log_path = workdir / "amqtt.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", AMQTT_BROKER, str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "ready" not in log_path.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"amqtt broker did not start:\n{tail(log_path)}")
            time.sleep(0.1)
        devices = [(f"bare-{i:03d}", "x") for i in range(opts.devices)]
        run_bare(result, "127.0.0.1", port, devices, opts, ("svc", "x"), lambda: [process.pid], mqtt5=False)
        result.broker_rss_mb = proc_status_kb(process.pid, "VmRSS") / 1024
    finally:
        terminate(process)
    return result


# --- report ------------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    header = (
        f"{'scenario':<22} {'acked/s':>8} {'stored/s':>8} {'overall/s':>9} {'readings/s':>10} {'loss':>5} "
        f"{'backlog':>7} {'p50 ms':>7} {'p99 ms':>7} {'@ msg/s':>7} {'RSS MB':>8}  CPU s (component)"
    )
    print()
    print(header)
    print("-" * (len(header) + 30))
    for r in results:
        name = f"{r.scenario} {r.broker}"
        readings = f"{r.steady_s * READINGS_PER_MESSAGE:,.0f}" if r.stores else "-"
        if r.latency_samples:
            lat = f"{r.p50_ms:>7.0f} {r.p99_ms:>7.0f} {r.latency_rate or r.acked_s:>7,.0f}"
        else:
            lat = f"{'-':>7} {'-':>7} {'-':>7}"
        rss = f"{r.rss_peak_mb:.0f}" if r.stores else f"b:{r.broker_rss_mb:.0f}"
        cpu = " ".join(f"{k} {v:.1f}" for k, v in r.cpu.items())
        print(
            f"{name:<22} {r.acked_s:>8,.0f} {r.steady_s:>8,.0f} {r.stored_s:>9,.0f} {readings:>10} {r.loss:>5} "
            f"{r.backlog_at_end:>7,} {lat} {rss:>8}  {cpu}"
        )
    print()
    for r in results:
        what = "received" if not r.stores else "stored"
        extra = ""
        if r.stores:
            extra = (
                f"; rows {r.readings:,} (= {r.readings / max(1, r.stored + r.latency_stored):.2f}/msg)"
                f"; server RSS peak {r.rss_peak_mb:.0f} MB, VmHWM {r.rss_hwm_mb:.0f} MB"
            )
        if r.broker_rss_mb:
            extra += f"; broker RSS {r.broker_rss_mb:.0f} MB"
        if r.commits:
            extra += f"; {r.commits:,} commits, {r.commit_points:,.0f} points and {r.commit_ms:.1f} ms each (/metrics)"
        if r.gate_closed_s:
            extra += f"; publishers held at the backlog cap {r.gate_closed_s:.1f} s"
        if r.latency_rate:
            extra += (
                f"; latency phase at {r.latency_rate:,.0f} msg/s: acked {r.latency_acked:,}, {what} "
                f"{r.latency_stored:,}, {r.latency_samples:,} samples"
            )
        print(
            f"  {r.scenario} {r.broker}: sent {r.sent:,}, acked {r.acked:,} in {r.seconds:.1f} s, {what} "
            f"{r.stored:,} by {r.stored_seconds:.1f} s, publish errors {r.publish_errors}{extra}. {r.note}"
        )


def find(results: list[Result], scenario: str, broker: str) -> Result | None:
    return next((r for r in results if (r.scenario, r.broker) == (scenario, broker)), None)


def verdicts(results: list[Result]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    bare = find(results, "bare", "mosquitto")
    bare_amqtt = find(results, "bare", "amqtt")
    for r in results:
        if not r.stores:
            continue
        target = TARGET_EMBEDDED_MSGS_S if r.broker == "embedded" else TARGET_MSGS_S
        ok = r.steady_s >= target and r.loss == 0
        rows.append(
            (
                f"{r.scenario} {r.broker}: stored msg/s, loss",
                f"{r.steady_s:,.0f} msg/s, loss {r.loss} (target ≥ {target:,}, 0)",
                ok,
            )
        )
        base = bare if r.broker == "mosquitto" else bare_amqtt
        if base and base.steady_s:
            rows.append((f"{r.scenario} {r.broker} ÷ bare {base.broker}", f"{r.steady_s / base.steady_s:.2f}", None))
    if bare and bare_amqtt and bare.steady_s:
        rows.append(("bare amqtt ÷ bare mosquitto", f"{bare_amqtt.steady_s / bare.steady_s:.2f}", None))
    return rows


def print_verdicts(results: list[Result]) -> None:
    print("\n== targets and ratios (stored/s while publishing) ==")
    for label, value, met in verdicts(results):
        status = "info" if met is None else ("PASS" if met else "MISS")
        print(f"{label:<46} {value:<50} {status}")


METHOD = (
    "method: acked/s = PUBACKs the publishers got ÷ (first publish → last PUBACK). stored/s = messages stored "
    "per second while publishing, after a warm-up (the count of telemetry rows of key 'temperature' every "
    "1 s; bare: the subscriber's count every 0.1 s); overall/s = all stored ÷ (first publish → last commit), "
    "so a backlog drained after the publishers stop counts against it. loss = acked − stored once the count "
    "settles; backlog = acked − stored when publishing stopped. Full speed: the publishers pause while "
    "sent − stored reaches --max-backlog (stored estimated every 5 ms from the sample devices' rows, or the "
    "subscriber's count), so what is measured is the rate the system sustains with a bounded queue, with the "
    "load generator on the same 2 cores; --rate R offers R msg/s open-loop instead. Latency: ts = publish time "
    "(ms); every 20 ms the bench reads the new rows of "
    f"{LATENCY_SAMPLE_DEVICES} sample devices; latency = the poll that first sees a row − its ts (so it includes "
    "≤ 20 ms of polling), measured in a second phase offering --latency-fraction of the stored/s found "
    "(column '@ msg/s'), since at saturation latency only measures the queue. RSS = Telemetra's peak VmRSS "
    "(0.2 s samples); CPU = seconds used per component over the capacity phase (2 cores = 2 s per wall second)."
)


# --- main --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100, help="simulated devices, one MQTT client each (100)")
    p.add_argument("--procs", type=int, default=2, help="publisher processes (2)")
    p.add_argument("--window", type=int, default=20, help="unacknowledged QoS 1 messages per client (20)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of publishing per scenario (15)")
    p.add_argument("--rate", type=float, default=0.0, help="total messages/s to offer; 0 = full speed (0)")
    p.add_argument(
        "--scenarios",
        default="bare,mosquitto,embedded,bare-amqtt",
        help="comma list of bare, mosquitto, embedded, bare-amqtt",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=45.0,
        help="seconds to wait for the stored count to catch up after publishing (45)",
    )
    p.add_argument(
        "--max-backlog",
        type=int,
        default=20_000,
        help="full speed: hold the publishers while sent − stored reaches this many messages (20000)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds excluded from stored/s at the start (2)")
    p.add_argument(
        "--latency-fraction",
        type=float,
        default=0.5,
        help="latency phase: offer this fraction of the stored/s found (0.5)",
    )
    p.add_argument("--latency-duration", type=float, default=5.0, help="latency phase seconds; 0 = none (5)")
    p.add_argument(
        "--servers",
        type=int,
        default=1,
        help="Telemetra processes in the mosquitto scenario, sharing the subscription (1)",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the Telemetra processes, e.g. TELEMETRA_LOG_FORMAT=json (repeatable)",
    )
    p.add_argument(
        "--quiet",
        type=float,
        default=5.0,
        help="after publishing, a stored count that has not grown for this many seconds is final (5)",
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep logs and broker files here instead of a temporary directory"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--profile-pid-file",
        type=Path,
        default=None,
        help="write the Telemetra PID here when publishing starts (to attach py-spy)",
    )
    a = p.parse_args(argv)
    scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    if unknown := sorted(set(scenarios) - {"bare", "mosquitto", "embedded", "bare-amqtt"}):
        p.error(f"unknown scenario(s) {unknown}")
    if a.devices < 1 or a.procs < 1 or a.window < 1:
        p.error("--devices, --procs and --window must be at least 1")
    return Options(
        a.devices,
        a.procs,
        a.window,
        a.duration,
        a.rate,
        scenarios,
        a.drain_timeout,
        a.json,
        a.profile_pid_file,
        max(1, a.servers),
        max(100, a.max_backlog),
        a.workdir,
        a.quiet,
        dict(kv.split("=", 1) for kv in a.server_env if "=" in kv),
        a.warmup,
        a.latency_fraction,
        a.latency_duration,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    from tests.support.mosquitto import find_dynsec_plugin, find_mosquitto, start_mosquitto

    binary = find_mosquitto()
    needs_mosquitto = {"bare", "mosquitto"} & set(opts.scenarios)
    if needs_mosquitto and (binary is None or find_dynsec_plugin() is None):
        sys.exit("mosquitto with its dynamic-security plugin is needed: sudo apt-get install -y mosquitto")
    print(machine_line())
    print(
        f"postgres {pg_version()} at {PG_ADMIN_URL.split('@')[-1]}; mosquitto "
        f"{mosquitto_version(binary) if binary else 'n/a'} (max_queued_messages 1000000, set_tcp_nodelay true, "
        "dynamic security)"
    )
    offered = (
        f"{opts.rate:,.0f} msg/s offered"
        if opts.rate
        else f"full speed (publishers held while sent − stored ≥ {opts.max_backlog:,} messages)"
    )
    print(
        f"load: {opts.devices} devices (one paho client each, MQTT 3.1.1, QoS 1, ≤{opts.window} in flight per "
        f"client) in {opts.procs} publisher processes, {offered}, {opts.duration:g} s per scenario; "
        f"{READINGS_PER_MESSAGE} readings per message",
        flush=True,
    )
    extra_env = " ".join(f"{k}={v}" for k, v in opts.server_env.items())
    print(
        "telemetra: `telemetra serve`, PostgreSQL, TELEMETRA_LOG_LEVEL=WARNING TELEMETRA_LOG_FORMAT=json"
        + (f" {extra_env}" if extra_env else "")
        + ", defaults otherwise",
        flush=True,
    )
    results: list[Result] = []
    started = time.monotonic()
    with contextlib.ExitStack() as keep:
        if opts.workdir is not None:
            workdir = opts.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="telemetra-mqtt-bench-")))
        mosq = start_mosquitto(workdir / "mosquitto", dynsec=True) if needs_mosquitto else None
        try:
            for scenario in opts.scenarios:
                print(f"[{time.monotonic() - started:5.1f} s] {scenario}: running", flush=True)
                try:
                    if scenario == "bare":
                        results.append(scenario_bare_mosquitto(mosq, opts))
                    elif scenario == "mosquitto":
                        results.append(scenario_telemetra_mosquitto(mosq, opts, workdir))
                    elif scenario == "embedded":
                        results.append(scenario_telemetra_embedded(opts, workdir))
                    else:
                        results.append(scenario_bare_amqtt(opts, workdir))
                except Exception as exc:
                    print(f"  {scenario} failed: {exc}", flush=True)
                    if mosq is not None:
                        print(f"  mosquitto log:\n{tail(mosq.log_path, 15)}")
        finally:
            if mosq is not None:
                mosq.stop()
    print(f"[{time.monotonic() - started:5.1f} s] done")
    print_table(results)
    print_verdicts(results)
    print("\n" + METHOD)
    if opts.json_path:
        shown = {k: str(v) for k, v in asdict(opts).items() if k != "service_password"}
        payload = {
            "machine": machine_line(),
            "options": shown,
            "results": [r.as_dict() for r in results],
            "verdicts": [{"label": v[0], "value": v[1], "met": v[2]} for v in verdicts(results)],
            "method": METHOD,
        }
        opts.json_path.write_text(json.dumps(payload, indent=2))
        print(f"results written to {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
