"""From decoded client documents to a ``Batch``, applying who may write for which device.

Rules (SPEC §1): a device writes only its own data; a gateway writes its own and its children's,
auto-registering unknown children when allowed; a fleet key writes for any device id and registers it;
an admin writes for any device (seed 000's node path registers unknown nodes); anonymous node posts only
where the operator allowed them.
"""

from __future__ import annotations

from typing import Any

from telemetra.domain.errors import Forbidden, InvalidInput
from telemetra.domain.ids import reserved_reason
from telemetra.domain.principal import Principal, Role
from telemetra.domain.records import AutoRegister, Batch, DeviceReport, StateUpdate, Telemetry
from telemetra.domain.timeutil import now_ms
from telemetra.ingest.normalize import Limits, Message, normalize_message, normalize_node, split_batch
from telemetra.storage.directory import DeviceDirectory


class ServerClock:
    """Server timestamps that never repeat for one device: readings without a device time still get
    distinct (device, key, ts) identities, so two in one batch are both kept."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def stamp(self, device_id: str) -> int:
        now = now_ms()
        last = self._last.get(device_id, 0)
        ts = now if now > last else last + 1
        if len(self._last) > 200_000:
            self._last.clear()
        self._last[device_id] = ts
        return ts


class IngestService:
    def __init__(self, directory: DeviceDirectory, limits: Limits, *, gateway_auto_register: bool) -> None:
        self._directory = directory
        self._limits = limits
        self._gateway_auto_register = gateway_auto_register
        self._clock = ServerClock()

    @property
    def limits(self) -> Limits:
        return self._limits

    async def telemetry_batch(
        self,
        doc: Any,
        principal: Principal,
        *,
        path_device: str | None = None,
        boot_clock_ms: bool = False,
        body_device_informational: bool = False,
    ) -> Batch:
        """``boot_clock_ms``: the route's devices count milliseconds since boot in ``timestamp`` (seed 003).
        ``body_device_informational``: over MQTT the authenticated topic names the device; a body
        ``device_id`` naming another is information, not a claim (paku's heater says ``heater_<id>``)."""
        received = now_ms()
        items = split_batch(doc, limits=self._limits)
        field = "readings" if isinstance(doc, dict) and "readings" in doc else "body"
        messages = [
            normalize_message(
                item,
                received_ms=received,
                limits=self._limits,
                path=f"{field}[{i}]" if len(items) > 1 or field == "readings" else "body",
                boot_clock_ms=boot_clock_ms,
            )
            for i, item in enumerate(items)
        ]
        targets: list[str] = []
        for i, message in enumerate(messages):
            body_device = message.device_id
            if body_device_informational and principal.role is Role.DEVICE:
                body_device = None
            targets.append(self._target(body_device, principal, path_device, f"body[{i}].device_id"))
        if all(not m.values for m in messages):
            raise InvalidInput("the message carries no values", field="body")
        batch = Batch()
        await self._authorize(set(targets), principal, batch)
        for device_id, message in zip(targets, messages, strict=True):
            if message.values:
                batch.telemetry.append(self.to_telemetry(device_id, message))
        return batch

    async def node_batch(self, doc: Any, principal: Principal, node_id: str) -> Batch:
        received = now_ms()
        report = normalize_node(doc, received_ms=received, limits=self._limits)
        batch = Batch()
        await self._authorize({node_id}, principal, batch)
        if report.message.values:
            batch.telemetry.append(self.to_telemetry(node_id, report.message))
        if report.state:
            batch.states.append(StateUpdate(node_id, received, report.state))
        batch.reports.append(
            DeviceReport(node_id, received, online=True, fw_version=report.firmware, name=report.name, role=report.role)
        )
        return batch

    def to_telemetry(self, device_id: str, message: Message) -> Telemetry:
        ts = message.ts if message.ts is not None else self._clock.stamp(device_id)
        return Telemetry(device_id, ts, message.values, message.ts is not None)

    def _target(self, body_device: str | None, principal: Principal, path_device: str | None, field: str) -> str:
        if path_device is not None and body_device is not None and body_device != path_device:
            raise InvalidInput(
                f"device_id {body_device!r} in the body differs from {path_device!r} in the path", field=field
            )
        device_id = path_device or body_device
        if principal.role is Role.DEVICE:
            if device_id is not None and device_id != principal.device_id:
                raise Forbidden(f"this key belongs to device {principal.device_id!r}, not {device_id!r}", field=field)
            assert principal.device_id is not None
            return principal.device_id
        if device_id is None:
            if principal.role is Role.GATEWAY and principal.device_id is not None:
                return principal.device_id
            raise InvalidInput("device_id is required with this key", field=field)
        return device_id

    async def _authorize(self, targets: set[str], principal: Principal, batch: Batch) -> None:
        """Check the caller may write for every target; add registrations for the unknown ones it may create."""
        if principal.role is Role.DEVICE:
            return
        known = await self._directory.get_many(targets)
        for device_id in sorted(targets):
            info = known.get(device_id)
            if principal.role is Role.GATEWAY:
                if device_id == principal.device_id:
                    continue
                if info is None:
                    if not self._gateway_auto_register:
                        raise Forbidden(
                            f"unknown device {device_id!r} (gateway auto-registration is off)", field="device_id"
                        )
                    _may_register(device_id)
                    batch.register.append(AutoRegister(device_id, parent_id=principal.device_id))
                elif info.parent_id != principal.device_id:
                    raise Forbidden(
                        f"device {device_id!r} is not a child of gateway {principal.device_id!r}", field="device_id"
                    )
                elif info.disabled:
                    # As over MQTT: disabling a device stops its data, whoever relays it.
                    raise Forbidden(f"device {device_id!r} is disabled", field="device_id")
                continue
            if info is None:
                _may_register(device_id)
                batch.register.append(AutoRegister(device_id))
            elif info.disabled and principal.role is not Role.ADMIN:
                raise Forbidden(f"device {device_id!r} is disabled", field="device_id")


def _may_register(device_id: str) -> None:
    """Auto-registration creates only ids that could have been created by hand (the ids reaching here
    already passed ``valid_device_id``); a reserved one is refused for every caller."""
    reason = reserved_reason(device_id)
    if reason:
        raise Forbidden(reason, field="device_id")
