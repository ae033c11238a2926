"""SIGKILL of Telemetra under HTTP load loses nothing it acknowledged (2xx) and stores nothing twice.

A real ``telemetra serve`` subprocess; device threads post numbered readings one after another — single
readings to ``/api/v1/ingest`` and 25-reading batches to ``/api/v1/ingest/batch`` — and count a reading
as acknowledged only when its answer was 2xx. Mid-stream the process is SIGKILLed: requests in flight
get no answer and are sent again, the same readings, once the restarted process answers (as firmware
retries). Whatever had been acknowledged by the kill must already be in the database (the answer comes
after commit), and at the end every acknowledged reading is stored exactly once — a reading committed
whose answer the kill swallowed comes again with the same device timestamp and collapses on the
primary key.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.mqtt.conftest import TelemetraProcess, create_device_over_http
from tests.reliability.fleet import count, stored_by_device
from tests.reliability.support import database
from tests.support.mosquitto import free_port

SINGLE_DEVICES = 4
BATCH_DEVICES = 2
BATCH = 25
PER_DEVICE = 400  # readings


@dataclass
class Poster:
    device_id: str
    key: str
    batch: int  # readings per request (1: /api/v1/ingest)
    acked: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    unanswered: int = 0  # requests the kill (or the restart) left without an answer
    refused: list[str] = field(default_factory=list)  # answers neither 2xx nor 503

    def snapshot(self) -> set[int]:
        with self.lock:
            return set(self.acked)


def post_all(base_url: str, poster: Poster, base_ms: int, stop: threading.Event) -> None:
    seq = 0
    with httpx.Client(base_url=base_url, headers={"X-API-Key": poster.key}, timeout=10) as client:
        while seq < PER_DEVICE and not stop.is_set():
            seqs = list(range(seq, min(seq + poster.batch, PER_DEVICE)))
            readings = [{"ts": base_ms + s, "seq": s} for s in seqs]
            try:
                if poster.batch == 1:
                    r = client.post("/api/v1/ingest", json=readings[0])
                else:
                    r = client.post("/api/v1/ingest/batch", json=readings)
            except httpx.HTTPError:
                poster.unanswered += 1
                stop.wait(0.05)  # the server is being restarted: retry the same readings shortly
                continue
            if 200 <= r.status_code < 300:
                with poster.lock:
                    poster.acked.update(seqs)
                seq = seqs[-1] + 1
            elif r.status_code == 503:
                stop.wait(0.05)
            else:
                poster.refused.append(f"{r.status_code} {r.text[:200]}")
                return


@pytest.mark.parametrize("db", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
async def test_sigkill_under_http_load_loses_nothing_acknowledged(db: str, tmp_path: Path) -> None:
    async with database(db, tmp_path) as url:
        await asyncio.to_thread(scenario, url, tmp_path)


def scenario(database_url: str, tmp_path: Path) -> None:
    telemetra = TelemetraProcess(
        tmp_path / "telemetra",
        port=free_port(),
        env={"TELEMETRA_DATABASE_URL": database_url, "TELEMETRA_MQTT_PORT": str(free_port())},
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        telemetra.start()
        telemetra.wait_healthy()
        posters = [Poster(f"web-{i}", create_device_over_http(telemetra, f"web-{i}"), 1) for i in range(SINGLE_DEVICES)]
        posters += [
            Poster(f"bat-{i}", create_device_over_http(telemetra, f"bat-{i}"), BATCH) for i in range(BATCH_DEVICES)
        ]
        base_ms = int(time.time() * 1000) - 3_600_000
        threads = [
            threading.Thread(target=post_all, args=(telemetra.base_url, p, base_ms, stop), daemon=True) for p in posters
        ]
        for thread in threads:
            thread.start()
        total = PER_DEVICE * len(posters)
        deadline = time.monotonic() + 60
        while sum(len(p.snapshot()) for p in posters) < total // 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        telemetra.kill()
        acked_at_kill = {p.device_id: p.snapshot() for p in posters}
        stored_at_kill = count(acked_at_kill, stored_by_device(database_url))
        telemetra.start()
        telemetra.wait_healthy()
        for thread in threads:
            thread.join(timeout=120)
        final = count({p.device_id: p.snapshot() for p in posters}, stored_by_device(database_url))
        unanswered = sum(p.unanswered for p in posters)
        print(f"at the kill: {stored_at_kill}; at the end: {final}; requests left unanswered by the kill: {unanswered}")
        for poster in posters:
            assert not poster.refused, f"{poster.device_id}: {poster.refused[:3]}"
        # The kill came mid-stream and some requests were in flight.
        assert 0 < stored_at_kill.acknowledged < total
        assert unanswered > 0
        # Everything answered 2xx before the kill had been committed before its answer.
        assert stored_at_kill.lost == 0, stored_at_kill
        assert final.lost == 0 and final.duplicated == 0, final
        assert final.acknowledged == final.stored == total
    except BaseException:
        print(telemetra.output())
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        telemetra.kill()
