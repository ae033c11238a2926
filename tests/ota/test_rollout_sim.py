"""200 simulated MQTT devices (``telemetra simulate``, one process) against a real ``telemetra serve``
(SQLite) and a real Mosquitto with dynamic security: rollouts that really download, verify and report.

Mosquitto rather than the embedded broker: amqtt matches every message against every subscription
(400 here), which made this test take 55-75 s on the 2-core box; with Mosquitto it takes about 40 s.
The embedded broker's OTA path is covered by ``test_mqtt_reports.py``. The SIGKILL below hits Telemetra
only; the devices stay connected to the broker and what they sent meanwhile may be lost (Mosquitto
2.0 does not restore a shared subscription), which the timeouts, retries and retained fwVersion cover.

In order, on the same fleet: waves advance and every device ends on the new version; a planted 30 %
failure rate pauses the next rollout at its first wave; cancel stops notifications; a SIGKILL of the
server mid-rollout, then a restart, and the rollout carries on to the end. (Timeouts and retries are
in ``test_rollout.py``, where a device can be made to stay silent.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from telemetra.domain.ota import assign_waves
from telemetra.simulate_ota import planted_failure
from tests.conftest import ADMIN, ADMIN_KEY
from tests.mqtt.conftest import TelemetraProcess, telemetra_binary
from tests.ota.conftest import image
from tests.support.mosquitto import free_port, start_mosquitto

T = TypeVar("T")
DEVICES = 200
MODEL = "sim-env"  # the simulator's model for the env profile
IDS = [f"sim-{i:03d}" for i in range(1, DEVICES + 1)]
FAILING = "3.0.0"


def poll(check: Callable[[], T | None], *, within: float, what: str, every: float = 0.2) -> T:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last {value!r}")
        time.sleep(every)


class Fleet:
    def __init__(self, server: TelemetraProcess, workdir: Path) -> None:
        self.server = server
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.out = workdir / "simulate.out"
        self.err = workdir / "simulate.err"

    def start(self, mqtt_port: int) -> None:
        command = [
            *telemetra_binary(), "simulate", "--url", self.server.base_url, "--mqtt-port", str(mqtt_port),
            "--devices", str(DEVICES), "--rate", "0.1", "--profile", "env", "--state-dir", str(self.workdir),
            "--duration", "600", "--ota-failure-rate", "0.3", "--ota-failure-version", FAILING, "--json",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")} | {
            "TELEMETRA_ADMIN_KEYS": ADMIN_KEY
        }
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=err, cwd=self.workdir)

    def stop(self) -> dict[str, Any]:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)
        lines = self.out.read_text().strip().splitlines()
        assert lines, f"simulator printed nothing:\n{self.err.read_text()[-3000:]}"
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[TelemetraProcess, Fleet, int]]:
    broker = start_mosquitto(tmp_path / "mosquitto", dynsec=True)
    server = TelemetraProcess(
        tmp_path / "server",
        port=free_port(),
        env={
            **broker.telemetra_env(),
            "TELEMETRA_MQTT_CLIENT_ID": "telemetra-ota-sim-test",
            "TELEMETRA_OTA_STEP_S": "0.2",
        },
    )
    fleet = Fleet(server, tmp_path)
    try:
        yield server, fleet, broker.port
    except BaseException:
        print(server.output(tail=8000))
        print("---- simulator stderr ----\n" + (fleet.err.read_text()[-4000:] if fleet.err.exists() else ""))
        raise
    finally:
        fleet.kill()
        server.kill()
        broker.stop()


def _devices(c: httpx.Client) -> list[dict[str, Any]]:
    r = c.get("/api/v1/devices", params={"model": MODEL, "limit": 1000})
    assert r.status_code == 200, r.text
    devices: list[dict[str, Any]] = r.json()["devices"]
    return devices


def _upload(c: httpx.Client, version: str, seed: int) -> dict[str, Any]:
    r = c.post(
        "/api/v1/firmware/upload",
        files={"file": (f"fw-{version}.bin", image(48 * 1024, seed))},
        data={"model": MODEL, "version": version},
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _start(c: httpx.Client, **body: Any) -> int:
    r = c.post("/api/v1/ota/updates", json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["id"])


def _detail(c: httpx.Client, uid: int) -> dict[str, Any]:
    r = c.get(f"/api/v1/ota/updates/{uid}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _told(detail: dict[str, Any]) -> list[str]:
    return [n["node_id"] for n in detail["nodes"] if n["attempts"]]


def _steps_after(server: TelemetraProcess, steps: int) -> Callable[[], bool]:
    start = server.metric("telemetra_ota_scheduler_steps_total")
    return lambda: server.metric("telemetra_ota_scheduler_steps_total") >= start + steps


def test_rollouts_over_200_simulated_devices(stack: tuple[TelemetraProcess, Fleet, int]) -> None:
    server, fleet, mqtt_port = stack
    server.start()
    server.wait_healthy()
    fleet.start(mqtt_port)
    with httpx.Client(base_url=server.base_url, headers=ADMIN, timeout=15) as c:
        poll(lambda: len([d for d in _devices(c) if d["online"] and d["fw_version"] == "1.0.0"]) == DEVICES,
             within=60, what="200 simulated devices online")  # fmt: skip
        firmware = {v: _upload(c, v, i) for i, v in enumerate(("2.0.0", FAILING, "3.1.0", "4.0.0"))}

        # 1. Waves advance, in order, and every device ends up on 2.0.0.
        uid = _start(c, firmware_id=firmware["2.0.0"]["id"], target_model=MODEL, waves=[10, 50, 100],
                     rate_per_minute=12_000, device_timeout_s=60, max_retries=1)  # fmt: skip
        detail = poll(lambda: (d := _detail(c, uid))["status"] == "completed" and d, within=60, what="rollout 1")
        assert [(w["percent"], w["devices"], w["completed"], w["status"]) for w in detail["waves"]] == [
            (10, 20, 20, "completed"), (50, 80, 80, "completed"), (100, 100, 100, "completed"),
        ]  # fmt: skip
        for earlier, later in ((0, 1), (1, 2)):
            done = max(n["completed_at"] for n in detail["nodes"] if n["wave"] == earlier)
            first_told = min(n["notified_at"] for n in detail["nodes"] if n["wave"] == later and n["attempts"] == 1)
            assert done <= first_told, f"wave {later + 1} was notified before wave {earlier + 1} finished"
        poll(lambda: all(d["fw_version"] == "2.0.0" for d in _devices(c)), within=15, what="fwVersion 2.0.0")

        # 2. 3.0.0 fails on a planted 30 %: the rollout pauses in its first wave.
        wave0 = [d for d, w, _ in assign_waves(IDS, [10, 100]) if w == 0]
        planted = [d for d in wave0 if planted_failure(d, FAILING, 0.3)]
        assert len(wave0) == 20 and len(planted) / len(wave0) >= 0.3  # the plant, before relying on it
        uid = _start(c, firmware_id=firmware[FAILING]["id"], target_model=MODEL, waves=[10, 100],
                     rate_per_minute=12_000, pause_failure_percent=20, pause_min_finished=10)  # fmt: skip
        detail = poll(lambda: (d := _detail(c, uid))["status"] == "paused" and d, within=30, what="the pause")
        assert detail["paused_reason"].startswith("wave 1:") and detail["current_wave"] == 0
        failed = {n["node_id"] for n in detail["nodes"] if n["status"] == "failed"}
        assert failed and failed <= set(planted)
        assert all(
            n["error_message"] == "simulated install failure" for n in detail["nodes"] if n["status"] == "failed"
        )
        poll(_steps_after(server, 5), within=10, what="five more scheduler steps")  # positive control
        detail = _detail(c, uid)
        assert detail["status"] == "paused" and set(_told(detail)) <= set(wave0)
        assert (c.post(f"/api/v1/ota/updates/{uid}/cancel")).json()["status"] == "cancelled"

        # 3. Cancel stops notifications (1 a second here): none after it, though the scheduler runs on.
        uid = _start(c, firmware_id=firmware["3.1.0"]["id"], target_model=MODEL, rate_per_minute=60)
        poll(lambda: len(_told(_detail(c, uid))) >= 2, within=15, what="two notifications")
        assert c.post(f"/api/v1/ota/updates/{uid}/cancel").json()["status"] == "cancelled"
        told = _told(_detail(c, uid))
        sent = server.metric("telemetra_ota_notifications_total")
        poll(_steps_after(server, 10), within=10, what="ten more scheduler steps (2 s at 1 notification/s)")
        assert _told(_detail(c, uid)) == told and len(told) < DEVICES
        assert server.metric("telemetra_ota_notifications_total") == sent

        # 4. SIGKILL mid-rollout; the restarted server carries it on from the database.
        uid = _start(c, firmware_id=firmware["4.0.0"]["id"], target_model=MODEL, waves=[25, 100],
                     rate_per_minute=3000, device_timeout_s=5, max_retries=3, pause_failure_percent=None)  # fmt: skip
        poll(lambda: _detail(c, uid)["progress"]["completed"] >= 30, within=30, what="30 devices on 4.0.0")
        at_kill = _detail(c, uid)["progress"]
        server.kill()
        server.start()
        server.wait_healthy()
        detail = poll(lambda: (d := _detail(c, uid))["status"] == "completed" and d, within=120, what="rollout 4")
        assert at_kill["completed"] < DEVICES, "the kill came too late to be mid-rollout"
        assert detail["progress"]["completed"] == DEVICES
        poll(lambda: all(d["fw_version"] == "4.0.0" for d in _devices(c)), within=30, what="fwVersion 4.0.0")
    summary = fleet.stop()
    assert summary["ota_failed"] >= len(failed)
    assert summary["ota_completed"] >= DEVICES * 2  # every device installed 2.0.0 and 4.0.0
