"""What to send Mosquitto's dynamic security so one account matches what it should be (pure, no I/O).

The same planner serves a registry change (a device created, re-keyed, disabled, deleted) and the
reconciliation that compares the whole registry with the broker after every reconnect: it reads the
broker's view of one client and its role and returns the commands that bring them in line, plus the kinds
of difference it found (counted as drift by the reconciler).

The broker keeps only a PBKDF2 hash of a device's password and Telemetra only a SHA-256 of its secret, so
neither can tell from its own data whether the other holds the same credential. Each device client
therefore carries a *credential fingerprint* in its ``textdescription``, derived from the registry's
secret hash: equal fingerprints mean the broker has the registry's current secret. A client whose
fingerprint differs was re-keyed while the broker could not be told; without the new secret (kept in
memory only until the broker is back) the old one must stop working, so the client is disabled.

Mosquitto 2.0.11 facts the plan depends on (tests/mqtt/test_dynsec.py): ``modifyClient``,
``setClientPassword``, ``disableClient`` and ``deleteClient`` disconnect the client's sessions, so only
what differs is sent, and several changes go into one ``modifyClient``; ``modifyRole`` disconnects no one
and keeps subscriptions made under the old ACLs; ``addClientRole`` for a role the client already has fails;
``deleteRole`` of a role some client still holds leaves that client pointing at freed memory (its role
list reads back as garbage, and the broker can crash), so a role is deleted only in the same batch as, and
after, the one client that holds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from telemetra.domain.credentials import hash_secret
from telemetra.mqtt.dynsec_connection import Command, DynsecError

__all__ = [
    "DEVICE_ROLE_PREFIX",
    "AccountSpec",
    "ForeignAccount",
    "Plan",
    "credential_fingerprint",
    "device_role_name",
    "fingerprint_of",
    "is_telemetra_device",
    "plan_account",
    "plan_removal",
    "secret_fingerprint",
]

DEVICE_ROLE_PREFIX = "telemetra-dev-"
_MARKER = "telemetra credential "


def device_role_name(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def credential_fingerprint(secret_hash: str) -> str:
    """What the broker's copy of a device records about the secret it was given. Derived from the
    registry's hash (so the reconciler can compute it without the secret) under a label of its own, so it
    is no lookup key for the registry."""
    return hashlib.sha256(b"telemetra-mqtt-credential:" + secret_hash.encode()).hexdigest()[:32]


def secret_fingerprint(secret: str) -> str:
    return credential_fingerprint(hash_secret(secret))


def fingerprint_of(client: dict[str, Any]) -> str | None:
    """The fingerprint a broker client carries, or None (created before fingerprints, or not ours)."""
    text = client.get("textdescription")
    if isinstance(text, str) and text.startswith(_MARKER):
        return text[len(_MARKER) :]
    return None


def _marker(fingerprint: str) -> str:
    return _MARKER + fingerprint


def is_telemetra_device(client: dict[str, Any]) -> bool:
    """A broker client Telemetra made for a device: exactly its own role, no groups."""
    roles = [str(r.get("rolename")) for r in client.get("roles", [])]
    return roles == [device_role_name(str(client.get("username")))] and not client.get("groups")


class ForeignAccount(DynsecError):
    """The broker has a client of that name that Telemetra did not make (the admin, an operator's)."""


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """What one broker account must look like."""

    username: str
    rolename: str
    acls: list[Command]
    textname: str
    enabled: bool
    # Fingerprint of the secret the broker must hold; None: leave the credential as it is.
    credential: str | None = None
    # The only MQTT client id the account may connect with; None: any.
    client_id: str | None = None


@dataclass(slots=True)
class Plan:
    commands: list[Command] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)  # kinds of difference found
    unrepaired: list[str] = field(default_factory=list)  # kinds that these commands cannot fix

    @property
    def repaired(self) -> list[str]:
        return [kind for kind in self.drift if kind not in self.unrepaired]


def _acl_key(acl: dict[str, Any]) -> tuple[str, str, bool, int]:
    # The broker reports priority 0 for ACLs created without one.
    return (str(acl.get("acltype")), str(acl.get("topic")), bool(acl.get("allow")), int(acl.get("priority", 0)))


def _check_owned(username: str, client: dict[str, Any], rolename: str) -> None:
    """Refuse to touch a client that is not ours (e.g. the admin account): it holds other roles/groups."""
    foreign = sorted({str(r.get("rolename")) for r in client.get("roles", [])} - {rolename})
    groups = sorted(str(g.get("groupname")) for g in client.get("groups", []))
    if foreign or groups:
        raise ForeignAccount(
            "modifyClient",
            f"client {username!r} exists and is not managed by Telemetra (roles {foreign}, groups {groups}); "
            "refusing to change it",
        )


