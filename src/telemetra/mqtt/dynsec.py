"""Keep Mosquitto's per-device credentials and ACLs in step with Telemetra's device registry.

External-broker mode (SPEC §2) pushes credentials and ACLs into Mosquitto's dynamic-security plugin
through its control topic. Mosquitto 2.0 does not substitute ``%u``/``%c`` in dynsec ACLs, so every
device gets a role of its own (``telemetra-dev-<id>``) holding literal topics rendered from the same
:class:`~telemetra.mqtt.acl.TopicAcl` templates the embedded broker enforces.

Behaviour of Mosquitto 2.0.11 this module relies on (checked against the real broker, see
tests/mqtt/test_dynsec.py):

* a control message is ``{"commands": [...]}``; the broker answers with one message on
  ``$CONTROL/dynamic-security/v1/response`` holding ``{"responses": [...]}`` in command order, each
  with ``"command"``, an optional ``"error"`` string and the ``"correlationData"`` string we sent;
* all commands of one message are applied in one go in the broker's main loop, so e.g.
  ``createClient`` followed by ``disableClient`` leaves no window for a connection;
* ``setClientPassword``, ``modifyClient``, ``disableClient`` and ``deleteClient`` disconnect the
  client's sessions, so :meth:`DynsecProvisioner.upsert_device` reads the current state first and only
  sends what differs (a registry resync must not disconnect the whole fleet);
* ``modifyRole`` does *not* disconnect anyone: publish ACLs apply at once, but subscriptions made under
  the old ACLs survive. There is no kick command; ``disableClient`` + ``enableClient`` in one batch is
  used to drop sessions when a role loses permissions;
* ``addClientRole`` for a role the client already has fails with "Internal error";
* if the broker cannot write its state file (e.g. owned by root while the broker runs as
  ``mosquitto``) every command still succeeds and the change is lost on restart - only the broker log
  says so.

Device ids share the client namespace with the admin and service accounts, so every operation first
checks that an existing client is one of ours (it holds no role but its own): a device registered as
``admin`` must not be able to reset the admin's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from telemetra.mqtt.acl import TopicAcl, is_valid_device_id

__all__ = [
    "CONTROL_TOPIC",
    "DEVICE_ROLE_PREFIX",
    "RESPONSE_TOPIC",
    "SERVICE_ROLE",
    "DynsecError",
    "DynsecProvisioner",
    "device_role_name",
]

logger = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response"
DEVICE_ROLE_PREFIX = "telemetra-dev-"
SERVICE_ROLE = "telemetra-service"

# Within one role Mosquitto evaluates ACLs of higher priority first; the downlink deny must win over
# the "<root>#" allow that also covers it.
_ALLOW_PRIORITY = 0
_DENY_PRIORITY = 10

# Error strings of Mosquitto 2.0.11's dynsec plugin that idempotent operations accept.
_CLIENT_NOT_FOUND = "Client not found"
_ROLE_NOT_FOUND = "Role not found"
_ALREADY_EXISTS = ("Client already exists", "Role already exists")

Command = dict[str, Any]
Response = dict[str, Any]


class DynsecError(RuntimeError):
    """A dynamic-security command failed, timed out or could not be sent."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynsec {command}: {error}")
        self.command = command
        self.error = error


