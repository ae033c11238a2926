"""What can stop ``telemetra serve`` from starting, said once and plainly (issue 11).

Each cause is a ``StartupError`` with its own exit code and a message that says what to change; the CLI
prints it alone (no traceback) and exits with the code. The checks here run before or at the start of the
lifespan: the HTTP socket is bound before the app starts, the database and an external broker are waited
for with a bounded backoff (so compose start-up order does not matter), TLS files are loaded up front.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Exit codes, one per cause (documented in the README's operations section). 1 is invalid settings (click's
# code for an error), 2 a usage error (click's).
EXIT_SETTINGS = 1
EXIT_HTTP_PORT = 10
EXIT_MQTT_PORT = 11
EXIT_DATABASE_UNREACHABLE = 12
EXIT_DATABASE_MISSING = 13
EXIT_BROKER_UNREACHABLE = 14
EXIT_TLS = 15
EXIT_WORKERS = 16  # --workers N in a configuration one process must own (SQLite, the embedded broker)

# Backoff while waiting for a service at start: 0.5 s doubling to at most 5 s between tries.
_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 5.0


class StartupError(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def find_startup_error(exc: BaseException) -> StartupError | None:
    """The StartupError in ``exc``: itself, inside the exception groups of the task groups it crossed on its
    way out of the lifespan, or as its cause."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StartupError):
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


class Retry(Exception):
    """A try that may succeed later (service not up yet); the reason goes into the progress line."""


def port_holder(port: int) -> str | None:
    """Who listens on TCP ``port`` on this machine, as far as /proc lets us see: ``mosquitto (pid 812)``,
    or ``a process of user 'mosquitto'`` when that process is another user's. None when unknown."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes[fields[9]] = int(fields[7])
    if not inodes:
        return None
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                    return f"{name} (pid {pid})"
        except OSError:
            continue  # another user's process, or gone
    uid = next(iter(inodes.values()))
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"a process of user '{user}'"


def free_port_near(host: str, port: int, *, tries: int = 50) -> int | None:
    """A port that is free on ``host`` right now: the first of the next ``tries`` above ``port`` that can be
    bound, else one the system picks. None when nothing can be bound there at all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [p for p in range(port + 1, port + 1 + tries) if p <= 65535] + [0]
    for candidate in candidates:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    return None


def port_in_use_message(what: str, setting: str, host: str, port: int) -> str:
    holder = port_holder(port)
    held = f" by {holder}" if holder else ""
    free = free_port_near(host, port)
    suggestion = f" (e.g. {setting}={free}, free right now)" if free else ""
    return (
        f"{what}: port {port} on {host or '*'} is already in use{held}. "
        f"Stop that process, or set {setting} to a free port{suggestion}."
    )


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before the app starts (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                port_in_use_message("cannot start the HTTP server", "TELEMETRA_PORT", host, port), EXIT_HTTP_PORT
            ) from None
        if exc.errno == errno.EACCES:
            raise StartupError(
                f"cannot start the HTTP server: no permission to listen on port {port} (ports below 1024 need "
                "root); set TELEMETRA_PORT to 1024 or above.",
                EXIT_HTTP_PORT,
            ) from None
        raise StartupError(
            f"cannot start the HTTP server on {host}:{port}: {exc.strerror}; check TELEMETRA_HOST.", EXIT_HTTP_PORT
        ) from None
    sock.set_inheritable(True)
    return sock


def check_mqtt_port(host: str, port: int, *, setting: str = "TELEMETRA_MQTT_PORT") -> None:
    """The embedded broker's port is free (checked before anything starts, so the message comes first)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise StartupError(
                    f"cannot start the embedded MQTT broker on {host}:{port}: {exc.strerror}; check "
                    f"TELEMETRA_MQTT_HOST and {setting}.",
                    EXIT_MQTT_PORT,
                ) from None
            raise StartupError(mqtt_port_in_use_message(host, port, setting), EXIT_MQTT_PORT) from None


def mqtt_port_in_use_message(host: str, port: int, setting: str = "TELEMETRA_MQTT_PORT") -> str:
    message = port_in_use_message("cannot start the embedded MQTT broker", setting, host, port)
    return (
        f"{message} To use the broker that runs there instead, set "
        f"TELEMETRA_MQTT_URL=mqtt://<user>:<password>@127.0.0.1:{port}; TELEMETRA_MQTT_PORT=0 turns MQTT off."
    )


async def wait_until(
    attempt: Callable[[], Awaitable[None]],
    *,
    what: str,
    wait_s: float,
    on_give_up: Callable[[str, float], StartupError],
) -> None:
    """Call ``attempt`` until it returns; while it raises ``Retry``, try again with a bounded exponential
    backoff, logging each wait, for at most ``wait_s`` seconds, then raise ``on_give_up(reason, waited)``."""
    started = time.monotonic()
    delay = _FIRST_DELAY_S
    while True:
        try:
            await attempt()
            return
        except Retry as exc:
            reason = str(exc)
            waited = time.monotonic() - started
            if waited + delay > wait_s:
                raise on_give_up(reason, waited) from None
            log.warning(
                "%s not available (%s); retrying in %.1f s (waited %.0f s of %.0f s, TELEMETRA_STARTUP_WAIT_S)",
                what,
                reason,
                delay,
                waited,
                wait_s,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY_S)


async def wait_for_broker(host: str, port: int, wait_s: float) -> None:
    """An external broker answers TCP connections (its protocol and the credentials are the collector's)."""

    async def attempt() -> None:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, TimeoutError) as exc:
            raise Retry(getattr(exc, "strerror", None) or type(exc).__name__) from None
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass

    def give_up(reason: str, waited: float) -> StartupError:
        return StartupError(
            f"cannot reach the MQTT broker at {host}:{port} ({reason}) after {waited:.0f} s. Start the broker, "
            "or fix TELEMETRA_MQTT_URL (unset it to use the embedded broker).",
            EXIT_BROKER_UNREACHABLE,
        )

    await wait_until(attempt, what=f"MQTT broker {host}:{port}", wait_s=wait_s, on_give_up=give_up)