def plan_account(
    spec: AccountSpec, *, password: str | None, client: dict[str, Any] | None, role: dict[str, Any] | None
) -> Plan:
    """Commands that turn ``client``/``role`` (the broker's view, None when missing) into ``spec``.

    ``password``, when given, is the secret whose fingerprint is ``spec.credential`` (or, for an account
    without fingerprints, the password to set). Raises DynsecError when the client is not ours.
    """
    plan = Plan()
    commands = plan.commands
    narrowed = False
    if role is None:
        commands.append({"command": "createRole", "rolename": spec.rolename, "acls": spec.acls})
        plan.drift.append("missing_role")
    else:
        current = set(map(_acl_key, role.get("acls", [])))
        wanted = set(map(_acl_key, spec.acls))
        if current != wanted:
            # modifyRole with "acls" replaces the whole list in one step (no window without).
            commands.append({"command": "modifyRole", "rolename": spec.rolename, "acls": spec.acls})
            plan.drift.append("role_acls")
            narrowed = bool(current - wanted)

    if client is None:
        plan.drift.append("missing_client")
        if spec.credential is not None and password is None:
            # The registry has a secret the broker never got, and it cannot be recovered from the hash:
            # the device needs a new one (a rotation) before it can use MQTT.
            plan.unrepaired.append("missing_client")
            return plan
        create: Command = {
            "command": "createClient",
            "username": spec.username,
            "textname": spec.textname,
            "roles": [{"rolename": spec.rolename}],
        }
        if password:
            create["password"] = password
        if spec.credential is not None:
            create["textdescription"] = _marker(spec.credential)
        if spec.client_id is not None:
            create["clientid"] = spec.client_id
        commands.append(create)
        if not spec.enabled:
            # Same batch as createClient: the broker applies both before reading more packets.
            commands.append({"command": "disableClient", "username": spec.username})
        return plan

    _check_owned(spec.username, client, spec.rolename)
    if spec.rolename not in {r.get("rolename") for r in client.get("roles", [])}:
        commands.append({"command": "addClientRole", "username": spec.username, "rolename": spec.rolename})
        plan.drift.append("role_detached")

    modify: Command = {}
    current_credential = True
    if spec.credential is None:
        if password:  # an account without fingerprints (the service account): told to set this one
            modify["password"] = password
    else:
        have = fingerprint_of(client)
        if have != spec.credential:
            if password is not None:
                modify["password"] = password
                modify["textdescription"] = _marker(spec.credential)
                plan.drift.append("credentials_stale")
            elif have is None:
                # Made before fingerprints existed: nothing says its password is not the current one, and
                # disabling the whole fleet on upgrade would be worse. Adopt it.
                modify["textdescription"] = _marker(spec.credential)
                plan.drift.append("credentials_unmarked")
            else:
                # Re-keyed while the broker was unreachable, and the new secret is gone (Telemetra
                # restarted since): the old secret must stop working.
                current_credential = False
                plan.drift.append("credentials_stale")
                plan.unrepaired.append("credentials_stale")
    have_id = client.get("clientid") or None
    if have_id != spec.client_id:
        modify["clientid"] = spec.client_id or ""  # "" removes the binding
        plan.drift.append("client_id")
    if modify:
        commands.append({"command": "modifyClient", "username": spec.username, **modify})

    enabled = spec.enabled and current_credential
    disabled = bool(client.get("disabled", False))
    if not enabled and not disabled:
        commands.append({"command": "disableClient", "username": spec.username})
        plan.drift.append("enabled")
    elif enabled and disabled:
        commands.append({"command": "enableClient", "username": spec.username})
        plan.drift.append("disabled")
    elif narrowed and enabled and not modify:
        # 2.0.11 checks publish ACLs live but keeps subscriptions made under the old ACLs after modifyRole,
        # and has no kick command: disable+enable in one batch drops the client's sessions (they reconnect
        # under the new ACLs) without a window in which the device is actually refused.
        commands.append({"command": "disableClient", "username": spec.username})
        commands.append({"command": "enableClient", "username": spec.username})
    return plan


def plan_removal(username: str, *, client: dict[str, Any] | None, role: dict[str, Any] | None) -> Plan:
    """Commands that remove a device's client and role (those that exist), the client first (see the module
    docstring: the role must be held by no one when it goes). DynsecError if the client is not ours."""
    plan = Plan()
    if client is not None:
        _check_owned(username, client, device_role_name(username))
        plan.commands.append({"command": "deleteClient", "username": username})
        plan.drift.append("orphan_client")
    if role is not None:
        plan.commands.append({"command": "deleteRole", "rolename": device_role_name(username)})
        plan.drift.append("orphan_role")
    return plan
