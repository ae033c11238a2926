"""The collector's own machinery against a real Mosquitto, with the ingest queue and the interpretation
replaced by recorders: paho on the event loop (plain and TLS), PUBACK only after commit (what the broker
redelivers to the same session says what was acknowledged), reconnection after a broker restart, and a
chunk whose commit fails (the database is down) being held and retried until it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from telemetra.domain.records import Batch, Event
from telemetra.ingest.queue import StorageUnavailable
from telemetra.metrics import Metrics
from telemetra.mqtt.collector import Collector
from telemetra.mqtt.connection import BrokerAddress
from tests.support.mosquitto import MosquittoInstance, start_mosquitto

pytestmark = pytest.mark.mosquitto

TOPIC = "telemetra/dev-{}/telemetry"


class Interpreter:
    """Inbound's interface: one Batch per message, an Event carrying the payload. The first
    ``lookup_failures`` calls fail as Inbound does when the registry (the database) is unreachable."""

    def __init__(self, lookup_failures: int = 0) -> None:
        self.lookup_failures = lookup_failures

    async def to_batches(self, messages: Sequence[tuple[str, bytes]]) -> list[Batch]:
        if self.lookup_failures > 0:
            self.lookup_failures -= 1
            raise ConnectionRefusedError("database unreachable (test)")
        return [Batch(events=[Event(topic.split("/")[1], 0, "m", payload)]) for topic, payload in messages]


class Store:
    """IngestQueue's interface: commits at once, or fails batches that ``fails`` says should fail."""

    def __init__(self, fails: Callable[[Batch], bool] = lambda _b: False) -> None:
        self.payloads: list[bytes] = []
        self.fails = fails
        self.failed = 0

    async def put(self, parts: list[Batch], *, transport: str, messages: int | None = None) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        if any(self.fails(part) for part in parts):
            self.failed += 1
            future.set_exception(StorageUnavailable("refused by the test"))
        else:
            self.payloads.extend(e.payload for part in parts for e in part.events)
            future.set_result(None)
        return future


def collector(
    broker: MosquittoInstance,
    store: Store,
    *,
    client_id: str = "collector-test",
    tls: ssl.SSLContext | None = None,
    inbound: Interpreter | None = None,
) -> Collector:
    return Collector(
        address=BrokerAddress(broker.host, broker.port, None, None, tls is not None),
        client_id=client_id,
        subscriptions=["telemetra/+/telemetry"],
        share_group=None,
        inbound=inbound or Interpreter(),  # type: ignore[arg-type]
        queue=store,
        metrics=Metrics(),
        tls=tls,  # type: ignore[arg-type]
    )


