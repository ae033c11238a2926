"""A QoS 1 load of numbered messages, and what became of it: acknowledged, stored, lost, duplicated.

``SeqLoad`` runs one paho client per device, each in paho's own network thread (MQTT 3.1.1, client id =
device id, as the seed firmware does), publishing ``{"ts": base + seq, "seq": seq}`` on
``telemetra/<device>/telemetry`` at a steady rate. paho keeps what it could not send while the broker is
away and sends it after reconnecting; a message counts as *acknowledged* once its PUBACK came back
(``MQTTMessageInfo.is_published``), whichever attempt it was. ``Tally`` reads what Telemetra stored and
sets the two side by side. Used by tests/reliability and bench/mosquitto_restart.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["SeqLoad", "Tally", "stored_seqs"]

# Unacknowledged messages per client before paho queues: the seed firmware has one, paho's default is 20
# (paho rescans its in-flight messages on every ack, so more is slower, not faster).
IN_FLIGHT = 20


class _Device:
    def __init__(self, host: str, port: int, device_id: str, secret: str, messages: int) -> None:
        self.device_id = device_id
        self.topic = f"telemetra/{device_id}/telemetry"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.username_pw_set(device_id, secret)
        self.client.max_inflight_messages_set(IN_FLIGHT)
        # A broker restart takes well under a second here; a device retrying every few seconds would only
        # make the test slower, not different.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.5)  # type: ignore[arg-type]
        self.client.connect(host, port, 30)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []
        self.messages = messages
        self.base = int(time.time() * 1000) - 3_600_000

    def publish(self, seq: int) -> None:
        payload = b'{"ts":%d,"seq":%d}' % (self.base + seq, seq)
        self.infos.append(self.client.publish(self.topic, payload, qos=1))

    def acknowledged(self) -> set[int]:
        return {seq for seq, info in enumerate(self.infos) if _acked(info)}


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    # is_published() raises for a message first queued while disconnected (its rc stays "no connection")
    # even after paho has resent it and the PUBACK came back; the flag it reads is the truth.
    return bool(info._published)


class SeqLoad:
    """``devices`` (id, secret) each publish ``messages`` numbered QoS 1 messages at ``rate`` msg/s each."""

    def __init__(self, host: str, port: int, devices: list[tuple[str, str]], *, messages: int, rate: float) -> None:
        self._devices = [_Device(host, port, d, s, messages) for d, s in devices]
        deadline = time.monotonic() + 5
        while not all(d.client.is_connected() for d in self._devices):
            if time.monotonic() > deadline:
                raise AssertionError("publishers could not connect")
            time.sleep(0.01)
        self._rate = rate
        self._messages = messages
        self._threads = [threading.Thread(target=self._feed, args=(d,), daemon=True) for d in self._devices]
        self._stop = threading.Event()
        self.started_at = 0.0
        self.finished_at = 0.0

    def start(self) -> None:
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()

    def _feed(self, device: _Device) -> None:
        for seq in range(self._messages):
            if self._stop.is_set():
                return
            due = self.started_at + seq / self._rate
            delay = due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            device.publish(seq)

    @property
    def published(self) -> int:
        return sum(len(d.infos) for d in self._devices)

    @property
    def total(self) -> int:
        return self._messages * len(self._devices)

    def wait_published(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.published < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.published} of {count} published in {timeout}s")
            time.sleep(0.005)

    def finish(self, timeout: float = 30.0) -> None:
        """Wait for the feeders, then for every PUBACK (or the timeout: the rest stay unacknowledged)."""
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)
        deadline = time.monotonic() + timeout
        while any(not _acked(info) for d in self._devices for info in d.infos):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.finished_at = time.monotonic()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop publishing now (a load meant to run until told), then wait for the PUBACKs in flight of the
        devices still connected (a refused one will never get them)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
            not _acked(info) for d in self._devices if d.client.is_connected() for info in d.infos
        ):
            time.sleep(0.02)
        self.finished_at = time.monotonic()

    def acknowledged(self) -> dict[str, set[int]]:
        return {d.device_id: d.acknowledged() for d in self._devices}

    def close(self) -> None:
        self._stop.set()
        for device in self._devices:
            device.client.disconnect()
            device.client.loop_stop()


def stored_seqs(database_url: str, device_ids: list[str]) -> dict[str, list[int]]:
    """The ``seq`` readings of these devices, straight from the telemetry table (blocking)."""
    sql = "SELECT device_id, value_num FROM telemetry WHERE key = 'seq'"
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
            rows: list[Any] = conn.execute(sql).fetchall()
    else:
        dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

        async def fetch() -> list[Any]:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                return [tuple(r) for r in await conn.fetch(sql)]
            finally:
                await conn.close()

        rows = asyncio.run(fetch())
    found: dict[str, list[int]] = {d: [] for d in device_ids}
    for device_id, value in rows:
        if device_id in found:
            found[device_id].append(int(value))
    return found


@dataclass
class Tally:
    """Acknowledged against stored, per device and in total."""

    acknowledged: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unacknowledged_stored: int = 0
    lost_examples: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, acknowledged: dict[str, set[int]], stored: dict[str, list[int]]) -> Tally:
        tally = cls()
        for device_id, acked in acknowledged.items():
            rows = stored.get(device_id, [])
            distinct = set(rows)
            tally.acknowledged += len(acked)
            tally.stored += len(rows)
            tally.duplicated += sum(n - 1 for n in Counter(rows).values())
            missing = sorted(acked - distinct)
            tally.lost += len(missing)
            # Stored without a PUBACK reaching the device: the broker took it, the ack was lost in the
            # restart. Fine (the device resends; the primary key keeps one).
            tally.unacknowledged_stored += len(distinct - acked)
            if missing:
                tally.lost_examples[device_id] = missing[:10]
        return tally

    def line(self) -> str:
        return (
            f"acknowledged={self.acknowledged} stored={self.stored} lost={self.lost} "
            f"duplicated={self.duplicated} (stored without an ack reaching the device: {self.unacknowledged_stored})"
        )
