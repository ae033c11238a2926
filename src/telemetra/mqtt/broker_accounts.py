"""Mosquitto's accounts follow the device registry — also through broker outages and Telemetra restarts.

- A registry change (device created, re-keyed, claimed, enabled or disabled, deleted) is applied to the
  broker at once when it is reachable. When it is not, the change waits: the registry itself says what
  each device must look like, except for a new secret, which it keeps only as a hash — so that one is
  kept here, in memory, until the broker has it.
- Every time the provisioner's connection becomes ready — at start and after every reconnect (a broker
  restart, a network cut) — waiting changes are applied first, then a full reconciliation compares every
  registry device with the broker's clients and roles and repairs what differs: clients and roles of
  deleted devices are removed, disabled devices disabled, missing roles created, ACLs rewritten, client-id
  bindings set. Each difference is counted (``telemetra_mqtt_account_drift_total{kind}`` and
  ``…_repairs_total{kind}``).
- A device re-keyed while the broker was unreachable, whose new secret was lost (Telemetra restarted
  before the broker came back), cannot be given it — the broker holds a hash, the registry another: its
  broker client is disabled, so the old secret stops working, and it counts in
  ``telemetra_mqtt_accounts_unrepaired`` until it is rotated again.

Between the broker accepting connections again and the reconciliation (typically well under a second:
the provisioner retries within 0.25–2 s), a secret revoked during the outage still logs in; what a
disabled or deleted device publishes then is refused by the collector (the registry says so), what a
re-keyed device's old secret publishes then is not told apart from the device.

Which side is read first matters: the broker's accounts are listed before the registry, so a device
created in between (registry first, then broker) is never mistaken for an orphan; every device that
differs is then re-read on both sides before anything is changed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter, defaultdict
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from telemetra.metrics import Metrics
from telemetra.mqtt.acl import is_valid_device_id
from telemetra.mqtt.backoff import Backoff
from telemetra.mqtt.dynsec import DynsecProvisioner
from telemetra.mqtt.dynsec_connection import DynsecError
from telemetra.mqtt.dynsec_plan import (
    DEVICE_ROLE_PREFIX,
    ForeignAccount,
    Plan,
    credential_fingerprint,
    device_role_name,
    is_telemetra_device,
    plan_account,
    secret_fingerprint,
)
from telemetra.storage.devices import DeviceCredentials, DeviceRepository

__all__ = ["MosquittoAccounts"]

log = logging.getLogger(__name__)

# First connection: retried like the collector's (the broker may start after us).
CONNECT_FIRST_S, CONNECT_CAP_S = 0.25, 5.0
# A reconciliation that failed while the connection stayed up (database unreachable, a timeout).
RETRY_S = 5.0


class MosquittoAccounts:
    """``async with MosquittoAccounts(...)``: owns the dynsec connection and the reconciliation task.

    Starting waits (up to ``timeout``) for the first connection and the service account, so the collector
    finds its account; an unreachable broker does not hold the start up — everything happens once it is
    reachable. :meth:`registry_changed` is the registry hook.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        admin_username: str,
        admin_password: str,
        device_roots: Sequence[str],
        downlink: Sequence[str],
        devices: DeviceRepository,
        metrics: Metrics,
        service_username: str | None = None,
        service_password: str | None = None,
        bind_client_id: bool = True,
        tls: ssl.SSLContext | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.provisioner = DynsecProvisioner(
            host=host,
            port=port,
            username=admin_username,
            password=admin_password,
            device_roots=device_roots,
            downlink=downlink,
            tls=tls,
            timeout=timeout,
            bind_client_id=bind_client_id,
            on_ready=self._connection_ready,
        )
        self._devices = devices
        self._metrics = metrics
        self._service = (service_username, service_password) if service_username and service_password else None
        self._timeout = timeout
        # New secrets the broker has not been given yet (it cannot be given them from the registry).
        self._secrets: dict[str, str] = {}
        # Devices with a registry change the broker has not seen yet.
        self._waiting: set[str] = set()
        self._unrepaired: set[str] = set()
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._synced = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="mqtt-accounts")
        self._task.add_done_callback(self._task_done)
        try:
            await asyncio.wait_for(self._started.wait(), self._timeout)
        except TimeoutError:
            log.warning("Mosquitto accounts: not in step with the registry yet; carrying on in the background")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.provisioner.close()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("Mosquitto accounts task died", exc_info=task.exception())

    def _connection_ready(self) -> None:
        # Every (re)connect: the broker may have restarted with an older state file, or missed changes.
        self._synced = False
        self._wake.set()

    def health(self) -> dict[str, Any]:
        alive = self._task is not None and not self._task.done()
        if alive and self.provisioner.ready:
            status = "ok" if self._synced else "syncing"
        else:
            status = "down"
        return {
            "status": status,
            "changes_pending": len(self._waiting | self._secrets.keys()),
            "unrepaired": len(self._unrepaired),
        }

    async def _run(self) -> None:
        backoff = Backoff(CONNECT_FIRST_S, CONNECT_CAP_S)
        failing: str | None = None
        while True:
            try:
                await self.provisioner.connect()
                break
            except DynsecError as exc:
                if str(exc) != failing:  # one line per change of state, not per attempt
                    log.warning("Mosquitto dynamic security not reachable (%s); retrying", exc)
                    failing = str(exc)
                self._started.set()
                await asyncio.sleep(backoff.next())
        # From here paho reconnects by itself, and every time the connection is ready again it wakes us.
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.provisioner.ready:
                continue
            try:
                await self._after_connect()
            except Exception as exc:
                self._metrics.mqtt_account_reconciliations.labels("failed").inc()
                log.warning("Mosquitto accounts: reconciliation failed (%s); retrying", exc)
                self._started.set()
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    async def _after_connect(self) -> None:
        if self._service is not None:
            await self.provisioner.ensure_service_account(*self._service)
        self._started.set()
        await self.reconcile()
        self._synced = True

    # ------------------------------------------------------------------ registry → broker

    async def registry_changed(self, device_id: str, secret: str | None, enabled: bool | None, deleted: bool) -> None:
        """The registry hook: apply a device's change now, or keep it for when the broker is back."""
        if secret is not None:
            self._secrets[device_id] = secret
        self._waiting.add(device_id)
        try:
            await self._sync_quietly(device_id)
        finally:
            self._metrics.mqtt_account_changes_pending.set(len(self._waiting | self._secrets.keys()))

    async def _sync_quietly(self, device_id: str) -> Plan | None:
        try:
            return await self.sync_device(device_id)
        except (ValueError, ForeignAccount) as exc:  # an id MQTT cannot carry, or someone else's account
            log.error("device %r is not mirrored into Mosquitto: %s", device_id, exc)
            self._waiting.discard(device_id)
            self._secrets.pop(device_id, None)
        except Exception as exc:
            log.warning(
                "device %s: Mosquitto not updated (%s); the change is applied when it is reachable again",
                device_id,
                exc,
            )
        return None

    async def sync_device(self, device_id: str) -> Plan:
        """Make the broker's account of ``device_id`` what the registry says, read afresh on both sides."""
        rows = await self._devices.credentials(device_id)
        creds = rows[0] if rows else None
        if creds is None or creds.secret_hash is None:
            plan = await self.provisioner.remove_device(device_id)
            self._secrets.pop(device_id, None)
        else:
            credential = credential_fingerprint(creds.secret_hash)
            secret = self._secrets.get(device_id)
            password = secret if secret is not None and secret_fingerprint(secret) == credential else None
            spec = self.provisioner.device_spec(device_id, enabled=not creds.disabled, credential=credential)
            plan = await self.provisioner.apply(spec, password=password)
            # Given to the broker now, or superseded by a later rotation: either way no longer needed.
            if self._secrets.get(device_id) == secret:
                self._secrets.pop(device_id, None)
        self._waiting.discard(device_id)
        if plan.unrepaired:
            self._unrepaired.add(device_id)
        else:
            self._unrepaired.discard(device_id)
        self._metrics.mqtt_accounts_unrepaired.set(len(self._unrepaired))
        return plan

    async def reconcile(self) -> Counter[str]:
        """Compare every registry device with the broker's accounts and repair what differs. Returns the
        kinds of drift found (also counted in the metrics)."""
        found: Counter[str] = Counter()
        repaired: Counter[str] = Counter()
        done: set[str] = set()

        async def repair(device_id: str) -> None:
            if device_id in done:
                return
            done.add(device_id)
            plan = await self._sync_quietly(device_id)
            if plan is not None:
                found.update(plan.drift)
                repaired.update(plan.repaired)

        # Revocations first: what an outage kept from the broker, before the longer full comparison.
        for device_id in sorted(self._waiting | self._secrets.keys()):
            await repair(device_id)
        broker = await self.provisioner.accounts()  # before the registry: see the module docstring
        registry = {c.id: c for c in await self._devices.credentials() if is_valid_device_id(c.id)}
        holders: dict[str, set[str]] = defaultdict(set)
        for username, client in broker.clients.items():
            for role in client.get("roles", []):
                holders[str(role.get("rolename"))].add(username)
        suspects: list[str] = []
        for device_id, creds in registry.items():
            if self._differs(device_id, creds, broker.clients.get(device_id), broker.roles, found):
                suspects.append(device_id)
        for username, client in broker.clients.items():
            if username not in registry and is_telemetra_device(client):
                suspects.append(username)
        for rolename in broker.roles:
            device_id = rolename[len(DEVICE_ROLE_PREFIX) :]
            if rolename.startswith(DEVICE_ROLE_PREFIX) and device_id not in registry:
                suspects.append(device_id)
        for device_id in suspects:
            creds = registry.get(device_id)
            others = holders.get(device_role_name(device_id), set()) - {device_id}
            if (creds is None or creds.secret_hash is None) and others:
                # Mosquitto 2.0.11's deleteRole leaves the role's other holders pointing at freed memory
                # (their role list shows garbage; the broker may crash): never delete one held elsewhere.
                log.error("not deleting role %s: also held by %s", device_role_name(device_id), sorted(others))
                found["foreign"] += 1
                done.add(device_id)
        for device_id in dict.fromkeys(suspects):
            await repair(device_id)
        for kind, n in found.items():
            self._metrics.mqtt_account_drift.labels(kind).inc(n)
        for kind, n in repaired.items():
            self._metrics.mqtt_account_repairs.labels(kind).inc(n)
        self._unrepaired &= registry.keys()
        self._metrics.mqtt_accounts_unrepaired.set(len(self._unrepaired))
        self._metrics.mqtt_account_changes_pending.set(len(self._waiting | self._secrets.keys()))
        self._metrics.mqtt_account_reconciliations.labels("ok").inc()
        if found:
            log.warning(
                "Mosquitto accounts differed from the registry: %s (repaired: %s; %d device(s) need a new secret)",
                dict(found),
                dict(repaired),
                len(self._unrepaired),
            )
        return found

    def _differs(
        self,
        device_id: str,
        creds: DeviceCredentials,
        client: dict[str, Any] | None,
        roles: dict[str, dict[str, Any]],
        found: Counter[str],
    ) -> bool:
        spec_role = f"{DEVICE_ROLE_PREFIX}{device_id}"
        if creds.secret_hash is None:  # no credentials: no broker account
            return (client is not None and is_telemetra_device(client)) or spec_role in roles
        credential = credential_fingerprint(creds.secret_hash)
        spec = self.provisioner.device_spec(device_id, enabled=not creds.disabled, credential=credential)
        secret = self._secrets.get(device_id)
        password = secret if secret is not None and secret_fingerprint(secret) == credential else None
        try:
            plan = plan_account(spec, password=password, client=client, role=roles.get(spec_role))
        except ForeignAccount:
            # A registry device named like someone else's account (the admin): never touched.
            found["foreign"] += 1
            return False
        return bool(plan.commands or plan.unrepaired)
