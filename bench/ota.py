"""OTA bench: upload a large image, then serve it to many concurrent ranged downloaders.

    .venv/bin/python bench/ota.py [--size-mb 200] [--downloaders 50] [--range-mb 4] [--json out.json]

What it does:

1. Starts ``telemetra serve`` as a subprocess (SQLite in a temporary data directory, MQTT off, logs at
   WARNING) and reads its ``VmRSS`` once it is idle and warm (a few requests answered): the baseline.
2. Writes a random image of ``--size-mb`` to disk (never whole in this process's memory either) and
   uploads it through ``POST /api/v1/firmware/upload`` (multipart, streamed by httpx), sampling the
   server's RSS every 50 ms.
3. Starts ``--downloaders`` clients at once. Each one fetches the whole image in ``--range-mb`` byte
   ranges over one keep-alive HTTP/1.1 connection, reading the raw socket the way the iotmesh gateway
   does (Content-Length, then exactly that many bytes: nothing chunked or compressed is accepted), and
   checks the SHA-256 of what it got. RSS is sampled every 50 ms.
4. Prints throughput (MB/s served, ranges/s, p50/p99 per range), the server's CPU seconds, and its RSS:
   baseline, peak during upload, peak during downloads, and the growth over the baseline, judged
   against the target (growth < 50 MB).

The load generator shares the machine with the server (2 cores here): the throughput is a floor, the
RSS growth is what the target is about.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

RSS_TARGET_MB = 50.0
SAMPLE_S = 0.05


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sampler:
    """The server's RSS every SAMPLE_S seconds, in a thread, while a phase runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(SAMPLE_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, RuntimeError):
            self.peak = max(self.peak, rss_mb(self.pid))


