"""Two Telemetra processes on one shared subscription (`$share/telemetra/…`) against a test Mosquitto and
one PostgreSQL: the broker splits the stream between them, every message is stored exactly once, and
both processes take part."""

from __future__ import annotations

import asyncio
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

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]

MESSAGES = 600
DEVICE = "shared-dev"


async def test_two_processes_share_the_stream_without_loss_or_duplicates(tmp_path: Path) -> None:
    async with postgres_database() as url:
        broker = start_mosquitto(tmp_path / "mosquitto", dynsec=True)
        try:
            await asyncio.to_thread(shared_scenario, broker, url, tmp_path)
        finally:
            broker.stop()


def shared_scenario(broker: MosquittoInstance, database_url: str, tmp_path: Path) -> None:
    common = {
        "TELEMETRA_DATABASE_URL": database_url,
        **broker.telemetra_env(),
        "TELEMETRA_MQTT_SHARE_GROUP": "telemetra",
    }
    processes = [
        TelemetraProcess(
            tmp_path / name,
            port=free_port(),
            name=name,
            env={**common, "TELEMETRA_MQTT_CLIENT_ID": f"telemetra-{name}"},
        )
        for name in ("one", "two")
    ]
    publisher: SeqPublisher | None = None
    try:
        # Started together, as replicas of a deployment are (migrations and the service account race).
        for process in processes:
            process.start()
        for process in processes:
            process.wait_healthy()
        secret = create_device_over_http(processes[0], DEVICE)
        publisher = SeqPublisher(broker.host, broker.port, DEVICE, secret)
        for seq in range(MESSAGES):
            publisher.publish(seq)
        assert publisher.refused == [] and publisher.accepted == list(range(MESSAGES))

        final = wait_until_stable(lambda: stored_seq(database_url, DEVICE), expected=MESSAGES)
        assert final.rows == final.distinct_ts == MESSAGES, (final.rows, final.distinct_ts)
        assert final.values == list(range(MESSAGES))
        shares = [p.metric("telemetra_ingested_messages_total", transport="mqtt") for p in processes]
        assert all(share > 0 for share in shares), f"one process took no part: {shares}"
        # Exactly once each: without a working shared subscription both processes would get every message
        # (the primary key would hide it in the table, not in these counters).
        assert sum(shares) == MESSAGES, shares
    except BaseException:
        for process in processes:
            print(process.output())
        print("---- mosquitto ----\n" + broker.log()[-4000:])
        raise
    finally:
        if publisher is not None:
            publisher.close()
        for process in processes:
            process.kill()
