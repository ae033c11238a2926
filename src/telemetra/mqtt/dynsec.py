"""Keep Mosquitto's per-device credentials and ACLs in step with Telemetra's device registry.

External-broker mode (SPEC §2) pushes credentials and ACLs into Mosquitto's dynamic-security plugin
through its control topic (:mod:`telemetra.mqtt.dynsec_connection`). Mosquitto 2.0 does not substitute
``%u``/``%c`` in dynsec ACLs, so every device gets a role of its own (``telemetra-dev-<id>``) holding
literal topics rendered from the same :class:`~telemetra.mqtt.acl.TopicAcl` templates the embedded broker
enforces; what to send is planned by :mod:`telemetra.mqtt.dynsec_plan`.

Client ids: Mosquitto lets any authenticated client connect with any client id, and a connection with a
client id in use takes the session over — the other connection is dropped, and with clean start off the
newcomer inherits its subscriptions and queued messages (2.0.11, tests/reliability/test_client_id_takeover.py).
With ``bind_client_id`` each device client is bound to the client id equal to its device id (dynsec's
``clientid``: the broker refuses the CONNECT before looking at sessions), so no device can use another's
id or the collector's. Independently, each device role only lets the device *receive* its own downlink
topics: a session taken over by anyone else (binding off) delivers them nothing.

Other Mosquitto 2.0.11 behaviour relied on (tests/mqtt/test_dynsec.py):

* ``addClientRole`` for a role the client already has fails with "Internal error";
* if the broker cannot write its state file (e.g. owned by root while the broker runs as ``mosquitto``)
  every command still succeeds and the change is lost on restart - only the broker log says so.

Device ids share the client namespace with the admin and service accounts, so every operation first
checks that an existing client is one of ours (it holds no role but its own): a device registered as
``admin`` must not be able to reset the admin's password.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from telemetra.mqtt.acl import TopicAcl, is_valid_device_id
from telemetra.mqtt.dynsec_connection import CONTROL_TOPIC, RESPONSE_TOPIC, Command, DynsecConnection, DynsecError
from telemetra.mqtt.dynsec_plan import (
    DEVICE_ROLE_PREFIX,
    AccountSpec,
    Plan,
    device_role_name,
    plan_account,
    plan_removal,
    secret_fingerprint,
)

__all__ = [
    "CONTROL_TOPIC",
    "DEVICE_ROLE_PREFIX",
    "RESPONSE_TOPIC",
    "SERVICE_ROLE",
    "BrokerAccounts",
    "DynsecError",
    "DynsecProvisioner",
    "device_role_name",
]

logger = logging.getLogger(__name__)

SERVICE_ROLE = "telemetra-service"

# Within one role Mosquitto evaluates ACLs of higher priority first and the first match decides: the
# specific entries (a downlink deny inside the "<root>#" allow, the own-downlink receive allow inside the
# "#" receive deny) must come before the general ones.
_GENERAL = 0
_SPECIFIC = 10

# Error strings of Mosquitto 2.0.11's dynsec plugin that idempotent operations accept.
_CLIENT_NOT_FOUND = "Client not found"
_ROLE_NOT_FOUND = "Role not found"
_ALREADY_EXISTS = ("Client already exists", "Role already exists")
# listClients / listRoles page size: a verbose role is ~1 KB of JSON.
_PAGE = 500


def _check_device_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not is_valid_device_id(device_id):
        raise ValueError(f"invalid device id {device_id!r}: must be non-empty without '+', '#', '/' or NUL")


def _acl(acltype: str, topic: str, allow: bool, priority: int) -> Command:
    return {"acltype": acltype, "topic": topic, "allow": allow, "priority": priority}


@dataclass(frozen=True, slots=True)
class BrokerAccounts:
    """The broker's clients and roles, by name (``listClients``/``listRoles``, verbose)."""

    clients: dict[str, dict[str, Any]]
    roles: dict[str, dict[str, Any]]


