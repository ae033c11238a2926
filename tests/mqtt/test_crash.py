"""Kill -9 in the middle of a QoS 1 stream loses nothing and duplicates nothing.

Telemetra runs as a real process against a test Mosquitto (dynamic security) with a fixed MQTT client
id, so the restarted process resumes the broker's persistent session. A device publishes a numbered
stream, waiting for each PUBACK; a third of the way in, Telemetra is SIGKILLed; the stream goes on (the
broker queues it for the session); Telemetra is restarted. Every seq the broker acknowledged must then be
in the database exactly once: the collector acknowledges only after commit, so whatever was in flight
at the kill is redelivered, and device-timestamped redeliveries collapse on the primary key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.conftest import postgres_database
from tests.mqtt.conftest import (
    SeqPublisher,
    TelemetraProcess,
    create_device_over_http,
    stored_seq,
    wait_until_stable,
)
from tests.support.mosquitto import MosquittoInstance, free_port, start_mosquitto

pytestmark = [pytest.mark.mosquitto]

MESSAGES = 3000
KILL_AT = MESSAGES // 3
DEVICE = "crash-dev"


@asynccontextmanager
async def database(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    if kind == "postgres":
        async with postgres_database() as url:
            yield url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'crash.db'}"


@pytest.mark.parametrize("db", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
async def test_sigkill_mid_stream_loses_and_duplicates_nothing(db: str, tmp_path: Path) -> None:
    async with database(db, tmp_path) as url:
        broker = start_mosquitto(tmp_path / "mosquitto", dynsec=True)
        try:
            await asyncio.to_thread(crash_scenario, broker, url, tmp_path)
        finally:
            broker.stop()


def wait_until(condition: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def crash_scenario(broker: MosquittoInstance, database_url: str, tmp_path: Path) -> None:
    telemetra = TelemetraProcess(
        tmp_path / "telemetra",
        port=free_port(),
        env={
            "TELEMETRA_DATABASE_URL": database_url,
            **broker.telemetra_env(),
            "TELEMETRA_MQTT_CLIENT_ID": "telemetra-crash-test",
        },
    )
    publisher: SeqPublisher | None = None
    try:
        telemetra.start()
        telemetra.wait_healthy()
        secret = create_device_over_http(telemetra, DEVICE)
        publisher = SeqPublisher(broker.host, broker.port, DEVICE, secret)
        for seq in range(KILL_AT):
            publisher.publish(seq)
        # The broker acknowledges at once; wait until Telemetra has committed some of it, so the kill
        # comes mid-stream (with the rest in flight) rather than before the first commit.
        wait_until(lambda: stored_seq(database_url, DEVICE).rows > 0, timeout=10)
        telemetra.kill()
        at_kill = stored_seq(database_url, DEVICE)
        for seq in range(KILL_AT, MESSAGES):
            publisher.publish(seq)
        telemetra.start()
        telemetra.wait_healthy()
        final = wait_until_stable(lambda: stored_seq(database_url, DEVICE), expected=len(publisher.accepted))

        accepted = publisher.accepted
        assert publisher.refused == [], f"the broker refused {len(publisher.refused)} publishes"
        assert accepted == list(range(MESSAGES))
        # The kill really happened mid-stream: some of the stream was stored before it, not all of it.
        assert 0 < at_kill.rows < MESSAGES, at_kill.rows
        missing = sorted(set(accepted) - set(final.values))
        duplicated = len(final.values) - len(set(final.values))
        assert not missing, f"{len(missing)} acknowledged messages lost, first {missing[:10]}"
        assert duplicated == 0, f"{duplicated} duplicates"
        assert final.rows == final.distinct_ts == len(accepted)
        assert final.values == accepted  # no gaps, nothing extra
    except BaseException:
        print(telemetra.output())
        print("---- mosquitto ----\n" + broker.log()[-4000:])
        raise
    finally:
        if publisher is not None:
            publisher.close()
        telemetra.kill()
