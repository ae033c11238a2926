"""A Mosquitto restart under QoS 1 load loses nothing the broker acknowledged to a device.

The broker runs deploy/mosquitto/mosquitto.conf as shipped; Telemetra (a real ``telemetra serve`` on
PostgreSQL) consumes through a plain persistent subscription. Four devices publish numbered messages
(tests/support/restart_scenario.py); half-way the broker is restarted:

- SIGTERM: Mosquitto saves its in-memory database on the way out, sessions and subscriptions included;
- SIGKILL: it saves nothing; what it comes back with is its last autosave (every second, shipped). The
  promise (README "Mosquitto restarts") holds once a save has the collector's session, which the scenario
  waits for, and while the collector is connected and keeping up — messages are then handed to it at once,
  and what was handed to it is committed whether or not the broker lives to see the PUBACK.

Then every message a device got a PUBACK for must be in the database exactly once (device timestamps make
redeliveries collapse on the primary key). A separate case covers messages queued while Telemetra was away:
a SIGKILL keeps those the broker had saved.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import postgres_database
from tests.mqtt.conftest import TelemetraProcess, create_device_over_http
from tests.support.mosquitto import MosquittoInstance, deploy_mosquitto, free_port
from tests.support.mqtt_load import SeqLoad, Tally, stored_seqs
from tests.support.restart_scenario import restart_scenario

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]

DEVICES = 4
MESSAGES = 750  # per device: 3,000 in all
RATE = 250.0  # per device and second: the stream lasts 3 s, the restart comes 1.5 s in


@pytest.mark.parametrize("restart", ["graceful", "kill"])
async def test_broker_restart_under_load_loses_and_duplicates_nothing(restart: str, tmp_path: Path) -> None:
    async with postgres_database() as url:
        with deploy_mosquitto() as deploy:
            outcome = await asyncio.to_thread(
                restart_scenario,
                deploy.instance,
                url,
                tmp_path,
                restart=restart,  # type: ignore[arg-type]
                devices=DEVICES,
                messages=MESSAGES,
                rate=RATE,
            )
    print(outcome.report())
    tally = outcome.tally
    # The restart came mid-stream, and the stream went on after it.
    assert 0 < outcome.published_at_restart < DEVICES * MESSAGES
    assert tally.acknowledged == DEVICES * MESSAGES, "publishers did not get every PUBACK after the restart"
    assert tally.lost == 0, f"{tally.lost} acknowledged messages lost, e.g. {tally.lost_examples}"
    assert tally.duplicated == 0


async def test_sigkill_keeps_what_was_queued_for_telemetra_and_saved(tmp_path: Path) -> None:
    """Telemetra is stopped; devices go on publishing into its persistent session; the broker saves, and is
    then SIGKILLed. Everything acknowledged before that save is stored once Telemetra is back."""
    async with postgres_database() as url:
        with deploy_mosquitto() as deploy:
            tally = await asyncio.to_thread(_away_then_kill, deploy.instance, url, tmp_path)
    print(f"queued while away, broker SIGKILLed after a save: {tally.line()}")
    assert tally.acknowledged == DEVICES * 250
    assert tally.lost == 0, f"{tally.lost} acknowledged messages lost, e.g. {tally.lost_examples}"
    assert tally.duplicated == 0


def _away_then_kill(broker: MosquittoInstance, url: str, tmp_path: Path) -> Tally:
    telemetra = TelemetraProcess(
        tmp_path / "telemetra",
        port=free_port(),
        env={
            "TELEMETRA_DATABASE_URL": url,
            **broker.telemetra_env(),
        },
    )
    ids = [f"away-{i}" for i in range(DEVICES)]
    load: SeqLoad | None = None
    try:
        telemetra.start()
        telemetra.wait_healthy()
        creds = [(d, create_device_over_http(telemetra, d)) for d in ids]
        telemetra.stop()  # graceful: its session (and subscription) stays with the broker
        load = SeqLoad(broker.host, broker.port, creds, messages=250, rate=500.0)
        load.start()
        load.finish()
        acked_at = time.time()
        acknowledged = load.acknowledged()
        assert stored_seqs(url, ids) == {d: [] for d in ids}, "Telemetra was not away"
        broker.wait_saved_after(acked_at)
        broker.restart(kill=True)
        telemetra.start()
        telemetra.wait_healthy()
        expected = sum(map(len, acknowledged.values()))
        deadline = time.monotonic() + 30
        stored = stored_seqs(url, ids)
        while sum(map(len, stored.values())) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            stored = stored_seqs(url, ids)
        return Tally.of(acknowledged, stored)
    except BaseException:
        print(telemetra.output())
        print("---- mosquitto ----\n" + broker.log()[-4000:])
        raise
    finally:
        if load is not None:
            load.close()
        telemetra.kill()
