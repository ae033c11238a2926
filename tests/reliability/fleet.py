"""A fleet of real paho devices for the reliability tests, and the count they are judged by.

Each device is a paho client in its own network thread (MQTT 3.1.1, QoS 1, at most ``window`` messages
in flight), publishing ``{"ts": base + seq, "seq": seq}`` — device-timestamped, so a redelivery is stored
once. paho keeps every unacknowledged message and sends it again after a reconnect, as firmware does, so
a message counts as **acknowledged** only when its PUBACK arrived. ``Count`` compares that with what the
database holds: lost = acknowledged but not stored, duplicated = stored more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class FleetDevice:
    def __init__(
        self, host: str, port: int, device_id: str, secret: str, *, window: int, base_ms: int, client_id: str
    ) -> None:
        self.device_id = device_id
        self.base_ms = base_ms
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
        )
        self.client.username_pw_set(device_id, secret)
        self.client.max_inflight_messages_set(window)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)
        self._lock = threading.Lock()
        # seq → its publish; acknowledged once paho has the PUBACK (read, not called back: paho's callback
        # runs under its own lock, which publish() also takes).
        self._pending: dict[int, mqtt.MQTTMessageInfo] = {}
        self._acked: set[int] = set()
        self.sent = 0
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def publish(self, seq: int, topic: str | None = None, payload: bytes | None = None) -> None:
        body = payload if payload is not None else b'{"ts":%d,"seq":%d}' % (self.base_ms + seq, seq)
        info = self.client.publish(topic or f"telemetra/{self.device_id}/telemetry", body, qos=1)
        with self._lock:
            self._pending[seq] = info
            self.sent += 1

    @property
    def acked(self) -> set[int]:
        with self._lock:
            # ``_published`` rather than is_published(): a message queued while disconnected keeps the rc
            # of that first attempt, and is_published() raises for it even once its PUBACK has come.
            done = [seq for seq, info in self._pending.items() if info._published]
            for seq in done:
                del self._pending[seq]
            self._acked.update(done)
            return set(self._acked)

    def acked_count(self) -> int:
        return len(self.acked)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """Devices publishing ``per_device`` numbered messages each, from a feeder thread that keeps every
    device's queue short (paho's own queue is unbounded, so it is fed as acknowledgements come back)."""

    def __init__(
        self,
        host: str,
        port: int,
        credentials: Iterable[tuple[str, str]],
        *,
        per_device: int,
        window: int = 20,
        payloads: Callable[[str, int], tuple[str | None, bytes | None]] | None = None,
        rate: float | None = None,
        client_id_prefix: str = "fleet-",
    ) -> None:
        """``rate``: at most this many messages per device and second (default: as fast as the
        acknowledgements come back). Client ids are ``client_id_prefix`` + device id (Mosquitto, with
        client ids bound to their device, wants the bare device id)."""
        base = int(time.time() * 1000) - 3_600_000
        self.devices = [
            FleetDevice(host, port, d, s, window=window, base_ms=base, client_id=client_id_prefix + d)
            for d, s in credentials
        ]
        self.per_device = per_device
        self._payloads = payloads
        self._window = window
        self._rate = rate
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, name="fleet-feeder", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        next_seq = {d.device_id: 0 for d in self.devices}
        started = time.monotonic()
        while not self._stop.is_set():
            busy = False
            allowed = self.per_device if self._rate is None else int((time.monotonic() - started) * self._rate) + 1
            for device in self.devices:
                seq = next_seq[device.device_id]
                if seq >= self.per_device:
                    continue
                busy = True
                if seq >= allowed:
                    continue
                if device.sent - device.acked_count() >= 2 * self._window:
                    continue
                topic, payload = self._payloads(device.device_id, seq) if self._payloads else (None, None)
                device.publish(seq, topic, payload)
                next_seq[device.device_id] = seq + 1
            if not busy:
                return
            time.sleep(0.0005)

    @property
    def acked(self) -> int:
        return sum(d.acked_count() for d in self.devices)

    @property
    def total(self) -> int:
        return self.per_device * len(self.devices)

    def acked_by_device(self) -> dict[str, set[int]]:
        return {d.device_id: set(d.acked) for d in self.devices}

    def wait_acked(self, at_least: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.acked < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.acked

    def close(self) -> None:
        self._stop.set()
        self._feeder.join(timeout=5)
        for device in self.devices:
            device.close()


@dataclass(frozen=True)
class Count:
    acknowledged: int
    stored: int
    lost: int
    duplicated: int

    def __str__(self) -> str:
        return f"acknowledged {self.acknowledged}, stored {self.stored}, lost {self.lost}, duplicated {self.duplicated}"


def count(acked: dict[str, set[int]], stored: dict[str, list[int]]) -> Count:
    """``stored`` holds every stored seq per device (with repeats, if any)."""
    lost = sum(len(seqs - set(stored.get(device, []))) for device, seqs in acked.items())
    duplicated = sum(len(values) - len(set(values)) for values in stored.values())
    return Count(
        acknowledged=sum(len(s) for s in acked.values()),
        stored=sum(len(set(v)) for v in stored.values()),
        lost=lost,
        duplicated=duplicated,
    )


def stored_by_device(database_url: str, key: str = "seq") -> dict[str, list[int]]:
    """Every stored value of ``key``, per device, straight from the table (blocking; call from a thread)."""
    sql = "SELECT device_id, value_num FROM telemetry WHERE key = {p}"
    if database_url.startswith("sqlite"):
        path = database_url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
            rows = conn.execute(sql.format(p="?"), (key,)).fetchall()
    else:
        dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)

        async def fetch() -> list[tuple[str, float]]:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                return [tuple(r) for r in await conn.fetch(sql.format(p="$1"), key)]  # type: ignore[misc]
            finally:
                await conn.close()

        rows = asyncio.run(fetch())
    out: dict[str, list[int]] = {}
    for device_id, value in rows:
        out.setdefault(device_id, []).append(int(value))
    return out
