"""``telemetra firmware …`` and ``telemetra ota …`` run for real against a running ``telemetra serve``:
the server found from TELEMETRA_HOST/TELEMETRA_PORT (or ``--url``), the admin key from
TELEMETRA_ADMIN_KEYS, the data directory's admin.key, or ``--key``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN, ADMIN_KEY
from tests.mqtt.conftest import TelemetraProcess, telemetra_binary
from tests.ota.conftest import image
from tests.support.mosquitto import free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TelemetraProcess]:
    process = TelemetraProcess(
        tmp_path / "server",
        port=free_port(),
        env={"TELEMETRA_MQTT_PORT": str(free_port()), "TELEMETRA_MQTT_HOST": "127.0.0.1"},
    )
    process.start()
    try:
        process.wait_healthy()
        yield process
    except BaseException:
        print(process.output())
        raise
    finally:
        process.stop()


def cli(server: TelemetraProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")}
    base |= {"TELEMETRA_HOST": "0.0.0.0", "TELEMETRA_PORT": str(server.port), "TELEMETRA_ADMIN_KEYS": ADMIN_KEY}
    base |= env or {}
    return subprocess.run(
        [*telemetra_binary(), *args], env=base, cwd=server.workdir, capture_output=True, text=True, timeout=60
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_firmware_and_rollout_commands(server: TelemetraProcess, tmp_path: Path) -> None:
    with httpx.Client(base_url=server.base_url, headers=ADMIN) as c:
        for i in range(3):
            assert c.post("/api/v1/devices", json={"id": f"env-{i}", "model": "env"}).status_code == 201
    data = image(3 * 1024 * 1024, 4)  # large enough for the progress bar's path
    fw_file = tmp_path / "env-2.0.0.bin"
    fw_file.write_bytes(data)

    uploaded = ok_json(cli(server, "firmware", "upload", str(fw_file), "--model", "env", "--version", "v2.0", "--json"))
    assert (uploaded["version"], uploaded["size_bytes"]) == ("2.0.0", len(data))
    assert uploaded["sha256"] == hashlib.sha256(data).hexdigest()
    plain = cli(server, "firmware", "upload", str(fw_file), "--model", "env", "--version", "2.1.0", "--stable")
    assert plain.returncode == 0 and "sha256 " + uploaded["sha256"] in plain.stdout
    listed = ok_json(cli(server, "firmware", "list", "--model", "env", "--json"))
    assert [f["version"] for f in listed["items"]] == ["2.1.0", "2.0.0"] and listed["items"][0]["is_stable"]
    table = cli(server, "firmware", "list")
    assert table.returncode == 0 and "2.1.0" in table.stdout

    started = ok_json(cli(server, "ota", "start", "--firmware", str(uploaded["id"]), "--devices", "env-0,env-1",
                          "--waves", "50,100", "--rate", "60", "--timeout", "600", "--json"))  # fmt: skip
    uid = str(started["id"])
    assert (started["status"], started["target_device_ids"]) == ("distributing", ["env-0", "env-1"])
    assert [w["percent"] for w in started["waves"]] == [50, 100]
    assert ok_json(cli(server, "ota", "pause", uid, "--json"))["status"] == "paused"
    status = cli(server, "ota", "status", uid)
    assert status.returncode == 0 and "paused" in status.stdout and "wave" in status.stdout
    assert ok_json(cli(server, "ota", "resume", uid, "--json"))["status"] == "distributing"
    assert ok_json(cli(server, "ota", "cancel", uid, "--json"))["status"] == "cancelled"
    every = ok_json(cli(server, "ota", "status", "--json"))
    assert [j["id"] for j in every] == [started["id"]]

    # Refusals come back as one line naming the field, with a non-zero exit.
    wrong = cli(server, "ota", "start", "--firmware", str(uploaded["id"]), "--model", "heatpump")
    assert wrong.returncode != 0 and "[target_model]" in wrong.stderr
    again = cli(server, "ota", "resume", uid)
    assert again.returncode != 0 and "409" in again.stderr and "[status]" in again.stderr

    # --url and --key instead of the settings; a wrong key is refused.
    explicit = cli(server, "firmware", "list", "--json", "--url", server.base_url, "--key", ADMIN_KEY,
                   env={"TELEMETRA_PORT": "1", "TELEMETRA_ADMIN_KEYS": "wrong-key"})  # fmt: skip
    assert ok_json(explicit)["total"] == 2
    refused = cli(server, "firmware", "list", env={"TELEMETRA_ADMIN_KEYS": "not-the-key"})
    assert refused.returncode != 0 and "401" in refused.stderr
    down = cli(server, "firmware", "list", env={"TELEMETRA_PORT": str(free_port())})
    assert down.returncode != 0 and "cannot reach Telemetra" in down.stderr
