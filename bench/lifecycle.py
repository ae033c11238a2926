"""Data lifecycle benchmark (issue 10): what rollups cost at ingest, what they buy at query time, and
how long retention takes to drop a month.

1. **ingest**: HTTP batch ingest (wrk, 100 messages × 3 keys per request, as ``http_ingest.py``'s batch
   scenario) against Telemetra with rollups off and on, alternated (off, on, on, off, …) so a drift of the
   shared machine does not favour one side; prints points/s per run, the medians and on ÷ off
   (target ≥ 0.80).
2. **aggregate**: ``--devices`` × 3 keys × ``--days`` at 1-minute resolution loaded straight into the
   database (SQL ``generate_series``), the rollups filled as the migration does, then sequential
   ``GET /aggregate`` through HTTP: 1-day buckets over the whole range and 1-hour buckets over the last
   30 days, p50/p99 (target on PostgreSQL: p99 < 50 ms), beside the same requests forced to the raw
   points (a start 1 ms off the tier edges) as the baseline of the same run.

    .venv/bin/python bench/lifecycle.py [--backends postgres,sqlite] [--parts ingest,aggregate]
        [--rounds 2] [--duration 10] [--devices 3] [--days 365] [--requests 100]

The issue asks for 100 devices over a year (158 M rows); an aggregate reads one device, so its latency
depends on a device's rows, not on the fleet's: the default loads 3 devices (4.7 M rows) to fit a shared
2-core box. Say ``--devices 100`` where the disk and the hour allow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import http_ingest as hi

DAY_MS = 86_400_000
HOUR_MS = 3_600_000
KEYS = ("temperature", "humidity", "voltage")
TARGET_INGEST_RATIO = 0.80
TARGET_P99_MS = 50.0
MIGRATION = Path(hi.ROOT) / "src/telemetra/migrations/versions/0006_lifecycle.py"


def _backfill_sql() -> list[str]:
    namespace: dict[str, Any] = {}
    exec(compile(MIGRATION.read_text(), str(MIGRATION), "exec"), namespace)  # the migration's own SQL
    return [namespace["_BACKFILL_1M"], namespace["_BACKFILL_1H"]]


# --- 1. ingest ---------------------------------------------------------------------------------------


def ingest_part(
    backend: str, opts: argparse.Namespace, tmp: Path
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Points/s and server CPU ms per request, per mode: the rate moves with whatever else the shared
    machine runs, the CPU per request much less, so both are printed."""
    rates: dict[str, list[float]] = {"off": [], "on": []}
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    order = [("off", "on") if r % 2 == 0 else ("on", "off") for r in range(opts.rounds)]
    wopts = hi.Options([backend], opts.duration, opts.warmup, opts.connections, 1, None)
    run = 0
    for pair in order:
        for mode in pair:
            run += 1
            admin_key = secrets.token_urlsafe(32)
            env = {"TELEMETRA_ROLLUPS": "true" if mode == "on" else "false"}
            with hi.telemetra_server(backend, tmp, admin_key, env, tag=f"-{run}") as server:
                keys_file = tmp / f"keys-{backend}-{run}.txt"
                keys_file.write_text("\n".join(hi.provision(server, admin_key, hi.DEVICES)) + "\n")

                def args(day: int, keys_file: Path = keys_file) -> list[str]:
                    base = int(time.time() * 1000) - (5 + day) * DAY_MS
                    return ["batch", str(base), "1", str(keys_file)]

                ppr = hi.BATCH_MESSAGES * hi.KEYS_PER_MESSAGE
                result = hi.measure(server, hi.Result(backend, "telemetra", "batch", ppr, ppr), args, wopts, tmp)
            rates[mode].append(result.points_s)
            cpu[mode].append(result.server_cpu_ms_per_req)
            print(
                f"[{backend}] ingest run {run}: rollups {mode:<3} {result.points_s:>9,.0f} points/s "
                f"server CPU {result.server_cpu_ms_per_req:.2f} ms/req (cores srv {result.cpu.get('server', 0):.2f} "
                f"pg {result.cpu.get('postgres', 0):.2f} other {result.cpu.get('other', 0):.2f}) "
                f"p50 {result.p50_ms:.1f} ms p99 {result.p99_ms:.1f} ms errors {result.errors} "
                f"stored {hi.storage_cell(result)}",
                flush=True,
            )
    return rates, cpu


# --- 2. aggregate ------------------------------------------------------------------------------------


_LATEST = (
    "INSERT INTO latest (device_id, key, ts, value_num, value_text, vtype) "
    "SELECT device_id, key, max(ts), 0, NULL, 0 FROM telemetry GROUP BY device_id, key"
)