def device_role_name(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not is_valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: must be non-empty without '+', '#', '/' or NUL")


def _check_owned(username: str, client: dict[str, Any], rolename: str, command: str) -> None:
    """Refuse to touch a client that is not ours (e.g. the admin account): it holds other roles/groups."""
    foreign = sorted({str(r.get("rolename")) for r in client.get("roles", [])} - {rolename})
    groups = sorted(str(g.get("groupname")) for g in client.get("groups", []))
    if foreign or groups:
        raise DynsecError(
            command,
            f"client {username!r} exists and is not managed by Telemetra (roles {foreign}, groups {groups}); "
            "refusing to change it",
        )


def _acl(acltype: str, topic: str, allow: bool, priority: int) -> Command:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


def _acl_key(acl: dict[str, Any]) -> tuple[str, str, bool, int]:
    # The broker reports priority 0 for ACLs created without one.
    return (
        str(acl.get("acltype")),
        str(acl.get("topic")),
        bool(acl.get("allow")),
        int(acl.get("priority", 0)),
    )


def _redacted(commands: Sequence[Command]) -> list[Command]:
    return [{k: ("***" if k == "password" else v) for k, v in cmd.items()} for cmd in commands]


class DynsecProvisioner:
    """Push device credentials and ACLs into Mosquitto's dynamic-security plugin.

    Use as ``async with DynsecProvisioner(...) as prov:``. The admin account (``mosquitto_ctrl dynsec
    init``) needs publish/subscribe on ``$CONTROL/dynamic-security/#``. Operations are serialised:
    provisioning is rare and each one reads the broker's state before changing it.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        password: str,
        device_roots: Sequence[str],
        downlink: Sequence[str],
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        client_id: str | None = None,
    ) -> None:
        # TopicAcl validates the templates ({device} exactly once, publish filters "a/+/{device}/#", exact
        # downlink topics), the same rules the embedded broker uses.
        self._acl = TopicAcl(device_roots=tuple(device_roots), downlink=tuple(downlink))
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self._tls = tls
        self._timeout = timeout
        # Unique per process: several Telemetra instances may provision through the same admin account,
        # and Mosquitto disconnects an older session when a new one reuses its client id.
        self._client_id = client_id or f"telemetra-dynsec-{uuid.uuid4().hex[:12]}"

        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._connected: asyncio.Future[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        self._sub_mid: int | None = None
        # The one batch in flight: its correlation prefix and result future.
        self._pending_id: str | None = None
        self._pending: asyncio.Future[list[Response]] | None = None

    # ------------------------------------------------------------------ connection

    async def __aenter__(self) -> DynsecProvisioner:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._client is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._connected = self._loop.create_future()
        self._subscribed = self._loop.create_future()

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=mqtt.MQTTv5,
        )
        client.username_pw_set(self._username, self._password)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        try:
            # paho's network loop runs in its own thread; callbacks hop back to this loop with
            # call_soon_threadsafe, so all state below is only touched from the event loop.
            # The first connect is blocking (in a worker thread) so an unreachable broker fails at
            # once instead of after the timeout; reconnects are left to paho's loop.
            try:
                await asyncio.to_thread(client.connect, self._host, self._port, 30)
            except OSError as exc:
                raise DynsecError("connect", f"{self._host}:{self._port}: {exc}") from exc
            client.loop_start()
            async with asyncio.timeout(self._timeout):
                await self._connected
                await self._subscribed
        except TimeoutError:
            await self.close()
            raise DynsecError(
                "connect", f"no CONNACK/SUBACK from {self._host}:{self._port} within {self._timeout}s"
            ) from None
        except BaseException:
            await self.close()
            raise
        logger.info("dynsec provisioner connected to %s:%s as %s", self._host, self._port, self._username)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._fail_pending(DynsecError("close", "provisioner closed"))
        client.disconnect()
        # loop_stop joins paho's thread; do not block the event loop while it winds down.
        await asyncio.to_thread(client.loop_stop)

    def _post(self, handler: Any, *args: Any) -> None:
        """From paho's thread: run ``handler(*args)`` on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closed between the check and the call
            loop.call_soon_threadsafe(handler, *args)

    # paho callbacks (paho thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if not reason_code.is_failure:
            # Subscribing on every (re)connect: a clean session forgets the subscription. The broker
            # handles packets of one connection in order, so a command published after this
            # SUBSCRIBE is answered to the subscription.
            _rc, mid = client.subscribe(RESPONSE_TOPIC, qos=1)
            self._post(self._connect_result, reason_code.is_failure, str(reason_code), mid)
        else:
            if self._connected is not None and not self._connected.done():
                # Refused on the first connect: stop paho from retrying credentials the broker
                # rejected. Done here in paho's thread so its loop exits instead of sleeping in the
                # reconnect back-off (which would delay close() by up to a second).
                client.disconnect()
            self._post(self._connect_result, True, str(reason_code), None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._post(self._disconnected, str(reason_code))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[ReasonCode], properties: Any
    ) -> None:
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        self._post(self._subscribe_result, mid, ", ".join(failed) or None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._post(self._response_received, bytes(message.payload))

    # event-loop side of the callbacks ----------------------------------------------

    def _connect_result(self, failed: bool, reason: str, sub_mid: int | None) -> None:
        if failed:
            logger.warning("dynsec provisioner connection refused by broker: %s", reason)
            if self._connected is not None and not self._connected.done():
                self._connected.set_exception(DynsecError("connect", f"connection refused: {reason}"))
            return
        self._sub_mid = sub_mid
        if self._connected is not None and not self._connected.done():
            self._connected.set_result(None)

    def _subscribe_result(self, mid: int, failure: str | None) -> None:
        if mid != self._sub_mid:
            return
        if failure is not None:
            logger.error("dynsec provisioner may not subscribe to %s: %s", RESPONSE_TOPIC, failure)
            error = DynsecError("subscribe", f"{RESPONSE_TOPIC} refused: {failure}")
            self._fail_pending(error)
            if self._subscribed is not None and not self._subscribed.done():
                self._subscribed.set_exception(error)
        elif self._subscribed is not None and not self._subscribed.done():
            self._subscribed.set_result(None)

    def _disconnected(self, reason: str) -> None:
        connected = self._connected
        was_up = connected is not None and connected.done() and not connected.cancelled() and not connected.exception()
        if self._client is not None and was_up:
            logger.warning("dynsec provisioner disconnected (%s); paho reconnects", reason)
        # Whether the broker applied the batch is unknown; every operation reads state before writing,
        # so the caller can simply retry.
        self._fail_pending(DynsecError("connection", f"disconnected while waiting for a response: {reason}"))

    def _response_received(self, payload: bytes) -> None:
        try:
            document = json.loads(payload)
            responses = document["responses"]
            if not isinstance(responses, list):
                raise TypeError("'responses' is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring malformed dynsec response: %s", exc)
            return
        pending_id, future = self._pending_id, self._pending
        if pending_id is None or future is None or future.done() or not responses:
            return
        first = responses[0]
        correlation = first.get("correlationData") if isinstance(first, dict) else None
        if not isinstance(correlation, str) or not correlation.startswith(pending_id + ":"):
            # A late answer to a batch that already timed out, or (2.0.x) the uncorrelated reply to a
            # payload the broker could not parse.
            logger.debug("ignoring dynsec response for another batch: %s", correlation)
            return
        future.set_result(responses)

    def _fail_pending(self, error: DynsecError) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(error)

    # ------------------------------------------------------------------ batches

    async def _send(self, commands: Sequence[Command]) -> list[Response]:
        """Send one batch and return the broker's responses, in command order. Caller holds the lock."""
        client = self._client
        if client is None or self._loop is None:
            raise DynsecError("send", "provisioner is not connected (use 'async with')")
        batch_id = uuid.uuid4().hex
        payload = {"commands": [{**cmd, "correlationData": f"{batch_id}:{i}"} for i, cmd in enumerate(commands)]}
        names = ",".join(str(cmd["command"]) for cmd in commands)
        logger.debug("dynsec batch %s: %s", batch_id, _redacted(commands))
        future: asyncio.Future[list[Response]] = self._loop.create_future()
        self._pending_id, self._pending = batch_id, future
        try:
            # QoS 0 on purpose. With QoS 1 Mosquitto writes the PUBACK and then the response as two
            # small segments, and without `set_tcp_nodelay` Nagle holds the second until our delayed
            # ACK: ~44 ms per batch instead of <1 ms. The response is the acknowledgement that
            # matters, and a connection lost before it fails the batch below (callers retry).
            info = client.publish(CONTROL_TOPIC, json.dumps(payload), qos=0)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise DynsecError(names, f"publish failed: {mqtt.error_string(info.rc)}")
            try:
                async with asyncio.timeout(self._timeout):
                    responses = await future
            except TimeoutError:
                raise DynsecError(
                    names,
                    f"no response within {self._timeout}s (may {self._username!r} publish to {CONTROL_TOPIC}?)",
                ) from None
        finally:
            self._pending_id = self._pending = None
        if len(responses) != len(commands):
            raise DynsecError(names, f"expected {len(commands)} responses, got {len(responses)}")
        for cmd, resp in zip(commands, responses, strict=True):
            if resp.get("command") != cmd["command"]:
                raise DynsecError(names, f"response order mismatch: {resp.get('command')!r} for {cmd['command']!r}")
        return responses

    async def _run(self, commands: Sequence[Command], *, tolerate: Sequence[str] = ()) -> list[Response]:
        """Send a batch; raise DynsecError for the first error not listed in ``tolerate``."""
        if not commands:
            return []
        responses = await self._send(commands)
        for resp in responses:
            error = resp.get("error")
            if error and error not in tolerate:
                raise DynsecError(str(resp.get("command")), str(error))
        return responses

    # ------------------------------------------------------------------ reconciliation

    def _device_acls(self, device_id: str) -> list[Command]:
        acls: list[Command] = []
        for topic_filter in self._acl.rendered_publish(device_id):
            # MQTT filters ("a/+/<id>/#", which also matches "a/+/<id>"), as the embedded broker reads them.
            acls.append(_acl("publishClientSend", topic_filter, True, _ALLOW_PRIORITY))
        for topic in self._acl.rendered_downlink(device_id):
            # A device must not forge its own commands or overwrite its retained desired config.
            acls.append(_acl("publishClientSend", topic, False, _DENY_PRIORITY))
            # Literal: the filter must equal the topic, so `telemetra/+/cmd` or `#` never pass.
            acls.append(_acl("subscribeLiteral", topic, True, _ALLOW_PRIORITY))
        return acls

    @staticmethod
    def _service_acls() -> list[Command]:
        return [
            # The service account must not be able to rewrite credentials: that stays with the admin.
            _acl("publishClientSend", "$CONTROL/#", False, _DENY_PRIORITY),
            _acl("subscribePattern", "$CONTROL/#", False, _DENY_PRIORITY),
            _acl("publishClientSend", "#", True, _ALLOW_PRIORITY),
            # "#" also admits `$share/<group>/...` filters (the broker checks the filter after the
            # share prefix); `$SYS/#` needs its own entry since "#" never matches `$` topics.
            _acl("subscribePattern", "#", True, _ALLOW_PRIORITY),
            _acl("subscribePattern", "$SYS/#", True, _ALLOW_PRIORITY),
            _acl("publishClientReceive", "#", True, _ALLOW_PRIORITY),
            _acl("publishClientReceive", "$SYS/#", True, _ALLOW_PRIORITY),
            _acl("unsubscribePattern", "#", True, _ALLOW_PRIORITY),
        ]

    async def _reconcile(
        self,
        username: str,
        rolename: str,
        acls: list[Command],
        password: str | None,
        enabled: bool,
        textname: str,
    ) -> None:
        """Make client ``username`` exist with exactly role ``rolename`` (holding ``acls``).

        Reads first and changes only what differs, because every change disconnects the client.
        Another process racing us to create the same client or role makes a create fail with
        "already exists"; the second pass then sees it and updates instead.
        """
        for attempt in range(3):
            role_resp, client_resp = await self._run(
                [
                    {"command": "getRole", "rolename": rolename},
                    {"command": "getClient", "username": username},
                ],
                tolerate=(_ROLE_NOT_FOUND, _CLIENT_NOT_FOUND),
            )
            commands: list[Command] = []
            narrowed = False
            role = None if role_resp.get("error") else role_resp.get("data", {}).get("role", {})
            if role is None:
                commands.append({"command": "createRole", "rolename": rolename, "acls": acls})
            else:
                current = set(map(_acl_key, role.get("acls", [])))
                wanted = set(map(_acl_key, acls))
                if current != wanted:
                    # modifyRole with "acls" replaces the whole list in one step (no window without).
                    commands.append({"command": "modifyRole", "rolename": rolename, "acls": acls})
                    narrowed = bool(current - wanted)

            client = None if client_resp.get("error") else client_resp.get("data", {}).get("client", {})
            if client is None:
                create: Command = {
                    "command": "createClient",
                    "username": username,
                    "textname": textname,
                    "roles": [{"rolename": rolename}],
                }
                if password:
                    create["password"] = password
                commands.append(create)
                if not enabled:
                    # Same batch as createClient: the broker applies both before reading more packets.
                    commands.append({"command": "disableClient", "username": username})
            else:
                _check_owned(username, client, rolename, "modifyClient")
                if rolename not in {r.get("rolename") for r in client.get("roles", [])}:
                    commands.append({"command": "addClientRole", "username": username, "rolename": rolename})
                if password:
                    commands.append({"command": "setClientPassword", "username": username, "password": password})
                disabled = bool(client.get("disabled", False))
                if not enabled:
                    if not disabled:
                        commands.append({"command": "disableClient", "username": username})
                elif disabled:
                    commands.append({"command": "enableClient", "username": username})
                elif narrowed and not password:
                    # 2.0.11 checks publish ACLs live but keeps subscriptions made under the old ACLs
                    # after modifyRole, and has no kick command: disable+enable in one batch drops the
                    # client's sessions (they reconnect under the new ACLs) without a window in which
                    # the device is actually refused.
                    commands.append({"command": "disableClient", "username": username})
                    commands.append({"command": "enableClient", "username": username})

            try:
                await self._run(commands)
            except DynsecError as exc:
                if exc.error in _ALREADY_EXISTS and attempt < 2:
                    logger.info("dynsec %s raced with another provisioner; re-reading", exc.command)
                    continue
                raise
            if commands:
                logger.info("dynsec reconciled %s: %s", username, ", ".join(str(c["command"]) for c in commands))
            return

    # ------------------------------------------------------------------ public API

    async def upsert_device(self, device_id: str, password: str | None, *, enabled: bool = True) -> None:
        """Create or update the device's client and role. Idempotent.

        ``password=None`` leaves an existing password unchanged (a new client then has none and cannot
        connect until one is set). Passing a password always rewrites it, which disconnects the
        device's open sessions, so pass it only when it changed.
        """
        _check_device_id(device_id)
        async with self._lock:
            await self._reconcile(
                device_id,
                device_role_name(device_id),
                self._device_acls(device_id),
                password,
                enabled,
                textname=f"Telemetra device {device_id}",
            )

    async def set_password(self, device_id: str, password: str) -> None:
        """Rotate a device's password; its open sessions are disconnected. DynsecError if unknown."""
        _check_device_id(device_id)
        if not password:
            raise ValueError("password must not be empty")
        async with self._lock:
            await self._owned_device(device_id, "setClientPassword", missing_ok=False)
            await self._run([{"command": "setClientPassword", "username": device_id, "password": password}])
        logger.info("dynsec password rotated for device %s", device_id)

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        """Enable or disable a device; disabling also disconnects it. DynsecError if unknown."""
        _check_device_id(device_id)
        async with self._lock:
            command = "enableClient" if enabled else "disableClient"
            await self._owned_device(device_id, command, missing_ok=False)
            await self._run([{"command": command, "username": device_id}])
        logger.info("dynsec device %s %s", device_id, "enabled" if enabled else "disabled")

    async def delete_device(self, device_id: str) -> None:
        """Delete the device's client (disconnecting it) and its role. Missing ones are fine."""
        _check_device_id(device_id)
        async with self._lock:
            await self._owned_device(device_id, "deleteClient", missing_ok=True)
            await self._run(
                [
                    {"command": "deleteClient", "username": device_id},
                    {"command": "deleteRole", "rolename": device_role_name(device_id)},
                ],
                tolerate=(_CLIENT_NOT_FOUND, _ROLE_NOT_FOUND),
            )
        logger.info("dynsec device %s deleted", device_id)

    async def _owned_device(self, device_id: str, command: str, *, missing_ok: bool) -> None:
        """Raise DynsecError unless client ``device_id`` is a Telemetra device (or missing and that is ok).

        Mosquitto has no conditional commands, so the check and the change are two round trips; the
        window only matters if someone attaches foreign roles to a device client in between.
        """
        (resp,) = await self._run([{"command": "getClient", "username": device_id}], tolerate=(_CLIENT_NOT_FOUND,))
        if resp.get("error"):
            if not missing_ok:
                raise DynsecError(command, _CLIENT_NOT_FOUND)
            return
        _check_owned(device_id, resp.get("data", {}).get("client", {}), device_role_name(device_id), command)

    async def ensure_service_account(self, username: str, password: str) -> None:
        """Make the backend's account exist with role ``telemetra-service`` (everything but $CONTROL).

        Every Telemetra instance calls this at start-up with the same account, and rewriting a password
        disconnects all sessions using it, so the password is only rewritten when a probe login with it
        fails.
        """
        if not username or not password:
            raise ValueError("service account username and password must not be empty")
        if username.startswith(DEVICE_ROLE_PREFIX):
            raise ValueError(f"service account name must not start with {DEVICE_ROLE_PREFIX!r}")
        password_ok = await self._probe_login(username, password)
        async with self._lock:
            await self._reconcile(
                username,
                SERVICE_ROLE,
                self._service_acls(),
                None if password_ok else password,
                True,
                textname="Telemetra service account",
            )

    async def _probe_login(self, username: str, password: str) -> bool:
        """True when the broker accepts ``username``/``password`` right now."""
        return await asyncio.to_thread(self._probe_login_blocking, username, password)

    def _probe_login_blocking(self, username: str, password: str) -> bool:
        # Driven by hand with loop() in a worker thread rather than loop_start(): stopping paho's
        # background thread after a refused CONNACK costs up to a second per probe.
        outcome: list[bool] = []

        def on_connect(c: mqtt.Client, u: Any, f: Any, reason_code: ReasonCode, p: Any) -> None:
            outcome.append(not reason_code.is_failure)

        probe = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"telemetra-probe-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        probe.username_pw_set(username, password)
        if self._tls is not None:
            probe.tls_set_context(self._tls)
        probe.on_connect = on_connect
        deadline = time.monotonic() + self._timeout
        try:
            probe.connect(self._host, self._port, keepalive=10)
            while not outcome and time.monotonic() < deadline:
                if probe.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break  # the broker closes the connection after refusing it
        except OSError as exc:  # includes ssl.SSLError
            logger.debug("service account probe login failed: %s", exc)
            return False
        finally:
            probe.disconnect()
        return bool(outcome and outcome[0])
