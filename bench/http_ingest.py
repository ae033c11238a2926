"""HTTP ingest benchmark: Telemetra against a seed-style baseline, same machine, same run.

Starts each server as a subprocess on loopback, drives it with wrk (many connections, unique timestamps
per request so every request stores new points), counts the rows stored afterwards, and prints
requests/s, points/s, p50/p99 latency, errors and server RSS per scenario and backend, then the ratios and
PASS/MISS against the targets. See bench/README.md.

    .venv/bin/python bench/http_ingest.py [--backends sqlite,postgres] [--duration 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
PG_DSN = {"host": "127.0.0.1", "port": "5432", "user": "postgres"}
DAY_MS = 86_400_000
BATCH_MESSAGES = 100
KEYS_PER_MESSAGE = 3
DEVICES = 50
# Targets from the issue, on this 2-core machine with the load generator on the same box (PostgreSQL).
TARGET_BATCH_POINTS_S = 60_000
TARGET_SINGLE_REQ_S = 2_000
TARGET_RATIO = 10.0
BUSY_OTHER_CORES = 0.25  # CPU used by processes outside the benchmark above which its rates are suspect

# One Lua state per wrk thread. `seq` is unique across threads, so every (device, ts) pair is new and
# the server's ON CONFLICT DO NOTHING never hides a lost point from the stored-row count.
WRK_SCRIPT = r"""
local threads = {}
-- Globals, not locals: done() reads them per thread with thread:get().
counter, sent, ok, bad, last_bad = 0, 0, 0, 0, 0
local mode, base, nthreads, keys = "single", 0, 1, {}
local headers = {["Content-Type"] = "application/json"}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  mode, base, nthreads = args[1], tonumber(args[2]), tonumber(args[3])
  for line in io.lines(args[4]) do table.insert(keys, line) end
end

local function message(ts, seq)
  return string.format('{"ts":%d,"temperature":%.1f,"humidity":%.1f,"voltage":3.9}',
    ts, 15 + seq % 150 / 10, 30 + seq % 400 / 10)
end

