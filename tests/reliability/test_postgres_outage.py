"""A PostgreSQL outage under HTTP and MQTT load: 503 with Retry-After while it lasts, nothing lost after.

The cluster is the test's own (initdb/pg_ctl on a free port, tests/support/pg_cluster.py), so it can be
stopped as a crash would stop it (``pg_ctl -m immediate``) without touching the shared server. Telemetra
is a real ``telemetra serve`` subprocess on it, with its embedded MQTT broker. Under load — HTTP devices
posting numbered readings one after another, and a paho fleet publishing QoS 1 numbered messages — the
cluster goes away for longer than the credential cache keeps an entry (fresh 5 s, stale twice that,
±20 %), then comes back. Then:

- every HTTP request was answered 2xx (acknowledged) or 503 with ``Retry-After``, never anything else; a
  503 is retried with the same reading, as a device does;
- known devices kept being recognised past the cache's stale time (their 503 says storage, not the
  registry, and an MQTT device reconnecting then is let in); an unknown key is 503, not 401 or 500;
- ingest resumed by itself once the cluster was back: /health healthy, both streams completed;
- every acknowledged reading (HTTP 2xx, MQTT PUBACK) is stored exactly once: lost = 0, duplicated = 0;
- the server's log says "unreachable" once and "reachable again" once, not a line per failed message.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqtt.conftest import TelemetraProcess, create_device_over_http
from tests.reliability.fleet import Fleet, count, stored_by_device
from tests.support.mosquitto import free_port
from tests.support.pg_cluster import PostgresCluster, start_cluster

pytestmark = [pytest.mark.postgres]

HTTP_DEVICES = 4
HTTP_RATE = 40.0  # requests per device and second while the database is up
MQTT_DEVICES = 4
MQTT_RATE = 100.0  # messages per device and second
MQTT_PER_DEVICE = 2_000  # 20 s of stream at that rate: it spans the outage
# Longer than any credential-cache entry lives (2 × 5 s × 1.2): past it only "the last word" is left.
OUTAGE_S = 13.0
RECOVERY_S = 20.0  # ingest's own retry backs off to 5 s at most


@dataclass
class HttpDevice:
    device_id: str
    key: str
    acked: set[int] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    # (monotonic time, status, code, detail) of every answer that was not 2xx
    refusals: list[tuple[float, int, str, str]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # anything that is neither 2xx nor 503 + Retry-After
    last_ok: float = 0.0


class HttpLoad:
    """One thread per device: post ``{"ts", "seq"}``, next seq on 2xx, the same one again on 503."""

    def __init__(self, base_url: str, devices: list[HttpDevice], base_ms: int) -> None:
        self.devices = devices
        self._base_url = base_url
        self._base_ms = base_ms
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d,), daemon=True) for d in devices]
        for thread in self._threads:
            thread.start()

    def _run(self, device: HttpDevice) -> None:
        seq = 0
        interval = 1.0 / HTTP_RATE
        with httpx.Client(base_url=self._base_url, headers={"X-API-Key": device.key}, timeout=30) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                body = b'{"ts":%d,"seq":%d}' % (self._base_ms + seq, seq)
                try:
                    r = client.post("/api/v1/ingest", content=body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError as exc:  # the server is up throughout: no answer is a failure too
                    device.bad.append(f"seq {seq}: no answer ({exc!r})")
                    device.answers["no answer"] += 1
                    continue
                device.answers[str(r.status_code)] += 1
                if 200 <= r.status_code < 300:
                    device.acked.add(seq)
                    device.last_ok = time.monotonic()
                    seq += 1
                else:
                    doc = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                    device.refusals.append(
                        (time.monotonic(), r.status_code, doc.get("code", ""), doc.get("detail", ""))
                    )
                    if r.status_code != 503 or not r.headers.get("retry-after", "").isdigit():
                        device.bad.append(f"seq {seq}: {r.status_code} {r.headers.get('retry-after')!r} {r.text[:200]}")
                # Paced while up; a 503 is retried after the same short pause (sooner than Retry-After asks:
                # a busy fleet, so the server's log is tested against many failed requests).
                self._stop.wait(max(0.0, interval - (time.monotonic() - started)))

    def refused_since(self, moment: float) -> bool:
        return all(d.refusals and d.refusals[-1][0] > moment for d in self.devices)

    def stored_ok_since(self, moment: float) -> bool:
        return all(d.last_ok > moment for d in self.devices)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=40)


def mqtt_connect_rc(port: int, device_id: str, secret: str) -> str:
    """Connect once with a fresh client; the CONNACK's reason, as text ("Success" when let in)."""
    result: list[str] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(3)}", protocol=mqtt.MQTTv311)
    client.username_pw_set(device_id, secret)

    def on_connect(_c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        result.append(str(rc))
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: object, _f: object, rc: mqtt.ReasonCode, _p: object) -> None:
        result.append(f"disconnected: {rc}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError as exc:
        return f"no connection: {exc!r}"
    client.loop_start()
    try:
        done.wait(15)
    finally:
        client.disconnect()
        client.loop_stop()
    return result[0] if result else "no CONNACK"


async def test_postgres_outage_under_load_answers_503_and_loses_nothing(tmp_path: Path) -> None:
    cluster = await asyncio.to_thread(start_cluster)
    try:
        admin = await asyncpg.connect(cluster.admin_url, timeout=10)
        try:
            await admin.execute("CREATE DATABASE telemetra")
        finally:
            await admin.close()
        await asyncio.to_thread(scenario, cluster, tmp_path)
    finally:
        await asyncio.to_thread(cluster.destroy)


def scenario(cluster: PostgresCluster, tmp_path: Path) -> None:
    url = cluster.url("telemetra")
    mqtt_port = free_port()
    telemetra = TelemetraProcess(
        tmp_path / "telemetra",
        port=free_port(),
        env={"TELEMETRA_DATABASE_URL": url, "TELEMETRA_MQTT_PORT": str(mqtt_port)},
    )
    fleet: Fleet | None = None
    http: HttpLoad | None = None
    try:
        telemetra.start()
        telemetra.wait_healthy()
        base_ms = int(time.time() * 1000) - 3_600_000
        http_devices = [
            HttpDevice(f"web-{i}", create_device_over_http(telemetra, f"web-{i}")) for i in range(HTTP_DEVICES)
        ]
        mqtt_credentials = [(f"mq-{i}", create_device_over_http(telemetra, f"mq-{i}")) for i in range(MQTT_DEVICES)]
        probe_secret = create_device_over_http(telemetra, "probe")
        # The probe's credentials are looked up (and cached) once, well before the outage.
        assert mqtt_connect_rc(mqtt_port, "probe", probe_secret) == "Success"

        http = HttpLoad(telemetra.base_url, http_devices, base_ms)
        fleet = Fleet("127.0.0.1", mqtt_port, mqtt_credentials, per_device=MQTT_PER_DEVICE, rate=MQTT_RATE)
        assert fleet.wait_acked(MQTT_DEVICES * 100, timeout=30) >= MQTT_DEVICES * 100, "MQTT did not get going"
        warm = time.monotonic()
        deadline = warm + 30
        while not http.stored_ok_since(warm) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.stored_ok_since(warm), "HTTP did not get going"

        # -- the outage ---------------------------------------------------------------------------------
        cluster.stop("immediate")
        down_at = time.monotonic()
        # Once every HTTP device has been told 503, whatever was committed before the stop has been
        # acknowledged; from then on nothing may be, until the cluster is back.
        deadline = down_at + 10
        while not http.refused_since(down_at) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert http.refused_since(down_at), "HTTP devices were not told 503 after the stop"
        acked_before = fleet.acked, sum(len(d.acked) for d in http_devices)
        stale_past = down_at + OUTAGE_S - 0.5
        unknown_answers: list[tuple[int, str | None, str]] = []
        with httpx.Client(base_url=telemetra.base_url, timeout=30) as probe:
            while time.monotonic() < stale_past:
                r = probe.post(
                    "/api/v1/ingest", json={"seq": 0}, headers={"X-API-Key": "unknown-" + secrets.token_urlsafe(24)}
                )
                unknown_answers.append((r.status_code, r.headers.get("retry-after"), r.json().get("code", "")))
                health = probe.get("/health")
                assert health.status_code == 503, f"/health during the outage: {health.status_code} {health.text}"
                http._stop.wait(1.0)  # pacing of the probe, not a wait for something to happen
        # Past every cache entry's stale time: a known device is still let in over MQTT.
        probe_rc = mqtt_connect_rc(mqtt_port, "probe", probe_secret)
        late_refusals = [r for d in http_devices for r in d.refusals if r[0] > stale_past]
        acked_during = fleet.acked - acked_before[0], sum(len(d.acked) for d in http_devices) - acked_before[1]
        cluster.start()
        up_at = time.monotonic()

        # -- recovery, by itself --------------------------------------------------------------------------
        deadline = up_at + RECOVERY_S
        while not http.stored_ok_since(up_at) and time.monotonic() < deadline:
            time.sleep(0.05)
        recovered_s = max(d.last_ok for d in http_devices) - up_at if http.stored_ok_since(up_at) else None
        assert recovered_s is not None, f"HTTP ingest did not recover within {RECOVERY_S}s"
        assert fleet.wait_acked(fleet.total, timeout=60) == fleet.total, f"MQTT: only {fleet.acked} of {fleet.total}"
        http.close()
        telemetra.wait_healthy(timeout=10)

        # -- the counts -----------------------------------------------------------------------------------
        stored = stored_by_device(url)
        mqtt_count = count(fleet.acked_by_device(), {d.device_id: stored.get(d.device_id, []) for d in fleet.devices})
        http_count = count(
            {d.device_id: d.acked for d in http_devices},
            {d.device_id: stored.get(d.device_id, []) for d in http_devices},
        )
        answers = sum((d.answers for d in http_devices), Counter())
        log_text = (telemetra.workdir / f"{telemetra.name}.1.log").read_text(errors="replace")
        log_lines = [line for line in log_text.splitlines() if line.strip()]
        unreachable = [line for line in log_lines if "database unreachable" in line]
        reachable = [line for line in log_lines if "database reachable again" in line]
        noisy = [line for line in log_lines if "[warning" in line or "[error" in line or "Traceback" in line]
        print(
            f"outage {up_at - down_at:.1f} s; HTTP answers {dict(answers)}; acknowledged during the outage: "
            f"MQTT {acked_during[0]}, HTTP {acked_during[1]}; HTTP recovered {recovered_s:.2f} s after restart\n"
            f"HTTP: {http_count}\nMQTT: {mqtt_count}\nunknown key during the outage: {Counter(unknown_answers)}\n"
            f"MQTT reconnect of a known device past the stale time: {probe_rc}\n"
            f"log: {len(log_lines)} lines, {len(noisy)} warnings/errors:\n" + "\n".join(noisy)
        )

        for device in http_devices:
            assert not device.bad, f"{device.device_id}: {device.bad[:5]}"
        assert answers["503"] > 50, "the outage was not seen by HTTP clients"
        assert acked_during == (0, 0), "something was acknowledged while the database was down"
        assert acked_before[0] < fleet.total, "the MQTT stream was over before the outage"
        # Stale credentials kept serving: past the stale time, known devices' 503s are about storage.
        assert late_refusals, "no HTTP request was answered past the stale time"
        assert all(code == "storage_unavailable" and "registry" not in detail for _, _, code, detail in late_refusals)
        assert probe_rc == "Success", probe_rc
        # Unknown keys cannot be checked: 503 + Retry-After, not 401 and not 500.
        assert unknown_answers and all(s == 503 and ra and ra.isdigit() for s, ra, _ in unknown_answers), (
            unknown_answers
        )
        assert mqtt_count.lost == 0 and mqtt_count.duplicated == 0, mqtt_count
        assert mqtt_count.stored == mqtt_count.acknowledged == fleet.total
        assert http_count.lost == 0 and http_count.duplicated == 0, http_count
        assert http_count.stored == http_count.acknowledged
        # One line per state change, not one per failed message (thousands of them).
        assert len(unreachable) == 1, unreachable
        assert len(reachable) == 1, reachable
        assert "Traceback" not in log_text
        assert len(noisy) <= 6, noisy
    except BaseException:
        print(telemetra.output())
        print("---- postgres ----\n" + cluster.log())
        raise
    finally:
        if http is not None:
            http.close()
        if fleet is not None:
            fleet.close()
        telemetra.kill()