def publish_all(broker: MosquittoInstance, payloads: list[bytes], *, tls: ssl.SSLContext | None = None) -> None:
    """QoS 1, each acknowledged by the broker (so held for the collector's session from then on)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="publisher", protocol=mqtt.MQTTv311)
    if tls is not None:
        client.tls_set_context(tls)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        infos = [client.publish(TOPIC.format(i % 7), p, qos=1) for i, p in enumerate(payloads)]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def until(condition: Callable[[], bool], what: str, limit_s: float = 15.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(c: Collector) -> AsyncIterator[Collector]:
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    instance = start_mosquitto(tmp_path / "mosquitto", dynsec=False)
    yield instance
    instance.stop()


async def redelivered(
    broker: MosquittoInstance, client_id: str = "collector-test", tls: ssl.SSLContext | None = None
) -> list[bytes]:
    """What the broker still holds for the session: messages the collector did not acknowledge."""
    store = Store()
    async with running(collector(broker, store, client_id=client_id, tls=tls)):
        await asyncio.sleep(1.0)
    return store.payloads


async def test_stream_is_stored_in_order_and_acknowledged(broker: MosquittoInstance) -> None:
    store = Store()
    payloads = [b'{"n":%d}' % i + b" " * (i % 300) for i in range(3000)]  # packets of 1- and 2-byte lengths
    async with running(collector(broker, store)) as c:
        assert c.connected
        await asyncio.to_thread(publish_all, broker, payloads)
        await until(lambda: len(store.payloads) >= len(payloads), "every message")
    assert store.payloads == payloads  # one session, one publisher: in order, once
    assert await redelivered(broker) == []  # all acknowledged


async def test_a_chunk_whose_commit_fails_is_held_and_retried_until_stored(broker: MosquittoInstance) -> None:
    outage = [4]  # the first four commits fail, as while the database is down

    def fails(_batch: Batch) -> bool:
        outage[0] -= 1
        return outage[0] >= 0

    store = Store(fails)
    payloads = [b"a%d" % i for i in range(400)]
    async with running(collector(broker, store)):
        await asyncio.to_thread(publish_all, broker, payloads)
        await until(lambda: len(store.payloads) >= len(payloads), "every message", limit_s=30)
    assert store.failed >= 1
    # Each once (chunks already in flight when the first failed may be stored before it is retried).
    assert sorted(store.payloads) == sorted(payloads) and len(set(store.payloads)) == len(payloads)
    assert await redelivered(broker) == []


async def test_messages_are_held_not_rejected_while_the_registry_is_unreachable(broker: MosquittoInstance) -> None:
    store = Store()
    payloads = [b"m%d" % i for i in range(50)]
    async with running(collector(broker, store, inbound=Interpreter(lookup_failures=2))):
        await asyncio.to_thread(publish_all, broker, payloads)
        await until(lambda: len(store.payloads) >= len(payloads), "every message", limit_s=30)
    assert sorted(store.payloads) == sorted(payloads)  # stored as what they are, not as rejects
    assert await redelivered(broker) == []


async def test_nothing_is_acknowledged_before_commit(broker: MosquittoInstance) -> None:
    store = Store(lambda _batch: True)  # the database refuses everything
    async with running(collector(broker, store)):
        await asyncio.to_thread(publish_all, broker, [b"x1", b"x2", b"x3"])
        await until(lambda: store.failed >= 2, "commit attempts")
    assert sorted(await redelivered(broker)) == [b"x1", b"x2", b"x3"]


async def test_reconnects_after_a_broker_restart_and_gets_what_was_held(broker: MosquittoInstance) -> None:
    store = Store()
    c = collector(broker, store)
    async with running(c):
        await asyncio.to_thread(publish_all, broker, [b"before"])
        await until(lambda: store.payloads == [b"before"], "the first message")
        await asyncio.sleep(0.3)  # its PUBACK written
        lost = asyncio.Event()  # seen through paho's callback: the collector may be back before restart() returns
        on_disconnect = c.client.on_disconnect
        assert on_disconnect is not None

        def noticed(*args: Any) -> None:
            lost.set()
            on_disconnect(*args)

        c.client.on_disconnect = noticed
        restarted = await asyncio.to_thread(broker.restart)
        try:
            await asyncio.wait_for(lost.wait(), 15)
            # Published while the collector is away: the broker holds it for the persistent session.
            await asyncio.to_thread(publish_all, restarted, [b"while away"])
            await until(lambda: c.connected, "the collector to reconnect")
            await until(lambda: b"while away" in store.payloads, "the held message")
            await asyncio.to_thread(publish_all, restarted, [b"after"])
            await until(lambda: b"after" in store.payloads, "a message after reconnecting")
        finally:
            broker.process = restarted.process  # the fixture stops the running one
    assert store.payloads == [b"before", b"while away", b"after"]


def make_cert(workdir: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed (needed to make the test broker's certificate)")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_tls(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    tls_broker = start_mosquitto(tmp_path / "mosquitto", dynsec=False, extra_conf=f"certfile {cert}\nkeyfile {key}\n")
    try:
        context = ssl.create_default_context(cafile=str(cert))
        store = Store()
        payloads = [b"tls-%d" % i + b"z" * (i * 7 % 20_000) for i in range(400)]  # TLS records split packets
        async with running(collector(tls_broker, store, tls=context)) as c:
            assert c.connected
            await asyncio.to_thread(publish_all, tls_broker, payloads, tls=context)
            await until(lambda: len(store.payloads) >= len(payloads), "every message")
        assert store.payloads == payloads
        assert await redelivered(tls_broker, tls=context) == []
    finally:
        tls_broker.stop()
