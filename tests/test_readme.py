"""The README's "first five minutes" block, extracted from the README (so it cannot drift) and run verbatim
in bash against a server started the README's way (``telemetra serve`` in an empty directory), on this
machine where another broker may hold 1883: the examples take the ports from the same TELEMETRA_*
variables as the server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import missing_service
from tests.mqtt.conftest import telemetra_binary
from tests.support.mosquitto import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(name: str) -> str:
    match = re.search(rf"<!-- readme-test: {name} -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert match, f"README block {name} not found"
    return match.group(1)


def test_first_minutes_block_runs_verbatim(tmp_path: Path) -> None:
    for tool in ("curl", "mosquitto_pub"):
        if shutil.which(tool) is None:
            missing_service(f"{tool} not installed (the README's examples use it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    # The README's advice when 1883 is taken (it is, on the machines this suite runs on): export the port.
    env |= {"TELEMETRA_PORT": str(free_port()), "TELEMETRA_MQTT_PORT": str(free_port())}
    # The server's own bin directory first, as `make run` has it; the README calls `.venv/bin/telemetra`.
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen([*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "telemetra-data" / "admin.key").exists():  # written once it has started
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        block = readme_block("first-minutes")
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # curl prints each answer without a newline: the JSON documents follow each other.
        answers, text, decoder = [], done.stdout.strip(), json.JSONDecoder()
        while text:
            doc, end = decoder.raw_decode(text)
            answers.append(doc)
            text = text[end:].lstrip()
        ingested, latest = answers
        assert ingested["accepted"] is True
        assert json.dumps(latest).count("21.5") == 1 and json.dumps(latest).count("41") >= 1, latest
        assert httpx.get(f"http://127.0.0.1:{env['TELEMETRA_PORT']}/health").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=20)
