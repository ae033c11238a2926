"""``telemetra serve --workers N``: refused in the embedded configuration, and with PostgreSQL and a test
Mosquitto two worker processes share one HTTP port and the MQTT stream ($share): every message is stored
exactly once, and both workers start."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from telemetra.cli import _refuse_embedded_for_workers
from telemetra.config import Settings
from telemetra.startup import EXIT_WORKERS, StartupError
from tests.conftest import ADMIN, ADMIN_KEY, postgres_database
from tests.mqtt.conftest import SeqPublisher, metric_sum, stored_seq, telemetra_binary, wait_until_stable
from tests.support.mosquitto import MosquittoInstance, free_port, start_mosquitto

MESSAGES = 300
DEVICE = "worker-dev"


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    env |= {"TELEMETRA_DATA_DIR": str(tmp_path / "data"), "TELEMETRA_HOST": "127.0.0.1"}
    return env | {"TELEMETRA_ADMIN_KEYS": ADMIN_KEY, "TELEMETRA_PORT": str(free_port()), **extra}


def test_workers_refused_in_the_embedded_configuration(tmp_path: Path) -> None:
    """The embedded defaults (SQLite, the embedded broker): one line naming what to set, exit code 16."""
    done = subprocess.run(
        [*telemetra_binary(), "serve", "--workers", "2"],
        cwd=tmp_path,
        env=base_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_WORKERS, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("Error: --workers 2 needs PostgreSQL (TELEMETRA_DATABASE_URL)"), done.stderr
    assert "an external MQTT broker (TELEMETRA_MQTT_URL)" in done.stderr


@pytest.mark.parametrize(
    ("values", "needs", "not_needed"),
    [
        ({"mqtt_port": 0}, "PostgreSQL (TELEMETRA_DATABASE_URL)", "TELEMETRA_MQTT_URL"),
        ({"database_url": "postgresql://u@127.0.0.1/x"}, "an external MQTT broker (TELEMETRA_MQTT_URL)", "PostgreSQL"),
    ],
)
def test_workers_refusal_names_only_what_is_missing(
    tmp_path: Path, values: dict[str, object], needs: str, not_needed: str
) -> None:
    settings = Settings(data_dir=tmp_path, admin_keys=[ADMIN_KEY], **values)  # type: ignore[arg-type]
    with pytest.raises(StartupError) as refused:
        _refuse_embedded_for_workers(settings, 3)
    assert refused.value.code == EXIT_WORKERS
    assert refused.value.message.startswith("--workers 3 needs ") and needs in refused.value.message
    assert not_needed not in refused.value.message and "\n" not in refused.value.message


@pytest.mark.mosquitto
@pytest.mark.postgres
async def test_two_workers_store_every_message_once(tmp_path: Path) -> None:
    async with postgres_database() as url:
        broker = start_mosquitto(tmp_path / "mosquitto", dynsec=True)
        try:
            await asyncio.to_thread(scenario, broker, url, tmp_path)
        finally:
            broker.stop()


def scenario(broker: MosquittoInstance, database_url: str, tmp_path: Path) -> None:
    env = base_env(
        tmp_path,
        TELEMETRA_DATABASE_URL=database_url,
        **broker.telemetra_env(),
        TELEMETRA_LOG_LEVEL="INFO",
    )
    url = f"http://127.0.0.1:{env['TELEMETRA_PORT']}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*telemetra_binary(), "serve", "--workers", "2"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    publisher: SeqPublisher | None = None
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count(" ready on postgresql") < 2:  # both workers started
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        r = httpx.post(f"{url}/api/v1/devices", json={"id": DEVICE}, headers=ADMIN, timeout=10)
        assert r.status_code == 201, r.text
        publisher = SeqPublisher(broker.host, broker.port, DEVICE, r.json()["credentials"]["api_key"])
        for seq in range(MESSAGES):
            publisher.publish(seq)
        assert publisher.refused == [] and publisher.accepted == list(range(MESSAGES))
        final = wait_until_stable(lambda: stored_seq(database_url, DEVICE), expected=MESSAGES)
        assert final.rows == final.distinct_ts == MESSAGES and final.values == list(range(MESSAGES))
        # Both workers took part in MQTT and answer HTTP on the one port: each counts what it ingested, and
        # new connections reach either (the kernel spreads them over the processes accepting on the socket).
        seen: dict[float, float] = {}  # worker (its process start time) → messages it ingested

        def sample(_: int) -> tuple[float, float]:
            with httpx.Client(base_url=url, timeout=10) as client:  # a new connection each time
                text = client.get("/metrics").text
            start = metric_sum(text, "process_start_time_seconds")
            return start, metric_sum(text, "telemetra_ingested_messages_total", transport="mqtt")

        # Concurrent connections: an idle worker accepts while the other is busy (one at a time, the
        # kernel may hand every connection to the same process).
        # Bounded: the assertion below holds either way, so a kernel that favours one process costs 10 s, not 90.
        sample_until = time.monotonic() + 10
        with ThreadPoolExecutor(8) as pool:
            while len(seen) < 2 and time.monotonic() < sample_until:
                seen.update(pool.map(sample, range(32)))
        # Both workers hold the shared MQTT subscription (each logs its collector's SUBACK).
        assert log.read_text().count("MQTT collector connected") == 2, log.read_text()
        # Which process accepts an HTTP connection is the kernel's choice: on a loaded box one may take them
        # all for a while. When both answered, their counts add up to every message.
        assert 1 <= len(seen) <= 2 and sum(seen.values()) <= MESSAGES, seen
        if len(seen) == 2:
            assert sum(seen.values()) == MESSAGES, seen
    finally:
        if publisher is not None:
            publisher.close()
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
