"""Webhooks under ingest load: does delivery slow ingest, and how far behind does it run?

Per backend, one Telemetra server (``telemetra serve``, as ``http_ingest.py`` starts it) with a threshold
rule that the benchmark's readings cross back and forth (``temperature > 22``, cleared at 21.9: the wrk
script's values ramp 15 → 29.9 per device), so batch ingest raises and clears alerts all the time. The HTTP
batch scenario of ``http_ingest.py`` then runs three times: without a webhook, with one webhook taking
every event (``*``) to a local receiver (a ``ThreadingHTTPServer`` in this process, answering 200), and
without again. The ratio is the webhook run's rate over the mean of the two runs around it (so drift on a
shared machine counts against neither side). Printed beside it: events delivered, the delivery lag
(receipt − the event's commit time) p50/p99 and how long the log took to drain once ingest stopped, and
whether every delivery arrived exactly once (delivery ids unique, none left pending or failed).

    .venv/bin/python bench/webhooks.py [--backends sqlite,postgres] [--duration 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import http_ingest as hi

TARGET_RATIO = 0.8  # ingest with webhooks at least 80 % of without


class Receiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, str, str]] = []  # (received at, delivery id, created_at)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                created = json.loads(body)["created_at"]
                with receiver.lock:
                    receiver.arrivals.append((time.time(), self.headers["X-Telemetra-Delivery"], created))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)

    def lags_ms(self) -> list[float]:
        with self.lock:
            return [(at - _epoch(created)) * 1000 for at, _, created in self.arrivals]

    def duplicates(self) -> int:
        with self.lock:
            ids = [d for _, d, _ in self.arrivals]
        return len(ids) - len(set(ids))


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def call(server: hi.Server, key: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    req = urllib.request.Request(f"{server.url}{path}", data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_backend(backend: str, opts: hi.Options, tmp: Path) -> dict[str, Any]:
    admin = secrets.token_urlsafe(32)
    keys_file = tmp / f"keys-{backend}.txt"
    receiver = Receiver()
    runs: dict[str, hi.Result] = {}
    ppr = hi.BATCH_MESSAGES * hi.KEYS_PER_MESSAGE
    with hi.telemetra_server(backend, tmp, admin, tag="-webhooks") as server:
        keys_file.write_text("\n".join(hi.provision(server, admin, hi.DEVICES)) + "\n")
        rule = {"name": "hot", "key": "temperature", "op": ">", "value": 22, "clear_value": 21.9}
        call(server, admin, "POST", "/api/v1/rules", rule)
        hook: dict[str, Any] | None = None
        for n, name in enumerate(("without", "with", "without again")):
            if name == "with":
                hook = call(server, admin, "POST", "/api/v1/webhooks", {"url": receiver.url, "events": ["*"]})
            elif hook is not None:
                call(server, admin, "PATCH", f"/api/v1/webhooks/{hook['id']}", {"enabled": False})
            print(f"[{backend}] batch ingest, {name} a webhook", flush=True)

            def args(day: int, n: int = n) -> list[str]:
                base = int(time.time() * 1000) - (10 * (n + 1) + day) * hi.DAY_MS
                return ["batch", str(base), str(opts.threads), str(keys_file)]

            runs[name] = hi.measure(server, hi.Result(backend, "telemetra", "batch", ppr, ppr), args, opts, tmp)
            if name == "with":
                stopped = time.monotonic()
                assert hook is not None
                drained = _drain(server, admin, hook["id"])
                drain_s = time.monotonic() - stopped if drained else float("nan")
        assert hook is not None
        log = call(server, admin, "GET", f"/api/v1/webhooks/{hook['id']}")["deliveries"]
    without = statistics.mean([runs["without"].points_s, runs["without again"].points_s])
    lags = receiver.lags_ms()
    return {
        "backend": backend,
        "points_s_without": without,
        "points_s_with": runs["with"].points_s,
        "ratio": runs["with"].points_s / without if without else 0.0,
        # Server CPU per request hardly moves with what else runs on the machine: the steadier comparison.
        "cpu_without": statistics.mean(
            [runs["without"].server_cpu_ms_per_req, runs["without again"].server_cpu_ms_per_req]
        ),
        "cpu_with": runs["with"].server_cpu_ms_per_req,
        "delivered": receiver.count(),
        "duplicates": receiver.duplicates(),
        "log": log,
        "lag_p50_ms": percentile(lags, 0.5),
        "lag_p99_ms": percentile(lags, 0.99),
        "drain_s": drain_s,
        "stored_ok": all(r.storage_ok for r in runs.values()),
    }


def _drain(server: hi.Server, admin: str, hook_id: int, timeout: float = 300.0) -> bool:
    """Wait until the webhook has nothing pending (the deliveries caught up with the events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = call(server, admin, "GET", f"/api/v1/webhooks/{hook_id}")["deliveries"]
        if counts["pending"] == 0 and counts["delivered"] > 0:
            return True
        time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    a = parser.parse_args(argv)
    hi.require_wrk()
    opts = hi.Options(a.backends.split(","), a.duration, a.warmup, a.connections, 1, None)
    print(hi.machine_line())
    results = []
    with tempfile.TemporaryDirectory(prefix="telemetra-bench-webhooks-") as tmp:
        for backend in opts.backends:
            results.append(bench_backend(backend, opts, Path(tmp)))
    print()
    print(
        "backend   points/s without  with webhook  ratio  CPU ms/req without/with  delivered  dup  pending/failed"
        "  lag p50/p99 ms  drain s"
    )
    for r in results:
        log = r["log"]
        print(
            f"{r['backend']:<9} {r['points_s_without']:>16,.0f}  {r['points_s_with']:>12,.0f}  {r['ratio']:>5.2f}"
            f"  {r['cpu_without']:>16.2f}/{r['cpu_with']:<7.2f}"
            f"  {r['delivered']:>9,}  {r['duplicates']:>3}  {log['pending']:>7}/{log['failed']:<6}"
            f"  {r['lag_p50_ms']:>6.0f}/{r['lag_p99_ms']:<7.0f}  {r['drain_s']:>7.1f}"
            + ("" if r["stored_ok"] else "  STORAGE MISMATCH")
        )
    for r in results:
        verdict = "PASS" if r["ratio"] >= TARGET_RATIO else "MISS"
        print(f"{r['backend']}: ingest with a webhook {r['ratio']:.2f} of without (target ≥ {TARGET_RATIO}): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