def check_tls_files(setting_prefix: str, cert: Path | None, key: Path | None, ca: Path | None = None) -> None:
    """Load the certificate, key (and CA) now, so a wrong path or a key that does not match its certificate
    is one message naming the setting, not a failure at the first connection."""
    for suffix, path in (("CERT", cert), ("KEY", key), ("CA", ca)):
        if path is not None and not path.is_file():
            raise StartupError(f"TLS: {setting_prefix}_{suffix}={path} is not a readable file; fix the path.", EXIT_TLS)
    if cert is None and key is None:
        pass
    elif cert is None or key is None:
        missing = f"{setting_prefix}_{'CERT' if cert is None else 'KEY'}"
        raise StartupError(f"TLS: set {missing} as well (a certificate needs its key).", EXIT_TLS)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            raise StartupError(
                f"TLS: cannot use {setting_prefix}_CERT={cert} with {setting_prefix}_KEY={key}: {exc.reason or exc} "
                "(a PEM certificate and the PEM private key that matches it are needed).",
                EXIT_TLS,
            ) from None
    if ca is not None:
        try:
            ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as exc:
            raise StartupError(
                f"TLS: {setting_prefix}_CA={ca} is not a PEM CA certificate: {exc.reason or exc}", EXIT_TLS
            ) from None


async def wait_for_database(database_url: str, wait_s: float) -> None:
    """PostgreSQL answers and the database exists (waiting for both: in compose the server, or whoever
    creates the database, may come up after Telemetra); SQLite's directory is usable. Refused credentials
    are not waited for: they will not fix themselves."""
    from sqlalchemy import make_url

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        _check_sqlite(url.database)
        return
    import asyncpg

    host, port, name = url.host or "localhost", url.port or 5432, url.database or url.username or "postgres"
    where = f"PostgreSQL at {host}:{port}, database '{name}'"
    create = f"createdb -h {host} -p {port} -U {url.username or 'postgres'} {name}"
    missing = False  # what the last try found: the server up, but no such database

    async def attempt() -> None:
        nonlocal missing
        try:
            conn = await asyncpg.connect(
                host=host, port=port, user=url.username, password=url.password, database=name, timeout=5
            )
        except asyncpg.InvalidCatalogNameError:
            missing = True
            raise Retry(f"the database does not exist yet; create it: {create}") from None
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
            raise StartupError(
                f"{where}: login refused for user '{url.username}' ({exc}). Fix the user or password in "
                "TELEMETRA_DATABASE_URL.",
                EXIT_DATABASE_UNREACHABLE,
            ) from None
        except (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
            missing = False
            raise Retry(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None
        await conn.close()

    def give_up(reason: str, waited: float) -> StartupError:
        if missing:
            return StartupError(
                f"{where}: the database does not exist; waited {waited:.0f} s for it. Create it ({create}) or "
                "fix the database name in TELEMETRA_DATABASE_URL; Telemetra waits for it at start for up to "
                f"TELEMETRA_STARTUP_WAIT_S seconds (now {wait_s:g}).",
                EXIT_DATABASE_MISSING,
            )
        return StartupError(
            f"cannot reach {where} ({reason}); waited {waited:.0f} s. Start PostgreSQL or fix the host and port "
            "in TELEMETRA_DATABASE_URL; Telemetra waits for it at start for up to TELEMETRA_STARTUP_WAIT_S seconds "
            f"(now {wait_s:g}).",
            EXIT_DATABASE_UNREACHABLE,
        )

    await wait_until(attempt, what=where, wait_s=wait_s, on_give_up=give_up)


def _check_sqlite(database: str | None) -> None:
    if not database or database == ":memory:":
        return
    directory = Path(database).resolve().parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not directory.is_dir() or not os.access(directory, os.W_OK):
        raise StartupError(
            f"SQLite database {database}: the directory {directory} does not exist or is not writable; fix "
            "TELEMETRA_DATA_DIR or TELEMETRA_DATABASE_URL.",
            EXIT_DATABASE_MISSING,
        )
