"""MQTT message → ``Batch``, through the same normaliser and ownership rules as HTTP. Whatever cannot
be taken becomes a rejected-message record with its reason (kept within the device's allowance,
``mqtt.rejections``): the collector never stops on bad input.

Over MQTT the authenticated topic names the device: a body ``device_id`` naming another one is
information, not a claim (a gateway's body still names its child). Our own downlink topics, which the
collector's wide subscription also receives, are ignored."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from telemetra.domain.errors import InvalidInput, TelemetraError
from telemetra.domain.principal import Principal, Role
from telemetra.domain.records import (
    AlertRaise,
    Batch,
    CommandAck,
    DeviceReport,
    Event,
    Origin,
    Rejected,
    StateUpdate,
)
from telemetra.domain.timeutil import now_ms
from telemetra.ingest.decode import decode_json
from telemetra.ingest.documents import check_document
from telemetra.ingest.service import IngestService
from telemetra.ingest.state import ack_fields, alert_fields, normalize_state, parse_any
from telemetra.mqtt.rejections import RejectionGate
from telemetra.mqtt.routes import Kind, RouteMatch, RouteTable
from telemetra.storage.directory import DeviceDirectory

log = logging.getLogger(__name__)


class Inbound:
    def __init__(
        self,
        table: RouteTable,
        ingest: IngestService,
        directory: DeviceDirectory,
        *,
        max_payload_bytes: int,
        gate: RejectionGate | None = None,
    ) -> None:
        self._table = table
        self._ingest = ingest
        self._directory = directory
        self._max_bytes = max_payload_bytes
        self._gate = gate
        # device → the firmware version its telemetry last named (seed 003's "version"): reported on change
        # only, not as one device-row update per reading.
        self._firmware: dict[str, str] = {}

    def refused_publish(self, device_id: str | None, topic: str, payload: bytes) -> Batch:
        """A publish the broker's ACL refused (embedded broker): kept and counted like any refusal."""
        reason = f"acl refused: {device_id or 'this client'} may not publish to {topic!r}"
        return self._limited(_rejected(now_ms(), topic, payload, device_id, reason))

    def _limited(self, batch: Batch) -> Batch:
        return batch if self._gate is None else self._gate.apply(batch)

    async def to_batches(self, messages: Sequence[tuple[str, bytes]]) -> list[Batch]:
        """One ``Batch`` per ``(topic, payload)``, in order, with one directory lookup for all of them.
        A message that cannot be interpreted becomes a rejected record; only a failed directory lookup
        raises (for the whole chunk)."""
        received = now_ms()
        match = self._table.match
        matches = [match(topic) for topic, _ in messages]
        ids = {m.device_id for m in matches if m is not None and m.kind is not Kind.DOWNLINK}
        known = await self._directory.get_many(ids) if ids else {}
        principals: dict[str, Principal] = {}
        out: list[Batch] = []
        for (topic, payload), found in zip(messages, matches, strict=True):
            if found is not None and "\x00" in topic:
                found = None  # MQTT forbids U+0000 in topics; such a topic is nobody's
            if found is None:
                owner = self._table.owner(topic)
                out.append(_rejected(received, topic, payload, owner, "no route: topic matches no configured route"))
                continue
            if found.kind is Kind.DOWNLINK:
                out.append(Batch())  # our own command or configuration, back through the wide subscription
                continue
            device_id = found.device_id
            info = known.get(device_id)
            if info is None:
                out.append(_rejected(received, topic, payload, device_id, "unknown device: not in the registry"))
                continue
            if info.disabled:
                out.append(_rejected(received, topic, payload, device_id, "disabled device"))
                continue
            principal = principals.get(device_id)
            if principal is None:
                principal = Principal(Role.GATEWAY if info.kind == "gateway" else Role.DEVICE, device_id)
                principals[device_id] = principal
            try:
                batch = await self._interpret(found, payload, received, principal)
                if not batch.rejected:
                    batch.origin = Origin("mqtt", found.kind.value, topic, payload, device_id, received)
                out.append(batch)
            except TelemetraError as exc:
                where = f" ({exc.field})" if exc.field else ""
                reason = "topic mismatch" if exc.code == "forbidden" else exc.code
                out.append(_rejected(received, topic, payload, device_id, f"{reason}: {exc.reason}{where}"))
            except Exception:  # one bad message is logged and kept, never stops delivery
                log.exception("could not interpret message on %s", topic)
                out.append(_rejected(received, topic, payload, device_id, "internal: could not interpret"))
        return [self._limited(batch) for batch in out]

    async def _interpret(self, match: RouteMatch, payload: bytes, received: int, principal: Principal) -> Batch:
        device_id = match.device_id
        limits = self._ingest.limits
        if len(payload) > self._max_bytes:
            return _rejected(
                received,
                None,
                payload[:256],
                device_id,
                f"too_large: {len(payload)} bytes; the limit is {self._max_bytes}",
            )
        if match.kind is Kind.TELEMETRY:
            doc = decode_json(payload, max_bytes=self._max_bytes)
            profile = match.route.profile
            firmware = _take_firmware(doc, profile.firmware_field)
            batch = await self._ingest.telemetry_batch(
                doc if firmware is None else {k: v for k, v in doc.items() if k != profile.firmware_field},
                principal,
                boot_clock_ms=profile.boot_clock_ms,
                body_device_informational=True,
            )
            if firmware is not None and self._firmware.get(device_id) != firmware:
                if len(self._firmware) >= 100_000:
                    self._firmware.clear()
                self._firmware[device_id] = firmware
                batch.reports.append(DeviceReport(device_id, received, fw_version=firmware))
            return batch
        batch = Batch()
        if match.kind is Kind.CONFIG:
            doc = parse_any(payload)
            if not isinstance(doc, dict):
                raise InvalidInput("a configuration report must be a JSON object", field="payload")
            batch.reports.append(DeviceReport(device_id, received, reported_config=doc))
            return batch
        if match.kind is Kind.STATE:
            state = normalize_state(payload, key=match.name, limits=limits)
            batch.reports.append(
                DeviceReport(
                    device_id,
                    received,
                    online=state.online,
                    rssi=state.rssi,
                    fw_version=state.fw_version,
                    reported_config=state.reported_config,
                    model=state.model,
                )
            )
            if state.values:
                batch.states.append(StateUpdate(device_id, received, state.values))
            return batch
        doc = parse_any(payload)
        check_document(doc, max_depth=limits.max_depth, max_text=limits.max_document_text)
        if match.kind is Kind.ALERT:
            fields = alert_fields(doc)
            batch.alerts.append(
                AlertRaise(device_id, received, fields.type, fields.severity, fields.message, fields.value, doc)
            )
            batch.events.append(Event(device_id, received, "alert", doc))
        elif match.kind is Kind.ACK:
            ack = ack_fields(doc)
            batch.acks.append(CommandAck(device_id, ack.command_id, received, ack.ok, ack.result))
            batch.events.append(Event(device_id, received, "ack", doc))
        else:
            batch.events.append(Event(device_id, received, (match.name or "event")[:128], doc))
        return batch


def _take_firmware(doc: object, field: str | None) -> str | None:
    if field is None or not isinstance(doc, dict):
        return None
    value = doc.get(field)
    return value[:64] if isinstance(value, str) and value else None


def _rejected(received: int, topic: str | None, payload: bytes, device_id: str | None, reason: str) -> Batch:
    return Batch(rejected=[Rejected(received, "mqtt", reason, payload, device_id=device_id, topic=topic)])