def _load_postgres(database: str, devices: int, start: int, end: int) -> None:
    from telemetra.storage import partitions

    keys = ",".join(f"'{k}'" for k in KEYS)
    # As a server that ran through the year would have them: one partition per month.
    year, month = partitions.month_start(start)
    while partitions.month_ms(year, month) < end:
        hi.psql(partitions.create_sql(year, month), database)
        year, month = partitions.next_month(year, month)
    hi.psql(
        "INSERT INTO telemetry (device_id, key, ts, value_num, value_text, vtype) "
        f"SELECT 'bench-' || lpad(d::text, 3, '0'), k, ts, 20 + 5 * sin(ts / 3.6e6) + d, NULL, 0 "
        f"FROM generate_series(0, {devices - 1}) AS d, unnest(ARRAY[{keys}]) AS k, "
        f"generate_series({start}::int8, {end - 60_000}::int8, 60000::int8) AS ts",
        database,
    )
    for sql in [*_backfill_sql(), _LATEST]:
        hi.psql(sql, database)
    hi.psql("VACUUM ANALYZE", database)


def _load_sqlite(path: Path, devices: int, start: int, end: int) -> None:
    db = sqlite3.connect(path, timeout=60)
    try:
        values = ", ".join(f"('{k}')" for k in KEYS)
        db.execute(
            f"""
            WITH RECURSIVE d(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM d WHERE n < {devices - 1}),
                 t(ts) AS (SELECT {start} UNION ALL SELECT ts + 60000 FROM t WHERE ts < {end - 60_000}),
                 k(key) AS (VALUES {values})
            INSERT INTO telemetry (device_id, key, ts, value_num, value_text, vtype)
            SELECT printf('bench-%03d', n), key, ts, 20 + 5 * sin(ts / 3.6e6) + n, NULL, 0 FROM d, k, t
            ORDER BY 1, 2, 3
            """
        )
        for sql in [*_backfill_sql(), _LATEST]:
            db.execute(sql)
        db.commit()
        db.execute("ANALYZE")
    finally:
        db.close()


