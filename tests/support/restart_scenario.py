"""Restart Mosquitto under a QoS 1 load into a running Telemetra, and count what survived.

Telemetra runs as a real process (``telemetra serve``) against the given broker with dynamic security and
the given database; devices are created over its HTTP API, then publish numbered messages
(tests/support/mqtt_load.py). Part-way through, the broker is restarted — SIGTERM (it saves its in-memory
database on the way out) or SIGKILL (it saves nothing; what survives is its last autosave) — on the same
port and files. The devices reconnect and go on; when all is published and acknowledged, what the
database holds is set against what the broker acknowledged. Shared by tests/reliability (a few thousand
messages) and bench/mosquitto_restart.py (the long runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from tests.mqtt.conftest import TelemetraProcess, create_device_over_http, metric_sum
from tests.support.mosquitto import MosquittoInstance, free_port
from tests.support.mqtt_load import SeqLoad, Tally, stored_seqs

__all__ = ["RestartOutcome", "restart_scenario"]

# "away-kill": Telemetra is stopped while the devices publish (the broker queues for its session), and the
# broker is SIGKILLed right after the last PUBACK, without waiting for an autosave: what that loses is the
# window a SIGKILL leaves (bench only; the promise is tested with a save first).
Restart = Literal["none", "graceful", "kill", "away-kill"]


@dataclass
class RestartOutcome:
    restart: Restart
    tally: Tally
    published: int
    published_at_restart: int
    publish_s: float
    # From the broker's restart to the collector's next SUBACK (its /health turning ok); None when no poll
    # (every 10 ms) saw it gone.
    collector_back_s: float | None
    # Messages Telemetra committed more than once (redeliveries the primary key absorbed).
    redelivered: int
    telemetra_log: str

    def report(self) -> str:
        back = f"{self.collector_back_s:.2f}s" if self.collector_back_s is not None else "<10ms"
        return (
            f"restart={self.restart}: {self.tally.line()}; published={self.published} in {self.publish_s:.1f}s "
            f"({self.published / max(self.publish_s, 1e-9):.0f} msg/s); collector back after {back}; "
            f"redelivered={self.redelivered}"
        )


def _wait_collector(process: TelemetraProcess, timeout: float = 30.0) -> float | None:
    """Seconds until the collector is connected again after the broker went away: its /health must first
    show it down (if it does within 2 s: a reconnect faster than the poll is not seen) and then ok."""
    start = time.monotonic()
    seen_down = False
    with httpx.Client(base_url=process.base_url, timeout=2) as client:
        while time.monotonic() - start < timeout:
            try:
                up = client.get("/health").json()["checks"]["mqtt"]["status"] == "ok"
            except (httpx.HTTPError, ValueError, KeyError):
                up = False
            if not up:
                seen_down = True
            elif seen_down:
                return time.monotonic() - start
            elif time.monotonic() - start > 2.0:
                return None  # back before a poll saw it gone
            time.sleep(0.01)
    return None


def _wait_stored(read: Callable[[], dict[str, list[int]]], expected: int, timeout: float) -> dict[str, list[int]]:
    """Poll until ``expected`` readings are in and a second passed without more, or 5 s without change."""
    deadline = time.monotonic() + timeout
    last = read()
    changed = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = read()
        if sum(map(len, now.values())) != sum(map(len, last.values())):
            changed = time.monotonic()
        last = now
        quiet = time.monotonic() - changed
        if (sum(map(len, last.values())) >= expected and quiet >= 1.0) or quiet >= 5.0:
            break
    return last


def restart_scenario(
    broker: MosquittoInstance,
    database_url: str,
    workdir: Path,
    *,
    restart: Restart,
    devices: int = 4,
    messages: int = 750,
    rate: float = 250.0,
    restart_at: float = 0.5,
    env: dict[str, str] | None = None,
) -> RestartOutcome:
    """``devices`` × ``messages`` at ``rate`` msg/s per device; the broker is restarted once
    ``restart_at`` of them are published. The caller stops the broker."""
    telemetra = TelemetraProcess(
        workdir / "telemetra",
        port=free_port(),
        env={
            "TELEMETRA_DATABASE_URL": database_url,
            **broker.telemetra_env(),
            "TELEMETRA_LOG_LEVEL": "WARNING",
            **(env or {}),
        },
    )
    load: SeqLoad | None = None
    try:
        telemetra.start()
        telemetra.wait_healthy()
        subscribed = time.time()
        ids = [f"restart-{i}" for i in range(devices)]
        creds = [(d, create_device_over_http(telemetra, d)) for d in ids]
        if restart == "kill":
            # What a SIGKILL leaves is the last autosave: the promise holds once one has the collector's
            # session (within autosave_interval of its subscription).
            broker.wait_saved_after(subscribed)
        load = SeqLoad(broker.host, broker.port, creds, messages=messages, rate=rate)
        back: float | None = None
        at_restart = 0
        if restart == "away-kill":
            telemetra.stop()
            load.start()
            load.finish()
            at_restart = load.published
            broker.restart(kill=True)
            telemetra.start()
            telemetra.wait_healthy()
        else:
            load.start()
        if restart in ("graceful", "kill"):
            load.wait_published(int(load.total * restart_at))
            at_restart = load.published
            broker.restart(kill=restart == "kill")
            back = _wait_collector(telemetra)
        load.finish()
        publish_s = load.finished_at - load.started_at
        acked = load.acknowledged()
        stored = _wait_stored(lambda: stored_seqs(database_url, ids), sum(map(len, acked.values())), timeout=60)
        tally = Tally.of(acked, stored)
        with httpx.Client(base_url=telemetra.base_url, timeout=5) as client:
            committed = metric_sum(client.get("/metrics").text, "telemetra_ingested_messages_total", transport="mqtt")
        return RestartOutcome(
            restart=restart,
            tally=tally,
            published=load.published,
            published_at_restart=at_restart,
            publish_s=publish_s,
            collector_back_s=back,
            redelivered=int(committed) - len({(d, s) for d, seqs in stored.items() for s in seqs}),
            telemetra_log=telemetra.output(),
        )
    except BaseException:
        print(telemetra.output())
        print("---- mosquitto ----\n" + broker.log()[-4000:])
        raise
    finally:
        if load is not None:
            load.close()
        telemetra.stop()