def write_image(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


async def download(port: int, path: str, size: int, range_bytes: int, latencies: list[float]) -> str:
    """The whole image in ranges over one raw keep-alive connection; returns its SHA-256."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    digest = hashlib.sha256()
    try:
        for start in range(0, size, range_bytes):
            end = min(start + range_bytes, size) - 1
            began = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nRange: bytes={start}-{end}\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            if not head.startswith(b"http/1.1 206"):
                raise RuntimeError(f"expected 206, got {head[:40]!r}")
            if b"transfer-encoding" in head or b"content-encoding" in head:
                raise RuntimeError("a ranged answer must be raw (no chunked encoding, no compression)")
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if length != end - start + 1:
                raise RuntimeError(f"Content-Length {length} for a {end - start + 1}-byte range")
            while length:
                chunk = await reader.read(min(length, 1 << 18))
                if not chunk:
                    raise RuntimeError("connection closed mid-range")
                digest.update(chunk)
                length -= len(chunk)
            latencies.append(time.perf_counter() - began)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return digest.hexdigest()


async def downloads(port: int, path: str, size: int, range_bytes: int, clients: int) -> tuple[list[str], list[float]]:
    latencies: list[float] = []
    digests = await asyncio.gather(*(download(port, path, size, range_bytes, latencies) for _ in range(clients)))
    return list(digests), latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--downloaders", type=int, default=50)
    parser.add_argument("--range-mb", type=float, default=4.0)
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    range_bytes = int(args.range_mb * 1024 * 1024)
    binary = Path(sys.executable).with_name("telemetra")
    key = secrets.token_urlsafe(32)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="telemetra-ota-bench-") as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_")} | {
            "TELEMETRA_ADMIN_KEYS": key,
            "TELEMETRA_DATA_DIR": str(work / "data"),
            "TELEMETRA_MQTT_PORT": "0",
            "TELEMETRA_LOG_LEVEL": "WARNING",
            "TELEMETRA_OTA_MAX_FIRMWARE_BYTES": str(size + 1024),
        }
        log = (work / "server.log").open("wb")
        server = subprocess.Popen(
            [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=log,
            cwd=work,
        )
        try:
            return run(server, port, key, work, size, range_bytes, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()


def run(
    server: subprocess.Popen[bytes], port: int, key: str, work: Path, size: int, range_bytes: int, args: Any
) -> int:
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": key}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(30, write=None, read=600)) as c:
        deadline = time.monotonic() + 30
        while True:
            try:
                if c.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                print("server did not start:", (work / "server.log").read_text()[-2000:], file=sys.stderr)
                return 1
            time.sleep(0.1)
        for _ in range(20):  # warm: routes, the pool, the OTA code paths
            c.get("/api/v1/firmware")
            c.get("/ota/manifest.json")
        time.sleep(0.5)
        baseline = rss_mb(server.pid)

        image = work / "image.bin"
        sha = write_image(image, size)
        cpu0 = cpu_s(server.pid)
        began = time.perf_counter()
        with Sampler(server.pid) as upload_rss, image.open("rb") as handle:
            r = c.post(
                "/api/v1/firmware/upload",
                files={"file": ("bench.bin", handle)},
                data={"model": "bench", "version": "1.0.0"},
            )
        upload_s = time.perf_counter() - began
        upload_cpu = cpu_s(server.pid) - cpu0
        if r.status_code != 200:
            print("upload failed:", r.status_code, r.text[:500], file=sys.stderr)
            return 1
        fw = r.json()
        assert fw["sha256"] == sha and fw["size_bytes"] == size, "the stored digest differs from the image's"
    image.unlink()  # the server has its own copy; the downloads are checked against the digest

    cpu0 = cpu_s(server.pid)
    began = time.perf_counter()
    with Sampler(server.pid) as download_rss:
        digests, latencies = asyncio.run(
            downloads(port, f"/api/v1/firmware/{fw['id']}/download", size, range_bytes, args.downloaders)
        )
    elapsed = time.perf_counter() - began
    download_cpu = cpu_s(server.pid) - cpu0
    after = rss_mb(server.pid)
    bad = sum(d != sha for d in digests)
    served = size * args.downloaders
    latencies.sort()
    figures = {
        "machine": f"{os.cpu_count()} cores",
        "image_mb": args.size_mb,
        "downloaders": args.downloaders,
        "range_mb": args.range_mb,
        "upload_s": round(upload_s, 2),
        "upload_mb_s": round(args.size_mb / upload_s, 1),
        "upload_server_cpu_s": round(upload_cpu, 2),
        "download_s": round(elapsed, 2),
        "served_mb": round(served / 2**20),
        "download_mb_s": round(served / 2**20 / elapsed, 1),
        "ranges": len(latencies),
        "ranges_s": round(len(latencies) / elapsed, 1),
        "range_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "range_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1),
        "download_server_cpu_s": round(download_cpu, 2),
        "digest_mismatches": bad,
        "rss_baseline_mb": round(baseline, 1),
        "rss_upload_peak_mb": round(upload_rss.peak, 1),
        "rss_download_peak_mb": round(download_rss.peak, 1),
        "rss_after_mb": round(after, 1),
        "rss_growth_mb": round(max(upload_rss.peak, download_rss.peak) - baseline, 1),
    }
    verdict = "PASS" if figures["rss_growth_mb"] < RSS_TARGET_MB and bad == 0 else "MISS"
    print(f"OTA bench on {figures['machine']}: a {args.size_mb} MB image, {args.downloaders} downloaders, "
          f"{args.range_mb:g} MB ranges")  # fmt: skip
    print(f"  upload    {figures['upload_s']:>7.2f} s  {figures['upload_mb_s']:>7.1f} MB/s   "
          f"server CPU {figures['upload_server_cpu_s']:.2f} s")  # fmt: skip
    print(f"  download  {figures['download_s']:>7.2f} s  {figures['download_mb_s']:>7.1f} MB/s   "
          f"{figures['served_mb']:,} MB in {figures['ranges']:,} ranges ({figures['ranges_s']:.1f}/s), "
          f"p50 {figures['range_p50_ms']} ms, p99 {figures['range_p99_ms']} ms, "
          f"server CPU {figures['download_server_cpu_s']:.2f} s")  # fmt: skip
    print(f"  digests   {args.downloaders - bad}/{args.downloaders} match the upload's SHA-256")
    print(f"  RSS MB    baseline {figures['rss_baseline_mb']}, upload peak {figures['rss_upload_peak_mb']}, "
          f"download peak {figures['rss_download_peak_mb']}, after {figures['rss_after_mb']}")  # fmt: skip
    print(f"  RSS growth {figures['rss_growth_mb']} MB (target < {RSS_TARGET_MB:g} MB): {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures | {"verdict": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
