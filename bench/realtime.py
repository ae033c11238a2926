"""Realtime benchmark: many WebSocket subscribers while devices ingest, beside the same run without them.

Starts ``telemetra serve`` (SQLite by default, ``--postgres`` for a fresh PostgreSQL database) as a
subprocess, provisions ``--devices`` devices, then runs two phases of ``--duration`` seconds each at an
offered ``--rate`` of messages/s (HTTP batches of ``--batch`` messages for different devices, admin key):

1. **alone**: no subscribers;
   on PostgreSQL, then **alone + a peer**: a second Telemetra process on the same database, so every commit
   is NOTIFYed to it too (what LISTEN/NOTIFY costs ingest); the subscribers then connect to that peer, so
   every delivery crosses processes;
2. **with subscribers**: ``--subscribers`` WebSocket clients of ``/api/v1/realtime`` in a separate
   process — ``--all-devices`` of them on every device, the rest on one device each.

Every message carries the wall-clock time it was posted (``sent`` key), so a subscriber measures
post→delivery latency: an upper bound of commit→delivery (it includes the HTTP request and the commit).
Each is also run unpaced (as fast as the server takes it) for the ratio of the rates ingest reaches with and
without subscribers. Prints per phase the ingest rate acknowledged, and for phase 2 the messages delivered
per second, latency p50/p99/max, gaps, the ratio of the two unpaced ingest rates and PASS/MISS against
the targets (p99 < 250 ms, ingest ≥ 80 % of its rate alone), with server RSS and CPU.

    .venv/bin/python bench/realtime.py [--rate 2000] [--duration 20] [--subscribers 1000] [--all-devices 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

VENV_BIN = Path(sys.executable).parent
TARGET_P99_MS = 250.0
TARGET_RATIO = 0.80


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_and_cpu(pid: int) -> tuple[float, float]:
    """Resident MB and CPU seconds (user + system) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def pg_database() -> tuple[str, str]:
    import asyncpg

    name = f"telemetra_bench_{secrets.token_hex(4)}"

    async def create() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()

    asyncio.run(create())
    return name, f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()

    asyncio.run(drop())


# --- subscribers (a separate process) ----------------------------------------------------------------


def subscriber_process(url: str, key: str, devices: list[str], n: int, all_devices: int, conn: Any) -> None:
    asyncio.run(_subscribers(url, key, devices, n, all_devices, conn))