def _timed_get(url: str, admin_key: str) -> tuple[float, dict[str, Any]]:
    """Milliseconds from the request to the answer's last byte; the client's parsing of the JSON (a few
    ms for a month of hourly buckets, in this Python client) is not the server's latency."""
    req = urllib.request.Request(url, headers={"X-API-Key": admin_key})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    elapsed = (time.perf_counter() - started) * 1000
    return elapsed, json.loads(raw)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def aggregate_part(backend: str, opts: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    admin_key = secrets.token_urlsafe(32)
    end = int(time.time() * 1000) // DAY_MS * DAY_MS
    start = end - opts.days * DAY_MS
    rows: list[dict[str, Any]] = []
    with hi.telemetra_server(backend, tmp, admin_key, tag="-agg") as server:
        hi.provision(server, admin_key, opts.devices)
        began = time.perf_counter()
        if backend == "postgres":
            database = _pg_database_of(server)
            _load_postgres(database, opts.devices, start, end)
        else:
            _load_sqlite(tmp / "telemetra-sqlite-agg" / "telemetra.db", opts.devices, start, end)
        loaded = opts.devices * len(KEYS) * (end - start) // 60_000
        print(f"[{backend}] loaded {loaded:,} points + rollups in {time.perf_counter() - began:.0f} s", flush=True)
        month = end - 30 * DAY_MS
        cases = [
            (f"1d buckets over {opts.days} d", start, end, "1d", opts.requests),
            ("1h buckets over 30 d", month, end, "1h", opts.requests),
            (f"1d buckets over {opts.days} d, raw", start + 1, end, "1d", max(3, opts.requests // 20)),
            ("1h buckets over 30 d, raw", month + 1, end, "1h", max(5, opts.requests // 10)),
        ]
        for label, lo, hi_ms, interval, n in cases:
            samples, resolution, buckets = [], "", 0
            for i in range(n):
                device = f"bench-{i % opts.devices:03d}"
                url = (
                    f"{server.url}/api/v1/devices/{device}/aggregate?keys={','.join(KEYS)}"
                    f"&start={lo}&end={hi_ms}&interval={interval}&fn=min,max,avg,count,last"
                )
                ms, body = _timed_get(url, admin_key)
                samples.append(ms)
                resolution = body["resolution"]
                buckets = len(body["series"][KEYS[0]])
            p50, p99 = _percentiles(samples)
            rows.append({"case": label, "resolution": resolution, "buckets": buckets, "n": n, "p50": p50, "p99": p99})
            print(
                f"[{backend}] {label:<28} resolution {resolution:<3} {buckets:>4} buckets × 3 keys  "
                f"n={n:<4} p50 {p50:8.1f} ms  p99 {p99:8.1f} ms",
                flush=True,
            )
        if "retention" in opts.parts:
            url = (
                hi.pg_url(_pg_database_of(server))
                if backend == "postgres"
                else f"sqlite+aiosqlite:///{tmp / 'telemetra-sqlite-agg' / 'telemetra.db'}"
            )
            rows.append(asyncio.run(_drop_a_month(url, opts, backend)))
    return rows


async def _drop_a_month(url: str, opts: argparse.Namespace, backend: str) -> dict[str, Any]:
    """Retention on the loaded year: raw kept for all but its oldest 30 days, so one pass drops a month."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from telemetra.domain.timeutil import now_ms
    from telemetra.storage.retention import Days, Policies, RetentionRepository

    engine = create_async_engine(url)
    try:
        keep = opts.days - 30
        cutoff = now_ms() - keep * DAY_MS
        # Baseline of the same run: the month's rows in one plain DELETE, rolled back (what a retention
        # without partitions or chunks would do, holding the table's write lock the whole time).
        async with engine.connect() as conn:
            began = time.perf_counter()
            plain = await conn.exec_driver_sql(f"DELETE FROM telemetry WHERE ts < {cutoff}")
            baseline_s = time.perf_counter() - began
            baseline_rows = int(plain.rowcount or 0)
            await conn.rollback()
        repo = RetentionRepository(engine, Days(raw=keep))
        result = await repo.run_pass(Policies(Days(raw=keep)), now_ms=now_ms(), chunk=5000)
    finally:
        await engine.dispose()
    deleted = result.deleted["raw"]
    how = (
        f"{len(result.dropped_partitions)} partitions dropped whole, the rest in chunks of 5,000"
        if backend == "postgres"
        else f"chunks of 5,000; {result.vacuumed_pages:,} pages given back"
    )
    ratio = result.seconds / baseline_s if baseline_s else 0.0
    print(
        f"[{backend}] retention dropped a month: {deleted:,} raw rows in {result.seconds:.2f} s "
        f"({deleted / result.seconds if result.seconds else 0:,.0f} rows/s; {how}); one plain DELETE of "
        f"{baseline_rows:,} rows (rolled back) {baseline_s:.2f} s; retention ÷ DELETE = {ratio:.2f}",
        flush=True,
    )
    return {
        "case": "retention: drop a month",
        "resolution": "raw",
        "p50": result.seconds * 1000,
        "p99": 0.0,
        "deleted": deleted,
        "baseline_s": baseline_s,
    }


def _pg_database_of(server: hi.Server) -> str:
    """The database the server was started on (its URL is in the server's environment)."""
    env = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    url = next(e for e in env if e.startswith(b"TELEMETRA_DATABASE_URL=")).decode()
    return url.rsplit("/", 1)[1]


# --- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="postgres,sqlite")
    p.add_argument("--parts", default="ingest,aggregate,retention", help="retention runs with aggregate's data")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs per backend (default 2)")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--requests", type=int, default=100)
    opts = p.parse_args(argv)
    backends = [b for b in opts.backends.split(",") if b]
    parts = [x for x in opts.parts.split(",") if x]
    hi.require_wrk()
    print(hi.machine_line())
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="telemetra-lifecycle-") as name:
        tmp = Path(name)
        for backend in backends:
            if "ingest" in parts:
                rates, cpu = ingest_part(backend, opts, tmp)
                off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
                ratio = on / off if off else 0.0
                verdict = "PASS" if ratio >= TARGET_INGEST_RATIO else "MISS"
                summary.append(
                    f"{backend}: batch ingest rollups on {on:,.0f} / off {off:,.0f} points/s (medians) = "
                    f"{ratio:.2f}  target ≥ {TARGET_INGEST_RATIO:.2f}  {verdict}"
                )
                cpu_off, cpu_on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
                summary.append(
                    f"{backend}: server CPU per 300-point request off {cpu_off:.2f} / on {cpu_on:.2f} ms = "
                    f"rate ratio at equal CPU {cpu_off / cpu_on if cpu_on else 0:.2f}"
                )
            if "aggregate" in parts:
                rows = aggregate_part(backend, opts, tmp)
                raw_p50 = {r["case"].removesuffix(", raw"): r["p50"] for r in rows if r["case"].endswith(", raw")}
                for row in rows:
                    if "deleted" in row:
                        seconds = row["p50"] / 1000
                        summary.append(
                            f"{backend}: retention dropped a month ({row['deleted']:,} rows) in {seconds:.2f} s "
                            f"= {seconds / row['baseline_s'] if row['baseline_s'] else 0:.2f} × one plain DELETE "
                            f"({row['baseline_s']:.2f} s)"
                        )
                        continue
                    served = row["resolution"] != "raw"
                    verdict = ("PASS" if row["p99"] < TARGET_P99_MS else "MISS") if served else "baseline"
                    raw = raw_p50.get(row["case"])
                    versus = f"  = {row['p50'] / raw:.3f} × raw p50" if served and raw else ""
                    summary.append(
                        f"{backend}: {row['case']:<28} ({row['resolution']}) p50 {row['p50']:.1f} ms "
                        f"p99 {row['p99']:.1f} ms  {verdict}{versus}"
                    )
    print("\n== summary ==")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
