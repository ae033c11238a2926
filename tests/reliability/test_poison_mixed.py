"""Poison mixed into good MQTT traffic on PostgreSQL: refused, recorded and acknowledged; nothing else held.

A real ``telemetra serve`` on PostgreSQL, with each broker (the embedded one, and a private Mosquitto with
dynamic security and the collector). A fleet of paho devices publishes numbered QoS 1 telemetry; every
fifth message of the "bad" devices is poison instead — a NUL in a text value (JSON ``\\u0000``, which
PostgreSQL cannot store), a raw NUL byte, invalid UTF-8, a key of 100,000 characters, nesting 1,000 deep
on telemetry, state and an event. Then:

- every message, poison included, is acknowledged (PUBACK): poison never holds up a window;
- every good message, of the bad devices as of their neighbours, is stored exactly once (lost = 0,
  duplicated = 0);
- every poison message is a rejected-message record, with its reason and its payload in a storable
  form (no NUL), and counted in ``telemetra_rejected_messages_total``;
- /health stays healthy (ingest ok), and the log does not grow with the number of poison messages.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import postgres_database
from tests.mqtt.conftest import TelemetraProcess, create_device_over_http
from tests.reliability.fleet import Fleet, count, stored_by_device
from tests.support.mosquitto import MosquittoInstance, free_port, start_mosquitto

pytestmark = [pytest.mark.postgres]

GOOD_DEVICES = 3
BAD_DEVICES = 3
PER_DEVICE = 300
POISON_EVERY = 5  # seq % POISON_EVERY == 2 is poison, on the bad devices


def deep(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def poison_kinds(device_id: str, ts: int) -> list[tuple[str, str, bytes]]:
    """(kind, topic, payload) — each refused for a different reason."""
    telemetry = f"telemetra/{device_id}/telemetry"
    return [
        ("nul-escape", telemetry, b'{"ts":%d,"label":"a\\u0000b"}' % ts),
        ("nul-byte", telemetry, b'{"ts":%d,"label":"a\x00b"}' % ts),
        ("invalid-utf8", telemetry, b'{"ts":%d,"label":"\xff\xfe\xc3"}' % ts),
        ("huge-key", telemetry, b'{"ts":%d,"%s":1}' % (ts, b"k" * 100_000)),
        ("deep-telemetry", telemetry, deep(1000)),
        ("deep-state", f"telemetra/{device_id}/state", deep(1000)),
        # 1,000 deep: still JSON to the parser (past 1,024 it is not JSON, and an event keeps it as text).
        ("deep-event", f"telemetra/{device_id}/event/boot", deep(1000)),
    ]


def is_poison(device_id: str, seq: int) -> bool:
    return device_id.startswith("bad-") and seq % POISON_EVERY == 2


@pytest.mark.parametrize("broker", ["embedded", pytest.param("mosquitto", marks=pytest.mark.mosquitto)])
async def test_poison_mixed_with_good_traffic_is_refused_and_holds_nothing_up(broker: str, tmp_path: Path) -> None:
    async with postgres_database() as url:
        mosquitto = start_mosquitto(tmp_path / "mosquitto", dynsec=True) if broker == "mosquitto" else None
        try:
            await asyncio.to_thread(scenario, url, mosquitto, tmp_path)
        finally:
            if mosquitto is not None:
                mosquitto.stop()


def scenario(url: str, mosquitto: MosquittoInstance | None, tmp_path: Path) -> None:
    env = {"TELEMETRA_DATABASE_URL": url, "TELEMETRA_REJECTED_PER_MINUTE": "100000"}
    if mosquitto is None:
        host, port = "127.0.0.1", free_port()
        env["TELEMETRA_MQTT_PORT"] = str(port)
    else:
        host, port = mosquitto.host, mosquitto.port
        env.update(
            TELEMETRA_MQTT_URL=f"mqtt://telemetra-svc:{secrets.token_urlsafe(18)}@{host}:{port}",
            TELEMETRA_MQTT_DYNSEC_USERNAME=mosquitto.admin_username,
            TELEMETRA_MQTT_DYNSEC_PASSWORD=mosquitto.admin_password,
        )
    telemetra = TelemetraProcess(tmp_path / "telemetra", port=free_port(), env=env)
    fleet: Fleet | None = None
    sent_poison: Counter[str] = Counter()
    try:
        telemetra.start()
        telemetra.wait_healthy()
        ids = [f"good-{i}" for i in range(GOOD_DEVICES)] + [f"bad-{i}" for i in range(BAD_DEVICES)]
        credentials = [(d, create_device_over_http(telemetra, d)) for d in ids]
        poison_ts = 1_700_000_000_000

        def payloads(device_id: str, seq: int) -> tuple[str | None, bytes | None]:
            if not is_poison(device_id, seq):
                return None, None  # the fleet's own numbered message
            kinds = poison_kinds(device_id, poison_ts + seq)
            kind, topic, payload = kinds[(seq // POISON_EVERY) % len(kinds)]
            sent_poison[kind] += 1
            return topic, payload

        # Device client ids are the device ids on Mosquitto (bound to their device).
        fleet = Fleet(host, port, credentials, per_device=PER_DEVICE, payloads=payloads, client_id_prefix="")
        assert fleet.wait_acked(fleet.total, timeout=90) == fleet.total, f"only {fleet.acked} of {fleet.total} acked"
        poison_total = sum(sent_poison.values())
        acked = fleet.acked_by_device()
        good_acked = {d: {s for s in seqs if not is_poison(d, s)} for d, seqs in acked.items()}
        expected_good = sum(map(len, good_acked.values()))
        final = _wait_stored(url, good_acked, expected_good)
        rejected = asyncio.run(_rejected(url))
        rejected_metric = telemetra.metric("telemetra_rejected_messages_total")
        health = telemetra.wait_healthy(timeout=5)
        log_text = (telemetra.workdir / f"{telemetra.name}.1.log").read_text(errors="replace")
        noisy = [line for line in log_text.splitlines() if "[warning" in line or "[error" in line]
        reasons = Counter((r["topic"].split("/")[2], r["reason"][:70]) for r in rejected)
        print(
            f"{final}; poison sent {dict(sent_poison)} ({poison_total}); rejected records {len(rejected)}, "
            f"metric {rejected_metric:.0f}; reasons {dict(reasons)}\n"
            f"log: {len(noisy)} warnings/errors:\n" + "\n".join(line[:300] for line in noisy)
        )
        assert set(sent_poison) == {k for k, _, _ in poison_kinds("x", 0)}, "not every kind of poison was sent"
        assert final.lost == 0 and final.duplicated == 0, final
        assert final.stored == final.acknowledged == expected_good == fleet.total - poison_total
        # Every poison message is a record of its own, in storable form, and counted.
        assert len(rejected) == poison_total, (len(rejected), poison_total)
        assert {r["device_id"] for r in rejected} == {f"bad-{i}" for i in range(BAD_DEVICES)}
        assert all(r["reason"] and "\x00" not in r["payload"] for r in rejected)
        assert rejected_metric >= poison_total
        assert health["checks"]["ingest"]["status"] == "ok", health
        # Poison is logged per kind and device at most once a minute, not once per message.
        assert len(noisy) <= len(sent_poison) * BAD_DEVICES, noisy
        assert "Traceback" not in log_text
    except BaseException:
        print(telemetra.output())
        if mosquitto is not None:
            print("---- mosquitto ----\n" + mosquitto.log()[-3000:])
        raise
    finally:
        if fleet is not None:
            fleet.close()
        telemetra.kill()


def _wait_stored(url: str, acked: dict[str, set[int]], expected: int) -> Any:
    deadline = time.monotonic() + 30
    while True:
        stored = stored_by_device(url)
        result = count(acked, {d: stored.get(d, []) for d in acked})
        if result.stored >= expected or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


async def _rejected(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=5)
    try:
        return list(await conn.fetch("SELECT device_id, topic, reason, payload FROM rejected_messages"))
    finally:
        await conn.close()