async def _subscribers(url: str, key: str, devices: list[str], n: int, all_devices: int, conn: Any) -> None:
    """``n`` clients in one process, as cheap per message as a Python client gets (orjson, no timer per
    message): what this process spends is not the server's latency."""
    import orjson
    import websockets

    latencies: list[float] = []
    counts = {"messages": 0, "gaps": 0, "missed": 0}
    measuring = {"on": False}
    connections: list[Any] = []
    loads, clock = orjson.loads, time.time

    async def one(query: str, ready: asyncio.Event) -> None:
        async with websockets.connect(
            f"{url}/api/v1/realtime?token={key}&types=telemetry{query}", max_queue=None
        ) as ws:
            connections.append(ws)
            ready.set()
            try:
                async for text in ws:
                    message = loads(text)
                    kind = message["type"]
                    if kind == "telemetry":
                        if measuring["on"]:
                            counts["messages"] += 1
                            latencies.append(clock() * 1000 - message["values"]["sent"])
                    elif kind == "gap":
                        counts["gaps"] += 1
                        counts["missed"] += max(0, message["missed"])
            except websockets.ConnectionClosed:
                pass

    readies = []
    tasks = []
    for i in range(n):
        ready = asyncio.Event()
        query = "" if i < all_devices else f"&devices={devices[i % len(devices)]}"
        tasks.append(asyncio.create_task(one(query, ready)))
        readies.append(ready)
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not storm the accept queue
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)
    conn.send("ready")
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)  # "measure"
    measuring["on"] = True
    await loop.run_in_executor(None, conn.recv)  # "pause": still reading, no longer measuring
    measuring["on"] = False
    await loop.run_in_executor(None, conn.recv)  # "stop"
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()
    conn.send({"latencies": latencies[:: max(1, len(latencies) // 200_000)], "all": len(latencies), **counts})


# --- the load ---------------------------------------------------------------------------------------


async def ingest(base: str, key: str, devices: list[str], rate: float, duration: float, batch: int) -> dict[str, float]:
    """Offer ``rate`` messages/s for ``duration`` s; returns what was acknowledged."""
    headers = {"X-API-Key": key, "content-type": "application/json"}
    acked = refused = 0
    seq = 0
    interval = batch / rate if rate > 0 else 0.0  # 0: as fast as the server takes them
    window = 256 if rate > 0 else 8
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as client:
        inflight: set[asyncio.Task[None]] = set()

        async def post(body: bytes, n: int) -> None:
            nonlocal acked, refused
            try:
                r = await client.post("/api/v1/ingest/batch", content=body)
            except httpx.TransportError:
                refused += n  # not acknowledged: counted, not fatal
                return
            if r.status_code == 201:
                acked += n
            else:
                refused += n

        started = time.monotonic()
        next_at = started
        while time.monotonic() - started < duration:
            now_ms = time.time() * 1000
            readings = []
            for _ in range(batch):
                device = devices[seq % len(devices)]
                readings.append({"device_id": device, "ts": int(now_ms), "sent": now_ms, "v": seq})
                seq += 1
            body = json.dumps(readings).encode()
            task = asyncio.create_task(post(body, batch))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif not interval:
                await asyncio.sleep(0)
            if len(inflight) >= window:  # the server is behind (or unpaced): wait for one to come back
                await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*inflight)
        elapsed = time.monotonic() - started
    return {"acked": acked, "refused": refused, "seconds": elapsed, "rate": acked / elapsed}


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--all-devices", type=int, default=5, help="subscribers on every device; the rest on one each")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--postgres", action="store_true")
    parser.add_argument(
        "--compression", action="store_true", help="permessage-deflate on (TELEMETRA_WS_COMPRESSION; off by default)"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="telemetra-bench-rt-"))
    admin = secrets.token_urlsafe(24)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")}
    env.update(
        TELEMETRA_DATA_DIR=str(workdir / "data"),
        TELEMETRA_ADMIN_KEYS=admin,
        TELEMETRA_MQTT_PORT="0",
        TELEMETRA_LOG_LEVEL="WARNING",
        TELEMETRA_WS_QUEUE_SIZE="1000",
        TELEMETRA_WS_COMPRESSION="true" if args.compression else "false",
    )
    pg_name = None
    if args.postgres:
        pg_name, env["TELEMETRA_DATABASE_URL"] = pg_database()
    log = (workdir / "server.log").open("w")
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [str(VENV_BIN / "telemetra"), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the server on {port} did not start; see {workdir / 'server.log'}")

    base = f"http://127.0.0.1:{port}"
    try:
        server = start(port)
        devices = [f"rt-{i:04d}" for i in range(args.devices)]

        async def provision() -> None:
            async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": admin}, timeout=30) as c:
                sem = asyncio.Semaphore(16)

                async def one(d: str) -> None:
                    async with sem:
                        r = await c.post("/api/v1/devices", json={"id": d})
                        assert r.status_code == 201, r.text

                await asyncio.gather(*(one(d) for d in devices))

        asyncio.run(provision())
        print(
            f"backend {'postgres' if args.postgres else 'sqlite'}; {args.devices} devices; "
            f"offered {args.rate:.0f} msg/s "
            f"for {args.duration:.0f} s per phase, batches of {args.batch}; cpus {os.cpu_count()}; "
            f"WebSocket compression {'on' if args.compression else 'off'}; load average {os.getloadavg()[0]:.1f}"
        )

        def phase(label: str, note: str = "", rate: float = args.rate) -> dict[str, float]:
            """One phase of load (``rate`` 0: unpaced), printed with the server's CPU and memory over it."""
            _, cpu_before = rss_and_cpu(server.pid)
            result = asyncio.run(ingest(base, admin, devices, rate, args.duration, args.batch))
            rss, cpu_after = rss_and_cpu(server.pid)
            result["cores"] = (cpu_after - cpu_before) / result["seconds"]
            print(
                f"{label:<18}ingest {result['rate']:8.0f} msg/s acked  (refused {result['refused']:.0f}); "
                f"server CPU {result['cores']:.2f} cores, RSS {rss:.0f} MB{note}"
            )
            return result

        alone = phase("alone:")
        alone_max = phase("alone, unpaced:", rate=0)
        ws_port = port
        if args.postgres:
            # A second process on the same database: now every commit is also NOTIFYed to it (the cost of
            # LISTEN/NOTIFY on ingest), and the subscribers connect to it, so each delivery crosses processes.
            ws_port = free_port()
            start(ws_port)
            time.sleep(1.0)  # its first heartbeat tells the first process it has a peer
            peer = phase("alone + a peer:", "; subscribers below are on the peer")
            print(f"  NOTIFY to a peer costs {peer['cores'] / alone['cores'] - 1:+.0%} server CPU at the same rate")
        parent, child = mp.Pipe()
        subs = mp.Process(
            target=subscriber_process,
            args=(f"ws://127.0.0.1:{ws_port}", admin, devices, args.subscribers, args.all_devices, child),
        )
        subs.start()
        assert parent.poll(180), "subscribers did not connect"
        parent.recv()
        health = httpx.get(f"http://127.0.0.1:{ws_port}/health").json()["checks"]["websocket"]
        parent.send("measure")
        _, subs_cpu_before = rss_and_cpu(subs.pid)
        loaded = phase("with subscribers:")
        _, subs_cpu_after = rss_and_cpu(subs.pid)
        print(f"  subscriber process CPU {(subs_cpu_after - subs_cpu_before) / loaded['seconds']:.2f} cores")
        time.sleep(1.0)  # the last deliveries
        parent.send("pause")
        loaded_max = phase("subscribers, unpaced:", rate=0)
        parent.send("stop")
        result = parent.recv()
        subs.join(30)
        lat = result["latencies"]
        expected = loaded["acked"] * (args.all_devices + (args.subscribers - args.all_devices) / args.devices)
        print(
            f"  subscribers {health['connections']} connected ({args.all_devices} on every device), "
            f"delivered {result['all'] / loaded['seconds']:,.0f} msg/s "
            f"({result['all']:,} of ~{expected:,.0f} expected), "
            f"gaps {result['gaps']} (missed {result['missed']})"
        )
        p50, p99, worst = percentile(lat, 0.50), percentile(lat, 0.99), (lat[-1] if lat else float("nan"))
        print(
            f"  post→delivery latency p50 {p50:.1f} ms  p99 {p99:.1f} ms  max {worst:.1f} ms "
            f"(mean {statistics.fmean(lat) if lat else float('nan'):.1f})"
        )
        # On a shared box the rates follow the CPU the server is given; its CPU per message does not.
        alone_us = alone["cores"] / alone["rate"] * 1e6 if alone["rate"] else float("nan")
        loaded_us = loaded["cores"] / loaded["rate"] * 1e6 if loaded["rate"] else float("nan")
        per_delivery = (
            (loaded_us - alone_us) * loaded["rate"] / (result["all"] / loaded["seconds"])
            if result["all"]
            else float("nan")
        )
        print(
            f"  server CPU per ingested message: {alone_us:.0f} µs alone, {loaded_us:.0f} µs with subscribers "
            f"(fan-out ≈ {per_delivery:.1f} µs per delivery)"
            + ("; on PostgreSQL the deliveries are the peer's, whose CPU this does not count" if args.postgres else "")
        )
        ratio = loaded_max["rate"] / alone_max["rate"] if alone_max["rate"] else float("nan")
        print(f"  unpaced ingest with/without subscribers: {ratio:.2f}; load average now {os.getloadavg()[0]:.1f}")
        ok_p99 = p99 < TARGET_P99_MS
        ok_ratio = ratio >= TARGET_RATIO
        print(
            f"targets: p99 < {TARGET_P99_MS:.0f} ms: {'PASS' if ok_p99 else 'MISS'}; "
            f"ingest ≥ {TARGET_RATIO:.0%} of alone: {'PASS' if ok_ratio else 'MISS'}"
        )
        return 0 if ok_p99 and ok_ratio else 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        log.close()
        if pg_name:
            drop_pg_database(pg_name)


if __name__ == "__main__":
    sys.exit(main())
