"""``telemetra simulate`` end to end: a real ``telemetra serve`` (SQLite, embedded MQTT broker) on free
ports, the simulator as the CLI runs it, and the admin API to check that what it says it sent is stored.

Every simulated message carries a device timestamp unique per device, so the stored points must equal
the points the simulator reports, exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN, ADMIN_KEY
from tests.support.procs import free_port

BIN = Path(sys.executable).parent
SINCE = "2000-01-01T00:00:00Z"


@dataclass
class Server:
    url: str
    mqtt_port: int
    data_dir: Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port, mqtt_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    env |= {
        "TELEMETRA_ADMIN_KEYS": ADMIN_KEY,
        "TELEMETRA_DATA_DIR": str(data_dir),
        "TELEMETRA_MQTT_PORT": str(mqtt_port),
        "TELEMETRA_MQTT_HOST": "127.0.0.1",
        "TELEMETRA_LOG_LEVEL": "WARNING",
    }
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "telemetra"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not healthy:\n{log.read_text()}"
            time.sleep(0.1)
        yield Server(url, mqtt_port, data_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def simulate(server: Server, state_dir: Path, *args: str) -> dict[str, Any]:
    cmd = [
        str(BIN / "telemetra"),
        "simulate",
        "--url",
        server.url,
        "--mqtt-port",
        str(server.mqtt_port),
        "--state-dir",
        str(state_dir),
        "--json",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")} | {"TELEMETRA_ADMIN_KEYS": ADMIN_KEY}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


def stored_points(server: Server, device_ids: list[str]) -> int:
    total = 0
    for device_id in device_ids:
        resp = httpx.get(
            f"{server.url}/api/v1/devices/{device_id}/aggregate",
            params={"fn": "count", "start": SINCE},
            headers=ADMIN,
            timeout=5,
        )
        assert resp.status_code == 200, resp.text
        total += sum(b["count"] for buckets in resp.json()["series"].values() for b in buckets)
    return total


def wait_stored(server: Server, device_ids: list[str], expected: int, timeout: float = 5.0) -> int:
    """MQTT messages are stored after the broker acknowledged them: wait for the collector's commit."""
    deadline = time.monotonic() + timeout
    while True:
        got = stored_points(server, device_ids)
        if got >= expected or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def test_simulate_mqtt_then_http_stores_exactly_what_it_reports(server: Server, tmp_path: Path) -> None:
    state_dir = tmp_path / "sim-state"
    common = ("--devices", "3", "--rate", "5", "--duration", "3", "--profile", "env")

    first = simulate(server, state_dir, *common, "--protocol", "mqtt")
    ids = first["devices"]
    assert ids == ["sim-001", "sim-002", "sim-003"]
    assert (first["created"], first["errors"]) == (3, 0)
    assert first["messages"] >= 3 * 12  # ~15 per device at 5/s for 3 s
    assert first["points"] == 4 * first["messages"]
    assert wait_stored(server, ids, first["points"]) == first["points"]

    listed = httpx.get(f"{server.url}/api/v1/devices", params={"search": "sim-"}, headers=ADMIN, timeout=5).json()
    assert sorted(d["id"] for d in listed["devices"]) == ids
    assert all(d["fw_version"] == "1.0.0" and d["model"] == "sim-env" for d in listed["devices"])

    # The credentials file is private and the re-run reuses it instead of re-keying the devices.
    kept = state_dir / "simulator-devices.json"
    assert kept.stat().st_mode & 0o777 == 0o600
    second = simulate(server, state_dir, *common, "--protocol", "http")
    assert (second["created"], second["reused"], second["rotated"], second["errors"]) == (0, 3, 0, 0)
    assert second["messages"] >= 3 * 12
    total = first["points"] + second["points"]
    assert stored_points(server, ids) == total  # HTTP answers after the commit: no waiting

    # Secrets never reach the output.
    secrets = [entry["secret"] for entry in json.loads(kept.read_text())["servers"][server.url].values()]
    assert len(secrets) == 3
    assert not any(s in json.dumps(first) + json.dumps(second) for s in secrets)


def test_simulate_finds_the_server_from_its_own_settings(server: Server, tmp_path: Path) -> None:
    """No --url, --mqtt-port or --state-dir: the same TELEMETRA_* variables the server was started with
    say where it is (its broker is not on 1883 here, and another broker may be)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")}
    env |= {
        "TELEMETRA_ADMIN_KEYS": ADMIN_KEY,
        "TELEMETRA_HOST": "0.0.0.0",
        "TELEMETRA_PORT": server.url.rsplit(":", 1)[1],
        "TELEMETRA_MQTT_PORT": str(server.mqtt_port),
        "TELEMETRA_DATA_DIR": str(tmp_path / "sim-data"),
    }
    cmd = [str(BIN / "telemetra"), "simulate", "--devices", "2", "--rate", "5", "--duration", "2", "--id-prefix"]
    cmd += ["same", "--json"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0 and summary["messages"] >= 2 * 8
    assert wait_stored(server, summary["devices"], summary["points"]) == summary["points"]
    assert (tmp_path / "sim-data" / "simulator-devices.json").exists()  # TELEMETRA_DATA_DIR by default

    off = subprocess.run([*cmd[:2]], env=env | {"TELEMETRA_MQTT_PORT": "0"}, capture_output=True, text=True, timeout=30)
    assert off.returncode == 2 and "TELEMETRA_MQTT_PORT=0" in off.stderr
