"""Start a throw-away Mosquitto broker for tests.

``start_mosquitto()`` writes a config into a directory of its own, picks a free port on 127.0.0.1,
initialises the dynamic-security state file and waits until the listener accepts connections.
``mosquitto_fixture`` is a function-scoped fixture body; a conftest re-exports it with::

    from tests.support.mosquitto import mosquitto_fixture
    mosquitto = pytest.fixture(mosquitto_fixture)

(or ``pytest.fixture(mosquitto_fixture, name="broker")``). ``MosquittoInstance.restart()`` restarts on the
same port and files, for persistence tests (``stop()`` and ``start()`` apart, for outages; ``kill=True``
for SIGKILL); ``spawn_mosquitto()`` runs a config file of your own and ``deploy_mosquitto()`` the shipped
one. ``PahoTestClient`` is a real paho device/subscriber awaitable from asyncio tests.

If the ``mosquitto`` binary is missing the test is skipped, unless ``CI=true`` where a silent skip would
hide a broken CI image, so it fails instead.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support.procs import free_port

__all__ = [
    "DEPLOY_CONF",
    "DYNSEC_PLUGIN_CANDIDATES",
    "DeployBroker",
    "MosquittoInstance",
    "PahoTestClient",
    "deploy_mosquitto",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
    "init_dynsec_state",
    "mosquitto_fixture",
    "spawn_mosquitto",
    "start_mosquitto",
]

DYNSEC_PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
DEPLOY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"
# Debian installs the broker in /usr/sbin, which is not on a non-root user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_START_TIMEOUT = 10.0


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _missing(reason: str) -> NoReturn:
    if _is_ci():
        pytest.fail(f"{reason} (CI=true, so this is an error rather than a skip)", pytrace=False)
    pytest.skip(reason)


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_mosquitto() -> str | None:
    """Path of the broker binary (``MOSQUITTO_BIN`` overrides), or None."""
    override = os.environ.get("MOSQUITTO_BIN")
    if override:
        return override if os.access(override, os.X_OK) else None
    return _which("mosquitto")


def find_dynsec_plugin() -> str | None:
    override = os.environ.get("MOSQUITTO_DYNSEC_PLUGIN")
    if override:
        return override if Path(override).is_file() else None
    return next((p for p in DYNSEC_PLUGIN_CANDIDATES if Path(p).is_file()), None)


@dataclass
class MosquittoInstance:
    host: str
    port: int
    admin_username: str
    admin_password: str = field(repr=False)
    workdir: Path
    process: subprocess.Popen[bytes]
    extra_conf: str = ""
    binary: str = "mosquitto"
    conf_path: Path | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def telemetra_settings(self, service_user: str = "telemetra-svc") -> dict[str, str]:
        """The settings that point Telemetra at this broker: a service account of its own (a fresh secret;
        Telemetra creates the account through dynamic security) and the dynsec admin to do it with."""
        return {
            "mqtt_url": f"mqtt://{service_user}:{secrets.token_urlsafe(18)}@{self.host}:{self.port}",
            "mqtt_dynsec_username": self.admin_username,
            "mqtt_dynsec_password": self.admin_password,
        }

    def telemetra_env(self, service_user: str = "telemetra-svc") -> dict[str, str]:
        """``telemetra_settings`` as the environment of a Telemetra subprocess."""
        return {f"TELEMETRA_{name.upper()}": value for name, value in self.telemetra_settings(service_user).items()}

    @property
    def db_path(self) -> Path:
        """Where the broker saves its in-memory database (``persistence_location`` + ``persistence_file``)."""
        assert self.conf_path is not None
        location, name = self.workdir, "mosquitto.db"
        for line in self.conf_path.read_text().splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "persistence_location":
                location = Path(value.strip())
            elif key == "persistence_file":
                name = value.strip()
        return location / name

    def wait_saved_after(self, moment: float, timeout: float = 15.0) -> None:
        """Block until the broker has saved its database after wall-clock time ``moment`` (an autosave)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                if self.db_path.stat().st_mtime > moment:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.db_path} not saved within {timeout}s (autosave_interval?)")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def restart(self, *, kill: bool = False) -> MosquittoInstance:
        """Stop (SIGTERM: the broker saves its state; ``kill``: SIGKILL, it saves nothing) and start again
        on the same port with the same config and files (persistence, dynsec state). The instance now
        stands for the new process (and is returned, for chaining)."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def start(self) -> MosquittoInstance:
        """Start a stopped broker again on the same port, config and files."""
        assert self.process.poll() is not None, "still running"
        assert self.conf_path is not None
        # The log of the run before is kept beside the new one, for post-mortems.
        if self.log_path.exists():
            with (self.workdir / "mosquitto.previous.log").open("ab") as out:
                out.write(self.log_path.read_bytes())
        fresh = spawn_mosquitto(
            self.binary,
            self.conf_path,
            port=self.port,
            workdir=self.workdir,
            admin_username=self.admin_username,
            admin_password=self.admin_password,
            host=self.host,
        )
        self.process = fresh.process
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save of the in-memory database."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def stop(self) -> None:
        """Terminate the broker; safe to call more than once."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> MosquittoInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def init_dynsec_state(path: Path, username: str, password: str, *, use_ctrl: bool = True) -> None:
    """Create the dynamic-security state file.

    ``mosquitto_ctrl dynsec init <file> <user> <password>`` does this non-interactively in 2.0.11, but
    it exits 0 even when it refuses to overwrite an existing file, so the caller checks the file
    appears. Without mosquitto_ctrl we write the same document ourselves: the plugin hashes passwords
    with PBKDF2-HMAC-SHA512 over the base64-decoded salt (verified against mosquitto_ctrl's output).
    """
    ctrl = _which("mosquitto_ctrl") if use_ctrl else None
    if ctrl:
        result = subprocess.run(
            [ctrl, "dynsec", "init", str(path), username, password],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
        if result.returncode == 0 and path.is_file():
            return
        raise RuntimeError(
            f"mosquitto_ctrl dynsec init failed (rc={result.returncode}): "
            f"{result.stderr.decode(errors='replace').strip()}"
        )

    salt = secrets.token_bytes(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    control = "$CONTROL/dynamic-security/#"
    state = {
        "clients": [
            {
                "username": username,
                "textName": "Dynsec admin user",
                "password": base64.b64encode(digest).decode(),
                "salt": base64.b64encode(salt).decode(),
                "iterations": iterations,
                "roles": [{"rolename": "admin"}],
            }
        ],
        "roles": [
            {
                "rolename": "admin",
                "acls": [
                    {"acltype": "publishClientSend", "topic": control, "allow": True},
                    {"acltype": "publishClientReceive", "topic": control, "allow": True},
                    {"acltype": "subscribePattern", "topic": control, "allow": True},
                    {"acltype": "publishClientReceive", "topic": "$SYS/#", "allow": True},
                    {"acltype": "subscribePattern", "topic": "$SYS/#", "allow": True},
                    {"acltype": "publishClientReceive", "topic": "#", "allow": True},
                    {"acltype": "subscribePattern", "topic": "#", "allow": True},
                    {"acltype": "unsubscribePattern", "topic": "#", "allow": True},
                ],
            }
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": True,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
    path.write_text(json.dumps(state, indent=2))
    path.chmod(0o600)


def _render_config(workdir: Path, port: int, *, plugin: str | None, extra_conf: str) -> str:
    lines = [
        "# Generated by tests/support/mosquitto.py",
        # Keep to loopback; the system broker on :1883 is never touched.
        f"listener {port} 127.0.0.1",
        f"allow_anonymous {'false' if plugin else 'true'}",
        "persistence true",
        f"persistence_location {workdir}/",
        # As deploy/mosquitto/mosquitto.conf (see its README): a SIGKILL of the broker loses what it had not
        # saved, and what it saves is at most this many seconds old.
        "autosave_interval 1",
        # Same reasons as deploy/mosquitto/mosquitto.conf: the default 1000 silently drops QoS 0 and 1
        # messages to a subscriber that falls behind, which a throughput test would misread as loss.
        "max_queued_messages 1000000",
        "max_inflight_messages 100",
        # As in production: without it Nagle delays small replies that follow another write (a QoS 1
        # PUBACK then a message) by the peer's delayed-ACK time, ~40 ms.
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if os.geteuid() == 0:
        # Started as root, Mosquitto switches to the `mosquitto` user, which cannot write into pytest's
        # 0700 /tmp/pytest-of-root tree (persistence and the dynsec state file would fail to save).
        # "root" is the documented value that keeps the current user.
        lines.append("user root")
    if plugin:
        lines += [f"plugin {plugin}", f"plugin_opt_config_file {workdir / 'dynamic-security.json'}"]
    if extra_conf:
        lines += ["", "# extra_conf", extra_conf.strip()]
    return "\n".join(lines) + "\n"


def _wait_listening(host: str, port: int, process: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def start_mosquitto(
    tmp: Path,
    *,
    dynsec: bool = True,
    extra_conf: str = "",
    admin_password: str | None = None,
    port: int | None = None,
) -> MosquittoInstance:
    """Start a private broker with its files under ``tmp`` and return once it accepts connections.

    A fresh directory gets a new dynsec state file with user ``admin`` and ``admin_password`` (random
    by default). Restarting in a directory that already has one (persistence tests) needs the old
    ``admin_password``; :meth:`MosquittoInstance.restart` does that and keeps the port.
    Skips the calling test (fails under ``CI=true``) when the broker or the plugin is not installed.
    """
    binary = find_mosquitto()
    if binary is None:
        _missing("mosquitto binary not found (install the `mosquitto` package or set MOSQUITTO_BIN)")
    plugin: str | None = None
    if dynsec:
        plugin = find_dynsec_plugin()
        if plugin is None:
            _missing("mosquitto_dynamic_security.so not found (set MOSQUITTO_DYNSEC_PLUGIN)")

    workdir = Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    admin_username = "admin" if dynsec else ""
    state_file = workdir / "dynamic-security.json"
    if not dynsec:
        admin_password = ""
    elif not state_file.exists():
        admin_password = admin_password or secrets.token_urlsafe(16)
        init_dynsec_state(state_file, admin_username, admin_password)
    elif admin_password is None:
        raise ValueError(f"{state_file} exists: pass the admin_password it was created with")

    last_error: RuntimeError | None = None
    # Retry with a fresh port: another process can grab the one free_port() found before we bind it.
    for _attempt in range(3):
        listen_port = port or free_port()
        conf_path = workdir / "mosquitto.conf"
        conf_path.write_text(_render_config(workdir, listen_port, plugin=plugin, extra_conf=extra_conf))
        try:
            instance = spawn_mosquitto(
                binary,
                conf_path,
                port=listen_port,
                workdir=workdir,
                admin_username=admin_username,
                admin_password=admin_password,
            )
        except RuntimeError as exc:
            last_error = exc
            if port is not None or "Address already in use" not in str(exc):
                break
        else:
            instance.extra_conf = extra_conf
            return instance
    assert last_error is not None
    raise last_error


def spawn_mosquitto(
    binary: str,
    conf_path: Path,
    *,
    port: int,
    workdir: Path,
    admin_username: str = "",
    admin_password: str = "",
    host: str = "127.0.0.1",
) -> MosquittoInstance:
    """Run ``binary -c conf_path`` (log in ``workdir/mosquitto.log``) and wait until ``port`` listens.

    Raises RuntimeError carrying the broker's log if it exits or does not listen in time.
    """
    log_path = workdir / "mosquitto.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [binary, "-c", str(conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            # Own process group: a Ctrl-C to pytest must not race the broker's shutdown.
            start_new_session=True,
        )
    instance = MosquittoInstance(
        host=host,
        port=port,
        admin_username=admin_username,
        admin_password=admin_password,
        workdir=workdir,
        process=process,
        binary=binary,
        conf_path=conf_path,
    )
    if _wait_listening(host, port, process, time.monotonic() + _START_TIMEOUT):
        return instance
    exited = process.poll()
    instance.stop()
    what = f"exited with code {exited}" if exited is not None else f"not listening after {_START_TIMEOUT:.0f}s"
    raise RuntimeError(f"mosquitto {what} (config {conf_path}, port {port}). Broker log:\n{instance.log()}")


@dataclass
class DeployBroker:
    instance: MosquittoInstance
    ws_port: int
    data: Path
    tls_port: int | None = None


@contextlib.contextmanager
def deploy_mosquitto(
    admin_password: str = "deploy-admin", tls: tuple[Path, Path, Path] | None = None
) -> Iterator[DeployBroker]:
    """deploy/mosquitto/mosquitto.conf as shipped, with its paths pointed into a temp dir and free ports.

    Started as root the broker drops to the `mosquitto` user exactly as in production, so the data dir is
    chowned the way deploy/mosquitto/README.md says. Skips (fails under CI) without broker or plugin.
    """
    binary, plugin = find_mosquitto(), find_dynsec_plugin()
    if binary is None:
        _missing("mosquitto binary not found (install the `mosquitto` package or set MOSQUITTO_BIN)")
    if plugin is None:
        _missing("mosquitto_dynamic_security.so not found (set MOSQUITTO_DYNSEC_PLUGIN)")
    # pytest's tmp_path is under a 0700 root dir; the dropped-privilege user must reach the data dir.
    workdir = Path(tempfile.mkdtemp(prefix="telemetra-deploy-"))
    try:
        workdir.chmod(0o755)
        data = workdir / "data"
        data.mkdir()
        mqtt_port, ws_port = free_port(), free_port()
        conf = DEPLOY_CONF.read_text()
        conf = conf.replace("/mosquitto/data", str(data)).replace("/usr/lib/mosquitto_dynamic_security.so", plugin)
        conf = conf.replace("\nlistener 1883\n", f"\nlistener {mqtt_port} 127.0.0.1\n")
        conf = conf.replace("\nlistener 9001\n", f"\nlistener {ws_port} 127.0.0.1\n")
        assert f"listener {mqtt_port} " in conf and f"listener {ws_port} " in conf, "deploy listeners changed"
        # conf.d/: empty (plain MQTT), or deploy/mosquitto/conf.d/tls.conf with `tls` = (ca, cert, key).
        included = workdir / "conf.d"
        included.mkdir()
        conf = conf.replace("/mosquitto/config/conf.d", str(included))
        tls_port = None
        if tls is not None:
            tls_port = free_port()
            certs = workdir / "certs"
            certs.mkdir()
            for source, name in zip(tls, ("ca.crt", "server.crt", "server.key"), strict=True):
                shutil.copyfile(source, certs / name)
                (certs / name).chmod(0o644)
            # The modes deploy/make-secrets.sh gives them: the key readable by the broker's group only (the
            # broker loads it after dropping to its user).
            certs.chmod(0o755)
            if os.geteuid() == 0:
                (certs / "server.key").chmod(0o640)
                os.chown(certs / "server.key", 0, pwd.getpwnam("mosquitto").pw_gid)
            tls_conf = (DEPLOY_CONF.parent / "conf.d" / "tls.conf").read_text()
            tls_conf = tls_conf.replace("/mosquitto/certs", str(certs))
            tls_conf = tls_conf.replace("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n")
            assert f"listener {tls_port} " in tls_conf, "tls.conf listener changed"
            (included / "tls.conf").write_text(tls_conf)
        conf_path = workdir / "mosquitto.conf"
        conf_path.write_text(conf)
        init_dynsec_state(data / "dynamic-security.json", "admin", admin_password)
        if os.geteuid() == 0:
            user = pwd.getpwnam("mosquitto")
            for path in (data, data / "dynamic-security.json"):
                os.chown(path, user.pw_uid, user.pw_gid)
        instance = spawn_mosquitto(
            binary, conf_path, port=mqtt_port, workdir=workdir, admin_username="admin", admin_password=admin_password
        )
        broker = DeployBroker(instance, ws_port, data, tls_port)
        try:
            yield broker
        finally:
            broker.instance.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def mosquitto_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoInstance]:
    """Fixture body: a fresh dynsec-enabled broker per test, stopped afterwards."""
    instance = start_mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield instance
    finally:
        instance.stop()


class PahoTestClient:
    """A real paho client for tests, awaitable from asyncio (the network loop runs in paho's thread).

    ``connect()`` returns the CONNACK reason code instead of raising so tests can assert refusals;
    ``publish()`` returns the PUBACK reason code (QoS 1) — note a refused QoS 1 publish over MQTT 3.1.1
    still gets a successful PUBACK, only MQTT 5 reports "Not authorized".
    """

    def __init__(
        self,
        broker: MosquittoInstance,
        username: str | None,
        password: str | None,
        *,
        protocol: int = mqtt.MQTTv5,
        client_id: str | None = None,
        timeout: float = 10.0,  # a ceiling for an ack or a message, not a wait: a box at load 10 took over 3 s
        transport: Literal["tcp", "websockets"] = "tcp",
        port: int | None = None,
        persistent: bool = False,
    ) -> None:
        self._host = broker.host
        self._port = port or broker.port
        self.timeout = timeout
        self.client_id = client_id if client_id is not None else f"test-{username}-{secrets.token_hex(4)}"
        # A persistent session (MQTT 3.1.1 clean session off; MQTT 5 clean start off with an expiry): the
        # broker keeps subscriptions and queued messages under the client id while the client is away.
        self._persistent = persistent
        self._protocol = protocol
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            transport=transport,
            # A test must see a kick as a disconnect, not have paho quietly reconnect (and a thread
            # sleeping in the reconnect back-off makes close() take a second).
            reconnect_on_failure=False,
            **({"clean_session": not persistent} if protocol != mqtt.MQTTv5 else {}),
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self.messages: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self.disconnected = asyncio.Event()
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            c.disconnect()  # stop paho retrying with refused credentials
        self._post(self._resolve_connack, rc)

    def _resolve_connack(self, rc: ReasonCode) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(rc)

    def _on_disconnect(self, c: mqtt.Client, u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self._post(self.disconnected.set)

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[ReasonCode], props: Any) -> None:
        self._post(self._ack, mid, list(rcs))

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, props: Any) -> None:
        self._post(self._ack, mid, rc)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._post(self.messages.put_nowait, msg)

    def _ack(self, mid: int, value: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(value)

    async def _wait_ack(self, mid: int) -> Any:
        # Registered before this coroutine yields, and acks are delivered through the same event loop,
        # so an ack cannot arrive before its future exists.
        assert self._loop is not None
        future = self._loop.create_future()
        self._acks[mid] = future
        async with asyncio.timeout(self.timeout):
            return await future

    async def connect(self) -> ReasonCode:
        self._loop = asyncio.get_running_loop()
        self._connack = self._loop.create_future()
        self.disconnected.clear()
        kwargs: dict[str, Any] = {}
        if self._protocol == mqtt.MQTTv5:
            kwargs["clean_start"] = not self._persistent
            if self._persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 3600
                kwargs["properties"] = props
        await asyncio.to_thread(self._client.connect, self._host, self._port, 30, **kwargs)
        self._client.loop_start()
        async with asyncio.timeout(self.timeout):
            rc = await self._connack
        if rc.is_failure:
            await asyncio.to_thread(self._client.loop_stop)
        return rc

    async def subscribe(self, *filters: str, qos: int = 1) -> list[ReasonCode]:
        result, mid = self._client.subscribe([(f, qos) for f in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        assert mid is not None
        return list(await self._wait_ack(mid))

    async def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False) -> ReasonCode:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        if qos == 0:
            return ReasonCode(PacketTypes.PUBACK, identifier=0)  # nothing to wait for
        rc: ReasonCode = await self._wait_ack(info.mid)
        return rc

    async def next_message(self) -> mqtt.MQTTMessage:
        async with asyncio.timeout(self.timeout):
            return await self.messages.get()

    async def assert_no_message(self, within: float = 0.5) -> None:
        try:
            msg = await asyncio.wait_for(self.messages.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message on {msg.topic!r}: {msg.payload!r}")

    async def wait_disconnected(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self.disconnected.wait()

    async def close(self) -> None:
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
