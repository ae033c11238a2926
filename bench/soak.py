"""Soak: a steady mixed load (HTTP + MQTT QoS 1) for a long time; does Telemetra's memory stay flat?

For each configuration (``--configs``) a real ``telemetra serve`` runs on its own fresh PostgreSQL
database (127.0.0.1:5432, or ``TELEMETRA_BENCH_PG_URL``):

- ``embedded``: devices publish to Telemetra's embedded amqtt broker (acknowledged after commit);
- ``mosquitto``: a private Mosquitto started from deploy/mosquitto/mosquitto.conf as shipped (dynamic
  security, autosave every second; paths and a free port rewritten) with Telemetra's collector.

The load is ``--rate`` messages per second in all (default 1,000 = 50 % of the 2,000 msg/s target),
``--http-share`` of them as single-reading HTTP posts (``POST /api/v1/ingest``, a device key each; a 503
is retried with the same reading, as firmware does) and the rest as MQTT QoS 1 publishes from
``--mqtt-devices`` paho clients (at most ``--window`` unacknowledged each). Every message is
``{"ts": base + seq, "seq": seq, "temperature": …}``, numbered per device, so what was acknowledged (HTTP
2xx, PUBACK) can be compared with what is stored, message by message.

Every ``--sample-s`` seconds (60) it prints, per configuration: the server process's RSS and open file
descriptors (from /proc), the broker's for Mosquitto, what was acknowledged and stored so far and the rate
actually offered. At the end: acknowledged / stored / lost / duplicated per transport, and RSS and
descriptors from the first sample to the last. ``--parallel`` runs the configurations at the same time
(one child process each, so their load generators do not share a GIL); the default runs them one after
the other. Exit status 1 if anything acknowledged was lost or duplicated.

    .venv/bin/python bench/soak.py [--configs embedded,mosquitto] [--duration 1800] [--rate 1000] \\
        [--http-share 0.2] [--mqtt-devices 40] [--http-devices 50] [--sample-s 60] [--parallel]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.support

from tests.conftest import postgres_database  # noqa: E402
from tests.mqtt.conftest import TelemetraProcess, create_device_over_http  # noqa: E402
from tests.support.mosquitto import MosquittoInstance, deploy_mosquitto, free_port  # noqa: E402

PAGE = 1 << 16  # acknowledged-seq bitmaps grow by this many messages


# --- what was acknowledged ---------------------------------------------------------------------------


class Acks:
    """One bit per seq: memory stays flat however long the soak (a set of ints would not)."""

    def __init__(self) -> None:
        self._bits = bytearray(PAGE // 8)
        self.count = 0

    def add(self, seq: int) -> None:
        byte, bit = divmod(seq, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(PAGE // 8, byte - len(self._bits) + 1)))
        if not self._bits[byte] & (1 << bit):
            self._bits[byte] |= 1 << bit
            self.count += 1

    def __contains__(self, seq: int) -> bool:
        byte, bit = divmod(seq, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def seqs(self) -> Iterator[int]:
        for byte, value in enumerate(self._bits):
            if value:
                for bit in range(8):
                    if value & (1 << bit):
                        yield byte * 8 + bit


def body(base_ms: int, seq: int) -> bytes:
    return b'{"ts":%d,"seq":%d,"temperature":%.1f}' % (base_ms + seq, seq, 15 + seq % 150 / 10)


class MqttDevice:
    def __init__(self, host: str, port: int, device_id: str, secret: str, *, window: int, base_ms: int) -> None:
        self.device_id = device_id
        self.base_ms = base_ms
        self.window = window
        self.acks = Acks()
        self.sent = 0
        self._pending: deque[tuple[int, mqtt.MQTTMessageInfo]] = deque()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.username_pw_set(device_id, secret)
        self.client.max_inflight_messages_set(window)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2)
        self.client.connect_async(host, port, keepalive=30)
        self.client.loop_start()

    def poll(self) -> int:
        """Collect PUBACKs (read, not called back: paho's callback runs under the lock publish() takes);
        returns how many are still waiting. PUBACKs come in order, so only the head is looked at (cheap
        enough for the load generator to stay well below the server's CPU); one out of order is only
        counted a little later."""
        pending = self._pending
        while pending and pending[0][1]._published:
            self.acks.add(pending.popleft()[0])
        return len(pending)

    def poll_all(self) -> int:
        """Every waiting message, in any order (the end of the run)."""
        still: deque[tuple[int, mqtt.MQTTMessageInfo]] = deque()
        for seq, info in self._pending:
            if info._published:
                self.acks.add(seq)
            else:
                still.append((seq, info))
        self._pending = still
        return len(still)

    def publish(self) -> None:
        seq = self.sent
        info = self.client.publish(f"telemetra/{self.device_id}/telemetry", body(self.base_ms, seq), qos=1)
        self._pending.append((seq, info))
        self.sent += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def http_main(
    base_url: str,
    creds: list[tuple[str, str]],
    rate: float,
    base_ms: int,
    start_at: float,
    acked: Any,
    stop: Any,
    conn: Connection,
) -> None:
    """The HTTP devices, in a process of their own (their own GIL): one thread per device posting its
    numbered readings at its share of ``rate`` (stdlib http.client: far less CPU per request than an
    HTTP library, so the load generator stays cheaper than the server). A 2xx acknowledges the reading;
    anything else is sent again. At the end, every device's acknowledged seqs go back through ``conn``."""
    url = urlsplit(base_url)
    per_device = rate / max(1, len(creds))
    interval = 1.0 / per_device if per_device > 0 else 1.0
    lock = threading.Lock()
    answers: Counter[str] = Counter()
    late = [0]
    bitmaps: dict[str, Acks] = {d: Acks() for d, _ in creds}

    def post(device_id: str, key: str) -> None:
        acks = bitmaps[device_id]
        headers = {"X-API-Key": key, "Content-Type": "application/json"}
        http = HTTPConnection(url.hostname, url.port, timeout=30)
        seq = sent = 0
        # Spread the devices' first posts over one interval, then keep each to its own schedule.
        begin = start_at + interval * random.random()
        while not stop.is_set():
            delay = begin + sent * interval - time.time()
            if delay > 0:
                stop.wait(delay)
            elif delay < -1.0:
                with lock:
                    late[0] += 1  # over a second behind its schedule (answers slower than the rate)
            try:
                http.request("POST", "/api/v1/ingest", body=body(base_ms, seq), headers=headers)
                response = http.getresponse()
                response.read()
                status = str(response.status)
            except (OSError, HTTPException) as exc:
                http.close()
                http = HTTPConnection(url.hostname, url.port, timeout=30)
                status = type(exc).__name__
            with lock:
                answers[status] += 1
            if status.startswith("2"):
                acks.add(seq)
                seq += 1
                with acked.get_lock():
                    acked.value += 1
            sent += 1
        http.close()

    threads = [threading.Thread(target=post, args=cred, daemon=True) for cred in creds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.send(
        {"acks": {d: (bytes(a._bits), a.count) for d, a in bitmaps.items()}, "answers": dict(answers), "late": late[0]}
    )
    conn.close()


class Load:
    """MQTT devices fed at their share of the rate by one thread; HTTP devices in a process of their own."""

    def __init__(
        self,
        base_url: str,
        mqtt_host: str,
        mqtt_port: int,
        mqtt_creds: list[tuple[str, str]],
        http_creds: list[tuple[str, str]],
        *,
        mqtt_rate: float,
        http_rate: float,
        window: int,
    ) -> None:
        self.base_ms = int(time.time() * 1000) - 7 * 24 * 3_600_000
        self.http_ids = [d for d, _ in http_creds]
        self.http_acks: dict[str, Acks] = {}
        self.http_answers: dict[str, int] = {}
        self.http_late = 0  # HTTP posts sent over a second after their slot (answers slower than the rate)
        self.behind = 0  # MQTT feeder rounds that left a device short for a full window (server slow)
        self.started = time.monotonic()
        # The HTTP process is forked first, before this process has any thread of its own.
        ctx = mp.get_context("fork")
        self._http_acked = ctx.Value("q", 0)
        self._http_stop = ctx.Event()
        self._http_conn, child_conn = ctx.Pipe(duplex=False)
        self._http = ctx.Process(
            target=http_main,
            args=(
                base_url,
                http_creds,
                http_rate,
                self.base_ms,
                time.time(),
                self._http_acked,
                self._http_stop,
                child_conn,
            ),
            name="soak-http",
            daemon=True,
        )
        self._http.start()
        child_conn.close()
        self.mqtt = [MqttDevice(mqtt_host, mqtt_port, d, s, window=window, base_ms=self.base_ms) for d, s in mqtt_creds]
        self._mqtt_rate = mqtt_rate
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._feed_mqtt, daemon=True, name="soak-mqtt")]
        for thread in self._threads:
            thread.start()

    @property
    def mqtt_acked(self) -> int:
        return sum(d.acks.count for d in self.mqtt)

    @property
    def http_acked(self) -> int:
        return int(self._http_acked.value)

    def _feed_mqtt(self) -> None:
        per_device = self._mqtt_rate / max(1, len(self.mqtt))
        while not self._stop.is_set():
            allowed = int((time.monotonic() - self.started) * per_device) + 1
            for device in self.mqtt:
                in_flight = device.poll()
                while device.sent < allowed and in_flight < device.window:
                    device.publish()
                    in_flight += 1
                if device.sent < allowed:
                    self.behind += 1
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop both loads; the HTTP process sends back what it had acknowledged (once)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)
        self._http_stop.set()
        if self._http_conn is not None:
            if self._http_conn.poll(60):
                report = self._http_conn.recv()
                for device_id, (bits, n) in report["acks"].items():
                    acks = Acks()
                    acks._bits, acks.count = bytearray(bits), n
                    self.http_acks[device_id] = acks
                self.http_answers, self.http_late = report["answers"], report["late"]
            self._http_conn.close()
            self._http_conn = None
        self._http.join(timeout=10)
        if self._http.is_alive():
            self._http.kill()

    def wait_mqtt_settled(self, timeout: float) -> int:
        """After stop: wait for the PUBACKs still due; returns how many never came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = sum(d.poll_all() for d in self.mqtt)
            if not left:
                return 0
            time.sleep(0.1)
        return sum(d.poll_all() for d in self.mqtt)

    def close(self) -> None:
        for device in self.mqtt:
            device.close()


# --- the server's resources ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


async def _fetch(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def stored_count(dsn: str) -> int:
    return int(asyncio.run(_fetch(dsn, "SELECT count(*) AS n FROM telemetry WHERE key = 'seq'"))[0]["n"])


def stored_seqs(dsn: str) -> dict[str, list[int]]:
    rows = asyncio.run(_fetch(dsn, "SELECT device_id, value_num FROM telemetry WHERE key = 'seq'"))
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(row["device_id"], []).append(int(row["value_num"]))
    return out


@dataclass
class Sample:
    minute: float
    rss_mb: float
    fds: int
    broker_rss_mb: float
    broker_fds: int
    mqtt_acked: int
    http_acked: int
    stored: int


@dataclass
class Tally:
    acknowledged: int
    stored: int
    lost: int
    duplicated: int

    def __str__(self) -> str:
        return f"acked {self.acknowledged}, stored {self.stored}, lost {self.lost}, duplicated {self.duplicated}"


def tally(acks: dict[str, Acks], stored: dict[str, list[int]]) -> Tally:
    acknowledged = lost = duplicated = n_stored = 0
    for device_id, device_acks in acks.items():
        seqs = stored.get(device_id, [])
        distinct = set(seqs)
        duplicated += len(seqs) - len(distinct)
        n_stored += len(distinct)
        acknowledged += device_acks.count
        lost += sum(1 for seq in device_acks.seqs() if seq not in distinct)
    return Tally(acknowledged, n_stored, lost, duplicated)


# --- one configuration ---------------------------------------------------------------------------------


@contextlib.contextmanager
def broker_for(config: str) -> Iterator[MosquittoInstance | None]:
    if config == "embedded":
        yield None
        return
    if config != "mosquitto":
        raise SystemExit(f"unknown config {config!r} (embedded, mosquitto)")
    with deploy_mosquitto(admin_password=secrets.token_urlsafe(12)) as deploy:
        yield deploy.instance


def say(config: str, text: str) -> None:
    print(f"[{config}] {text}", flush=True)


def run_config(config: str, opts: argparse.Namespace) -> bool:
    """In the main thread (so Ctrl-C or SIGTERM stops the load, the server and drops the database)."""
    loop = asyncio.new_event_loop()
    database = postgres_database()
    url = loop.run_until_complete(database.__aenter__())
    try:
        return soak(config, url, opts)
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()


def soak(config: str, url: str, opts: argparse.Namespace) -> bool:
    dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1)
    with tempfile.TemporaryDirectory(prefix=f"telemetra-soak-{config}-") as tmp, broker_for(config) as broker:
        env = {"TELEMETRA_DATABASE_URL": url, "TELEMETRA_LOG_LEVEL": "WARNING"}
        if broker is None:
            mqtt_host, mqtt_port = "127.0.0.1", free_port()
            env.update(TELEMETRA_MQTT_PORT=str(mqtt_port), TELEMETRA_MQTT_HOST=mqtt_host)
        else:
            mqtt_host, mqtt_port = broker.host, broker.port
            env.update(
                TELEMETRA_MQTT_URL=f"mqtt://telemetra-svc:{secrets.token_urlsafe(18)}@{broker.host}:{broker.port}",
                TELEMETRA_MQTT_DYNSEC_USERNAME=broker.admin_username,
                TELEMETRA_MQTT_DYNSEC_PASSWORD=broker.admin_password,
            )
        server = TelemetraProcess(Path(tmp) / "telemetra", port=free_port(), env=env)
        load: Load | None = None
        try:
            server.start()
            server.wait_healthy(timeout=60)
            assert server.process is not None
            pid = server.process.pid
            mqtt_creds = [
                (f"soak-m{i}", create_device_over_http(server, f"soak-m{i}")) for i in range(opts.mqtt_devices)
            ]
            http_creds = [
                (f"soak-h{i}", create_device_over_http(server, f"soak-h{i}")) for i in range(opts.http_devices)
            ]
            http_rate = opts.rate * opts.http_share
            mqtt_rate = opts.rate - http_rate
            say(
                config,
                f"telemetra pid {pid}; {opts.rate:.0f} msg/s for {opts.duration:.0f} s: MQTT {mqtt_rate:.0f}/s from "
                f"{opts.mqtt_devices} devices (window {opts.window}), HTTP {http_rate:.0f}/s from {opts.http_devices} "
                f"devices; sample every {opts.sample_s:.0f} s",
            )
            say(
                config,
                f"{'min':>5} {'rss_MB':>7} {'fds':>4} {'broker_MB':>9} {'b_fds':>5} "
                f"{'mqtt_acked':>10} {'http_acked':>10} {'stored':>9} {'offered/s':>9} {'stored/s':>8}",
            )
            load = Load(
                server.base_url,
                mqtt_host,
                mqtt_port,
                mqtt_creds,
                http_creds,
                mqtt_rate=mqtt_rate,
                http_rate=http_rate,
                window=opts.window,
            )
            samples: list[Sample] = []
            end = load.started + opts.duration
            next_at = load.started + opts.sample_s
            last_stored, last_t = 0, load.started
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if server.process.poll() is not None:
                    say(config, f"telemetra exited with {server.process.returncode}")
                    print(server.output(), flush=True)
                    return False
                if now < next_at:
                    time.sleep(min(1.0, next_at - now, end - now))
                    continue
                next_at += opts.sample_s
                stored = stored_count(dsn)
                broker_pid = broker.process.pid if broker is not None else None
                sample = Sample(
                    minute=(now - load.started) / 60,
                    rss_mb=rss_mb(pid),
                    fds=open_fds(pid),
                    broker_rss_mb=rss_mb(broker_pid) if broker_pid else 0.0,
                    broker_fds=open_fds(broker_pid) if broker_pid else 0,
                    mqtt_acked=load.mqtt_acked,
                    http_acked=load.http_acked,
                    stored=stored,
                )
                samples.append(sample)
                acked = sample.mqtt_acked + sample.http_acked
                say(
                    config,
                    f"{sample.minute:5.1f} {sample.rss_mb:7.1f} {sample.fds:>4} {sample.broker_rss_mb:9.1f} "
                    f"{sample.broker_fds:>5} {sample.mqtt_acked:>10} {sample.http_acked:>10} {stored:>9} "
                    f"{acked / (now - load.started):9.0f} {(stored - last_stored) / (now - last_t):8.0f}",
                )
                last_stored, last_t = stored, now
            load.stop()
            unacked = load.wait_mqtt_settled(60)
            # The stored count settles once the last acknowledged message is in.
            expected = load.mqtt_acked + load.http_acked
            deadline = time.monotonic() + 60
            while stored_count(dsn) < expected and time.monotonic() < deadline:
                time.sleep(0.5)
            stored = stored_seqs(dsn)
            mqtt_tally = tally({d.device_id: d.acks for d in load.mqtt}, stored)
            http_tally = tally({d: load.http_acks.get(d, Acks()) for d in load.http_ids}, stored)
            say(config, f"MQTT: {mqtt_tally} (still unacknowledged at the end: {unacked})")
            say(config, f"HTTP: {http_tally}; answers {load.http_answers}")
            say(config, f"feeder rounds with an MQTT window full: {load.behind}; HTTP posts late: {load.http_late}")
            if len(samples) >= 2:
                first, last = samples[0], samples[-1]
                growth = last.rss_mb - first.rss_mb
                say(
                    config,
                    f"RSS {first.rss_mb:.1f} MB at {first.minute:.1f} min -> {last.rss_mb:.1f} MB at "
                    f"{last.minute:.1f} min ({growth:+.1f} MB, {growth / first.rss_mb:+.1%}); peak "
                    f"{max(s.rss_mb for s in samples):.1f} MB; fds {first.fds} -> {last.fds} "
                    f"(max {max(s.fds for s in samples)})"
                    + (
                        f"; broker RSS {first.broker_rss_mb:.1f} -> {last.broker_rss_mb:.1f} MB, fds "
                        f"{first.broker_fds} -> {last.broker_fds}"
                        if broker is not None
                        else ""
                    ),
                )
            ok = all(t.lost == 0 and t.duplicated == 0 for t in (mqtt_tally, http_tally))
            say(config, "PASS: nothing acknowledged was lost or duplicated" if ok else "FAIL: loss or duplicates")
            return ok
        except BaseException:
            print(server.output(), flush=True)
            raise
        finally:
            if load is not None:
                load.stop()
                load.close()
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="embedded,mosquitto")
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load per configuration (1800)")
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s in all, HTTP + MQTT (1000)")
    parser.add_argument("--http-share", type=float, default=0.2, help="fraction of --rate sent over HTTP (0.2)")
    parser.add_argument("--mqtt-devices", type=int, default=40)
    parser.add_argument("--http-devices", type=int, default=50, help="one posting thread each (50)")
    parser.add_argument("--window", type=int, default=100, help="unacknowledged QoS 1 messages per MQTT device (100)")
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--parallel", action="store_true", help="run the configurations at the same time")
    opts = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up as on Ctrl-C
    configs = [c for c in opts.configs.split(",") if c]
    print(f"# soak on {platform.node()} ({os.cpu_count()} cores), python {platform.python_version()}", flush=True)
    if opts.parallel and len(configs) > 1:
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--parallel"]
        children = [
            subprocess.Popen([sys.executable, __file__, *passthrough, "--configs", config]) for config in configs
        ]
        try:
            return max(child.wait() for child in children)
        except KeyboardInterrupt:
            for child in children:
                child.send_signal(signal.SIGINT)
            return max(child.wait() for child in children)
    ok = True
    for config in configs:
        ok &= run_config(config, opts)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