class DynsecProvisioner(DynsecConnection):
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
        bind_client_id: bool = False,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        # TopicAcl validates the templates ({device} exactly once, publish filters "a/+/{device}/#", exact
        # downlink topics), the same rules the embedded broker uses.
        self._acl = TopicAcl(device_roots=tuple(device_roots), downlink=tuple(downlink))
        self._bind_client_id = bind_client_id
        super().__init__(
            host=host,
            port=port,
            username=username,
            password=password,
            tls=tls,
            timeout=timeout,
            client_id=client_id,
            on_ready=on_ready,
        )

    # ------------------------------------------------------------------ what accounts look like

    def device_acls(self, device_id: str) -> list[Command]:
        acls: list[Command] = []
        for topic_filter in self._acl.rendered_publish(device_id):
            # MQTT filters ("a/+/<id>/#", which also matches "a/+/<id>"), as the embedded broker reads them.
            acls.append(_acl("publishClientSend", topic_filter, True, _GENERAL))
        for topic in self._acl.rendered_downlink(device_id):
            # A device must not forge its own commands or overwrite its retained desired config.
            acls.append(_acl("publishClientSend", topic, False, _SPECIFIC))
            # Literal: the filter must equal the topic, so `telemetra/+/cmd` or `#` never pass.
            acls.append(_acl("subscribeLiteral", topic, True, _GENERAL))
            acls.append(_acl("publishClientReceive", topic, True, _SPECIFIC))
        # Checked at delivery (2.0.11 also checks queued messages): whoever holds a device's session gets
        # nothing but that device's downlink, even the session of another device or of the collector.
        acls.append(_acl("publishClientReceive", "#", False, _GENERAL))
        return acls

    def device_spec(self, device_id: str, *, enabled: bool, credential: str | None) -> AccountSpec:
        _check_device_id(device_id)
        return AccountSpec(
            username=device_id,
            rolename=device_role_name(device_id),
            acls=self.device_acls(device_id),
            textname=f"Telemetra device {device_id}",
            enabled=enabled,
            credential=credential,
            client_id=device_id if self._bind_client_id else None,
        )

    @staticmethod
    def _service_acls() -> list[Command]:
        return [
            # The service account must not be able to rewrite credentials: that stays with the admin.
            _acl("publishClientSend", "$CONTROL/#", False, _SPECIFIC),
            _acl("subscribePattern", "$CONTROL/#", False, _SPECIFIC),
            _acl("publishClientSend", "#", True, _GENERAL),
            # "#" also admits `$share/<group>/...` filters (the broker checks the filter after the
            # share prefix); `$SYS/#` needs its own entry since "#" never matches `$` topics.
            _acl("subscribePattern", "#", True, _GENERAL),
            _acl("subscribePattern", "$SYS/#", True, _GENERAL),
            _acl("publishClientReceive", "#", True, _GENERAL),
            _acl("publishClientReceive", "$SYS/#", True, _GENERAL),
            _acl("unsubscribePattern", "#", True, _GENERAL),
        ]

    # ------------------------------------------------------------------ reading

    async def _read(self, username: str, rolename: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        role_resp, client_resp = await self._run(
            [{"command": "getRole", "rolename": rolename}, {"command": "getClient", "username": username}],
            tolerate=(_ROLE_NOT_FOUND, _CLIENT_NOT_FOUND),
        )
        role = None if role_resp.get("error") else role_resp.get("data", {}).get("role", {})
        client = None if client_resp.get("error") else client_resp.get("data", {}).get("client", {})
        return client, role

    async def accounts(self) -> BrokerAccounts:
        """Every client and role the broker has, page by page (each page is one short lock hold)."""
        clients = await self._list("listClients", "clients", "username")
        roles = await self._list("listRoles", "roles", "rolename")
        return BrokerAccounts(clients, roles)

    async def _list(self, command: str, key: str, name: str) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        offset = 0
        while True:
            (resp,) = await self.run([{"command": command, "verbose": True, "count": _PAGE, "offset": offset}])
            page = resp.get("data", {}).get(key, [])
            for item in page:
                found[str(item.get(name))] = item
            offset += len(page)
            if len(page) < _PAGE or offset >= int(resp.get("data", {}).get("totalCount", 0)):
                return found

    # ------------------------------------------------------------------ changing

    async def apply(self, spec: AccountSpec, *, password: str | None = None) -> Plan:
        """Make the account match ``spec``: read the broker's copy, send only what differs (every change
        disconnects the client). Returns what was done. Another process racing us to create the same
        client or role makes a create fail with "already exists"; the next pass sees it and updates."""
        async with self._lock:
            for attempt in range(3):
                client, role = await self._read(spec.username, spec.rolename)
                plan = plan_account(spec, password=password, client=client, role=role)
                try:
                    await self._run(plan.commands)
                except DynsecError as exc:
                    if exc.error in _ALREADY_EXISTS and attempt < 2:
                        logger.info("dynsec %s raced with another provisioner; re-reading", exc.command)
                        continue
                    raise
                if plan.commands:
                    names = ", ".join(str(c["command"]) for c in plan.commands)
                    logger.info("dynsec reconciled %s: %s", spec.username, names)
                return plan
        raise AssertionError("unreachable")

    async def remove_device(self, device_id: str) -> Plan:
        """Delete the device's client (disconnecting it) and its role, those that exist."""
        _check_device_id(device_id)
        async with self._lock:
            client, role = await self._read(device_id, device_role_name(device_id))
            plan = plan_removal(device_id, client=client, role=role)
            await self._run(plan.commands, tolerate=(_CLIENT_NOT_FOUND, _ROLE_NOT_FOUND))
        if plan.commands:
            logger.info("dynsec device %s deleted", device_id)
        return plan

    async def upsert_device(self, device_id: str, password: str | None, *, enabled: bool = True) -> None:
        """Create or update the device's client and role. Idempotent.

        ``password=None`` leaves an existing password unchanged (a new client then has none and cannot
        connect until one is set). A password the broker already holds (same fingerprint) is not
        rewritten, so repeating an upsert disconnects no one.
        """
        _check_device_id(device_id)
        credential = secret_fingerprint(password) if password else None
        await self.apply(self.device_spec(device_id, enabled=enabled, credential=credential), password=password)

    async def set_password(self, device_id: str, password: str) -> None:
        """Rotate a device's password; its open sessions are disconnected. DynsecError if unknown."""
        _check_device_id(device_id)
        if not password:
            raise ValueError("password must not be empty")
        client = await self._owned_device(device_id, "setClientPassword", missing_ok=False)
        assert client is not None
        spec = self.device_spec(device_id, enabled=not client.get("disabled"), credential=secret_fingerprint(password))
        await self.apply(spec, password=password)
        logger.info("dynsec password rotated for device %s", device_id)

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        """Enable or disable a device; disabling also disconnects it. DynsecError if unknown."""
        _check_device_id(device_id)
        command = "enableClient" if enabled else "disableClient"
        await self._owned_device(device_id, command, missing_ok=False)
        await self.run([{"command": command, "username": device_id}])
        logger.info("dynsec device %s %s", device_id, "enabled" if enabled else "disabled")

    async def delete_device(self, device_id: str) -> None:
        """Delete the device's client (disconnecting it) and its role. Missing ones are fine."""
        await self.remove_device(device_id)

    async def _owned_device(self, device_id: str, command: str, *, missing_ok: bool) -> dict[str, Any] | None:
        """The client ``device_id`` if it is a Telemetra device; DynsecError if it is someone else's (or
        missing, unless that is ok).

        Mosquitto has no conditional commands, so the check and the change are two round trips; the
        window only matters if someone attaches foreign roles to a device client in between.
        """
        (resp,) = await self.run([{"command": "getClient", "username": device_id}], tolerate=(_CLIENT_NOT_FOUND,))
        if resp.get("error"):
            if not missing_ok:
                raise DynsecError(command, _CLIENT_NOT_FOUND)
            return None
        client: dict[str, Any] = resp.get("data", {}).get("client", {})
        plan_removal(device_id, client=client, role=None)  # raises when not ours
        return client

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
        spec = AccountSpec(
            username=username,
            rolename=SERVICE_ROLE,
            acls=self._service_acls(),
            textname="Telemetra service account",
            enabled=True,
        )
        await self.apply(spec, password=None if password_ok else password)

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