function request()
  counter = counter + 1
  sent = sent + 1
  local seq = counter * nthreads + tid
  local key = keys[seq % #keys + 1]
  if mode == "baseline" then
    local body = string.format('{"device_id":"%s","temperature":%.1f,"humidity":40.2,"voltage":3.9}',
      key, 15 + seq % 150 / 10)
    return wrk.format("POST", "/ingest", headers, body)
  end
  headers["X-API-Key"] = key
  if mode == "single" then
    return wrk.format("POST", "/api/v1/ingest", headers, message(base + seq, seq))
  end
  local parts = {}
  for i = 0, 99 do parts[i + 1] = message(base + seq * 100 + i, seq + i) end
  return wrk.format("POST", "/api/v1/ingest/batch", headers, "[" .. table.concat(parts, ",") .. "]")
end

function response(status, hdrs, body)
  if status >= 200 and status < 300 then ok = ok + 1 else bad = bad + 1; last_bad = status end
end

function done(summary, latency, requests)
  local s, o, b, lb = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); o = o + t:get("ok"); b = b + t:get("bad")
    if t:get("last_bad") ~= 0 then lb = t:get("last_bad") end
  end
  local e = summary.errors
  io.write(string.format('BENCH {"responses":%d,"duration_us":%d,"sent":%d,"ok":%d,"non2xx":%d,' ..
    '"last_bad_status":%d,"socket_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, s, o, b, lb, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class Options:
    backends: list[str]
    duration: float
    warmup: float
    connections: int
    threads: int
    json_path: Path | None
    # `telemetra serve --workers N` (PostgreSQL only; the server CPU column then counts the parent alone).
    workers: int = 1


@dataclass
class Result:
    backend: str
    server: str
    scenario: str
    points_per_request: int
    rows_per_request: int  # what the row count sees: Telemetra stores a row per point, the baseline per request
    seconds: float = 0.0
    sent: int = 0
    responses: int = 0
    ok: int = 0
    non2xx: int = 0
    last_bad_status: int = 0
    socket_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    stored: int = 0
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # cores busy during the measured window, by whom

    @property
    def server_cpu_ms_per_req(self) -> float:
        """Server CPU per answered request: unlike req/s, this barely moves when the machine is shared."""
        return self.cpu.get("server", 0.0) * self.seconds * 1000 / self.responses if self.responses else 0.0

    @property
    def req_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def points_s(self) -> float:
        return self.ok * self.points_per_request / self.seconds if self.seconds else 0.0

    @property
    def acked(self) -> int:
        """Rows the server acknowledged (2xx) — compared with the rows counted in the table."""
        return self.ok * self.rows_per_request

    @property
    def errors(self) -> int:
        return self.non2xx + self.socket_errors

    @property
    def unanswered(self) -> int:
        """Requests in flight when wrk stopped: the server may have stored them, the client never heard."""
        return max(0, self.sent - self.responses)

    @property
    def storage_ok(self) -> bool:
        return self.acked <= self.stored <= self.acked + self.unanswered * self.rows_per_request

    def as_dict(self) -> dict[str, Any]:
        extra = {
            "req_s": self.req_s,
            "points_s": self.points_s,
            "acked": self.acked,
            "storage_ok": self.storage_ok,
            "server_cpu_ms_per_req": self.server_cpu_ms_per_req,
        }
        return asdict(self) | extra


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    count_rows: Callable[[], int]
    rss: RssSampler = field(init=False)

    def __post_init__(self) -> None:
        self.rss = RssSampler(self.process.pid)


# --- machine, tools ------------------------------------------------------------------------------


def machine_line() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    return f"machine: {cores} cores (nproc), {model}, Python {platform.python_version()}, {platform.platform()}"


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit(
            "wrk is not installed: it is the load generator (little CPU per request).\n"
            "Install it with: sudo apt-get install -y wrk   (Debian/Ubuntu; macOS: brew install wrk)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --- PostgreSQL and SQLite -------------------------------------------------------------------------


def psql(sql: str, database: str = "postgres") -> str:
    cmd = ["psql", "-h", PG_DSN["host"], "-p", PG_DSN["port"], "-U", PG_DSN["user"], "-d", database, "-tAXqc", sql]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def pg_url(database: str) -> str:
    return f"postgresql+asyncpg://{PG_DSN['user']}@{PG_DSN['host']}:{PG_DSN['port']}/{database}"


@contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    name = f"{prefix}_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    try:
        yield name
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pg_counter(database: str, table: str) -> Callable[[], int]:
    return lambda: int(psql(f"SELECT count(*) FROM {table}", database))


def sqlite_counter(path: Path, table: str) -> Callable[[], int]:
    def count() -> int:
        with sqlite3.connect(path, timeout=30) as conn:
            row: tuple[int] = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            return row[0]

    return count


def settle(count: Callable[[], int], timeout: float = 15.0) -> int:
    """Row count once the server has committed what was in flight (two equal reads 0.3 s apart)."""
    deadline = time.monotonic() + timeout
    last = count()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = count()
        if now == last:
            return now
        last = now
    return last


# --- CPU ------------------------------------------------------------------------------------------


def _jiffies(pid: int | str, *, reaped: bool = False) -> int:
    """utime + stime of one process (0 once it is gone); with ``reaped``, plus its exited children's."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    own = int(fields[11]) + int(fields[12])
    return own + (int(fields[13]) + int(fields[14]) if reaped else 0)


def _postgres_jiffies() -> int:
    """Every postgres process, plus the backends that exited (the postmaster reaped them: its children's
    time) — connections a pool opens and closes during the window would otherwise vanish from the sum."""
    total = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    total += _jiffies(entry.name, reaped=True)
            except OSError:
                continue
    return total


def _machine_jiffies() -> int:
    """Busy jiffies of all CPUs (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """Who kept the cores busy between construction and ``cores_busy()``: the server, PostgreSQL (every
    postgres process on the box), the load generator (reaped children: wrk) and everything else."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._start = time.monotonic()
        self._server, self._pg = _jiffies(server_pid), _postgres_jiffies()
        self._machine, self._children = _machine_jiffies(), _children_cpu_s()

    def cores_busy(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._start
        tick = os.sysconf("SC_CLK_TCK") * elapsed
        server = (_jiffies(self._pid) - self._server) / tick
        pg = (_postgres_jiffies() - self._pg) / tick
        wrk = (_children_cpu_s() - self._children) / elapsed
        machine = (_machine_jiffies() - self._machine) / tick
        return {"server": server, "postgres": pg, "wrk": wrk, "other": max(0.0, machine - server - pg - wrk)}


# --- servers ---------------------------------------------------------------------------------------


class RssSampler:
    """Samples VmRSS of one process every 100 ms; ``peak`` since the last ``reset``."""

    def __init__(self, pid: int) -> None:
        self._path = Path(f"/proc/{pid}/status")
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def current_kb(self) -> int:
        try:
            for line in self._path.read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def reset(self) -> None:
        self.peak_kb = self.current_kb()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_kb = max(self.peak_kb, self.current_kb())


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_healthy(server: Server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.process.returncode}):\n{tail(server.log)}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not become healthy in {timeout:.0f} s:\n{tail(server.log)}")


def stop_server(server: Server) -> None:
    server.rss.stop()
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TELEMETRA_DATABASE_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def telemetra_server(
    backend: str,
    workdir: Path,
    admin_key: str,
    extra_env: dict[str, str] | None = None,
    tag: str = "",
    workers: int = 1,
) -> Iterator[Server]:
    port = free_port()
    data_dir = workdir / f"telemetra-{backend}{tag}"
    env = (
        base_env()
        | {
            "TELEMETRA_MQTT_PORT": "0",
            "TELEMETRA_LOG_LEVEL": "WARNING",
            "TELEMETRA_ADMIN_KEYS": admin_key,
            # Console logs render tracebacks with rich, which takes seconds per exception on the event loop;
            # the disconnects wrk leaves at the end of each run would then stall the next one.
            "TELEMETRA_LOG_FORMAT": os.environ.get("TELEMETRA_LOG_FORMAT", "json"),
        }
        | (extra_env or {})
    )
    cmd = [str(VENV_BIN / "telemetra"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    with database_for(backend, "telemetra_bench", data_dir / "telemetra.db", "telemetry") as (url, counter):
        if url:
            env["TELEMETRA_DATABASE_URL"] = url
        log = workdir / f"telemetra-{backend}{tag}.log"
        process = start_process(cmd, env, log)
        server = Server("telemetra", process, f"http://127.0.0.1:{port}", log, counter)
        try:
            wait_healthy(server)
            yield server
        finally:
            stop_server(server)


@contextmanager
def baseline_server(backend: str, workdir: Path) -> Iterator[Server]:
    port = free_port()
    db_file = workdir / "baseline.db"
    env = base_env()
    cmd = [
        str(VENV_BIN / "python"),
        "-m",
        "uvicorn",
        "--factory",
        "bench.baseline_app:app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    with database_for(backend, "baseline_bench", db_file, "readings") as (url, counter):
        env["BASELINE_DATABASE_URL"] = url or f"sqlite+aiosqlite:///{db_file}"
        log = workdir / f"baseline-{backend}.log"
        process = start_process(cmd, env, log)
        server = Server("baseline", process, f"http://127.0.0.1:{port}", log, counter)
        try:
            wait_healthy(server)
            yield server
        finally:
            stop_server(server)


@contextmanager
def database_for(backend: str, prefix: str, sqlite_path: Path, table: str) -> Iterator[tuple[str, Callable[[], int]]]:
    """(URL or "" for the server's SQLite default, row counter for ``table``)."""
    if backend == "postgres":
        with pg_database(prefix) as name:
            yield pg_url(name), pg_counter(name, table)
    else:
        sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        yield "", sqlite_counter(sqlite_path, table)


def provision(server: Server, admin_key: str, count: int) -> list[str]:
    keys = []
    for i in range(count):
        body = json.dumps({"id": f"bench-{i:03d}", "name": f"bench device {i}"}).encode()
        req = urllib.request.Request(
            f"{server.url}/api/v1/devices",
            data=body,
            headers={"X-API-Key": admin_key, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            keys.append(json.load(resp)["credentials"]["api_key"])
    return keys


# --- load ------------------------------------------------------------------------------------------


def run_wrk(url: str, script: Path, args: list[str], opts: Options, seconds: float) -> dict[str, Any]:
    cmd = [
        "wrk",
        "-t",
        str(opts.threads),
        "-c",
        str(opts.connections),
        "-d",
        f"{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            parsed: dict[str, Any] = json.loads(line[len("BENCH ") :])
            return parsed
    raise RuntimeError(f"wrk gave no summary (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def measure(server: Server, result: Result, wrk_args: Callable[[int], list[str]], opts: Options, tmp: Path) -> Result:
    """Warm up, then one measured wrk run; unique timestamp ranges per run (``wrk_args(day)``)."""
    script = tmp / "ingest.lua"
    script.write_text(WRK_SCRIPT)
    if opts.warmup > 0:
        run_wrk(server.url, script, wrk_args(2), opts, opts.warmup)
    before = settle(server.count_rows)
    server.rss.reset()
    cpu = CpuMeter(server.process.pid)
    summary = run_wrk(server.url, script, wrk_args(1), opts, opts.duration)
    result.cpu = cpu.cores_busy()
    result.stored = settle(server.count_rows) - before
    result.rss_peak_mb = server.rss.peak_kb / 1024
    result.rss_end_mb = server.rss.current_kb() / 1024
    fill(result, summary)
    return result


def fill(result: Result, s: dict[str, Any]) -> None:
    result.seconds = s["duration_us"] / 1e6
    result.sent, result.responses, result.ok = s["sent"], s["responses"], s["ok"]
    result.non2xx, result.last_bad_status = s["non2xx"], s["last_bad_status"]
    result.socket_errors = s["socket_errors"] + s["timeouts"]
    result.p50_ms, result.p99_ms, result.max_ms = s["p50_us"] / 1000, s["p99_us"] / 1000, s["max_us"] / 1000


def bench_backend(backend: str, opts: Options, tmp: Path) -> list[Result]:
    results = []
    admin_key = secrets.token_urlsafe(32)
    keys_file = tmp / f"keys-{backend}.txt"
    nthreads = str(opts.threads)
    print(f"[{backend}] telemetra: starting", flush=True)
    workers = opts.workers if backend == "postgres" else 1
    with telemetra_server(backend, tmp, admin_key, workers=workers) as server:
        keys_file.write_text("\n".join(provision(server, admin_key, DEVICES)) + "\n")
        for scenario, ppr, days in (("single", KEYS_PER_MESSAGE, 10), ("batch", BATCH_MESSAGES * KEYS_PER_MESSAGE, 5)):
            print(f"[{backend}] telemetra: {scenario} ({opts.warmup:g} s warm-up + {opts.duration:g} s)", flush=True)

            def args(day: int, scenario: str = scenario, days: int = days) -> list[str]:
                base = int(time.time() * 1000) - (days + day) * DAY_MS
                return [scenario, str(base), nthreads, str(keys_file)]

            results.append(measure(server, Result(backend, "telemetra", scenario, ppr, ppr), args, opts, tmp))
    print(f"[{backend}] baseline: single ({opts.warmup:g} s warm-up + {opts.duration:g} s)", flush=True)
    ids_file = tmp / "baseline-ids.txt"
    ids_file.write_text("\n".join(f"bench-{i:03d}" for i in range(DEVICES)) + "\n")
    with baseline_server(backend, tmp) as server:
        result = Result(backend, "baseline", "single", KEYS_PER_MESSAGE, 1)
        results.append(measure(server, result, lambda day: ["baseline", "0", nthreads, str(ids_file)], opts, tmp))
    return results


# --- report ----------------------------------------------------------------------------------------


def storage_cell(r: Result) -> str:
    cell = f"{r.stored:,}/{r.acked:,}"
    if r.stored < r.acked:
        return f"{cell} LOSS {r.acked - r.stored:,}"
    if not r.storage_ok:
        return f"{cell} EXTRA?"
    extra = r.stored - r.acked
    return f"{cell} ok" + (f" (+{extra:,} in flight at stop)" if extra else "")


def print_table(backend: str, results: list[Result]) -> None:
    header = (
        f"{'scenario':<17} {'req/s':>7} {'points/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
        f"{'RSS MB pk/end':>13} {'CPU ms/req':>10} {'cores srv/pg/wrk/oth':>20}  stored/acked rows"
    )
    print(f"\n== {backend} ==")
    print(header)
    print("-" * len(header))
    for r in results:
        errors = f"{r.errors}" + (f" ({r.last_bad_status})" if r.last_bad_status else "")
        rss = f"{r.rss_peak_mb:.0f}/{r.rss_end_mb:.0f}"
        cores = "/".join(f"{r.cpu.get(k, 0.0):.2f}" for k in ("server", "postgres", "wrk", "other"))
        print(
            f"{r.server + ' ' + r.scenario:<17} {r.req_s:>7,.0f} {r.points_s:>9,.0f} {r.p50_ms:>7.1f} "
            f"{r.p99_ms:>7.1f} {errors:>6} {rss:>13} {r.server_cpu_ms_per_req:>10.2f} {cores:>20}  "
            f"{storage_cell(r)}"
        )
    for r in results:
        if r.cpu.get("other", 0.0) > BUSY_OTHER_CORES:
            print(
                f"WARNING: other processes kept {r.cpu['other']:.2f} cores busy during {r.server} {r.scenario}: "
                "its rates are depressed (CPU ms/req is the steadier figure)"
            )


def find(results: list[Result], backend: str, server: str, scenario: str) -> Result | None:
    return next((r for r in results if (r.backend, r.server, r.scenario) == (backend, server, scenario)), None)


def verdicts(results: list[Result], backends: list[str]) -> list[tuple[str, float, float, bool]]:
    """(label, value, target, met); targets apply to PostgreSQL, SQLite rows are for information."""
    rows: list[tuple[str, float, float, bool]] = []
    for backend in backends:
        single = find(results, backend, "telemetra", "single")
        batch = find(results, backend, "telemetra", "batch")
        base = find(results, backend, "baseline", "single")
        if batch:
            rows.append(
                (
                    f"{backend}: batch points/s",
                    batch.points_s,
                    TARGET_BATCH_POINTS_S,
                    batch.points_s >= TARGET_BATCH_POINTS_S,
                )
            )
        if single:
            rows.append(
                (f"{backend}: single req/s", single.req_s, TARGET_SINGLE_REQ_S, single.req_s >= TARGET_SINGLE_REQ_S)
            )
        if single and base and base.req_s:
            ratio = single.req_s / base.req_s
            rows.append((f"{backend}: single ÷ baseline", ratio, TARGET_RATIO, ratio >= TARGET_RATIO))
    return rows


def print_verdicts(results: list[Result], backends: list[str]) -> None:
    print("\n== targets (PostgreSQL; SQLite for information) ==")
    for label, value, target, met in verdicts(results, backends):
        status = ("PASS" if met else "MISS") if label.startswith("postgres") else "info"
        print(f"{label:<32} {value:>12,.1f}   target ≥ {target:,.0f}   {status}")
    lossy = [r for r in results if not r.storage_ok]
    print(
        "storage check: "
        + (
            "all acknowledged points stored"
            if not lossy
            else "MISMATCH in " + ", ".join(f"{r.backend}/{r.server}/{r.scenario}" for r in lossy)
        )
    )


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sqlite,postgres", help="comma list of sqlite, postgres")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per scenario (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each scenario (default 2)")
    p.add_argument("--connections", type=int, default=64, help="concurrent HTTP connections (default 64)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1: leave the cores to the server)")
    p.add_argument("--workers", type=int, default=1, help="telemetra serve --workers N on PostgreSQL (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if unknown := sorted(set(backends) - {"sqlite", "postgres"}):
        p.error(f"unknown backend(s) {unknown}")
    return Options(backends, a.duration, a.warmup, a.connections, max(1, a.threads), a.json, max(1, a.workers))


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    require_wrk()
    print(machine_line())
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if "postgres" in opts.backends:
        try:
            print(f"postgres: {psql('SHOW server_version')} at {PG_DSN['host']}:{PG_DSN['port']}")
        except (OSError, subprocess.CalledProcessError) as exc:
            print(
                f"postgres backend skipped: psql cannot reach {PG_DSN['host']}:{PG_DSN['port']} as "
                f"{PG_DSN['user']} ({exc}); install postgresql-client and start PostgreSQL (make services)"
            )
            opts.backends.remove("postgres")
    print(
        f"load: wrk, {opts.threads} thread(s), {opts.connections} connections, {opts.duration:g} s per scenario "
        f"after {opts.warmup:g} s warm-up; {DEVICES} device keys; batch = {BATCH_MESSAGES} messages × "
        f"{KEYS_PER_MESSAGE} keys",
        flush=True,
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="telemetra-bench-") as tmp:
        for backend in opts.backends:
            try:
                results.extend(bench_backend(backend, opts, Path(tmp)))
            except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
                print(f"[{backend}] ERROR, backend skipped: {exc}", flush=True)
    for backend in opts.backends:
        print_table(backend, [r for r in results if r.backend == backend])
    print_verdicts(results, opts.backends)
    if opts.json_path:
        payload = {
            "machine": machine_line(),
            "options": {k: str(v) for k, v in asdict(opts).items()},
            "results": [r.as_dict() for r in results],
            "targets": [
                {"label": v[0], "value": v[1], "target": v[2], "met": v[3]} for v in verdicts(results, opts.backends)
            ],
        }
        opts.json_path.write_text(json.dumps(payload, indent=2))
        print(f"results written to {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
