"""Committed batches → the events that say what changed. Pure.

Only what the commit really changed becomes an event: a redelivered reading that the primary key
skipped is not one, a state key that kept its value is not one, a device that was already online does
not come online again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from telemetra.domain.records import Batch, Telemetry, ValueType
from telemetra.events import model
from telemetra.events.model import ChangeEvent
from telemetra.storage.writes import Changes

_BOOL, _TEXT = int(ValueType.BOOL), int(ValueType.TEXT)


def events_of(parts: Sequence[Batch], changes: Changes, *, now: int, telemetry: bool = True) -> list[ChangeEvent]:
    """The events of one committed transaction, in the order of its messages. ``telemetry=False`` leaves
    the (numerous) telemetry events out when nobody listens for them."""
    out: list[ChangeEvent] = []
    inserted = changes.inserted
    for part in parts:
        if telemetry and part.telemetry:
            raw = part.origin.payload if part.origin is not None and part.origin.kind == model.TELEMETRY else None
            for record in part.telemetry:
                values = _values(record, inserted)
                if values:
                    out.append(
                        ChangeEvent(model.TELEMETRY, record.device_id, record.ts, {"values": values, "raw": raw})
                    )
        for event in part.events:
            out.append(
                ChangeEvent(model.EVENT, event.device_id, event.ts, {"name": event.name, "payload": event.payload})
            )
    out.extend(_states(parts, changes, now))
    for alert in changes.alerts:
        change = "raised" if alert.get("count", 1) == 1 else "repeated"  # a repeat of an open one counts up
        out.append(
            ChangeEvent(model.ALERT, alert["device_id"], alert["updated_at"], {"alert": alert, "change": change})
        )
    for command_id, device_id, status in changes.commands:
        out.append(ChangeEvent(model.COMMAND, device_id, now, {"id": command_id, "status": status}))
    return out


def _values(record: Telemetry, inserted: set[tuple[str, str, int]] | None) -> dict[str, Any]:
    device_id, ts = record.device_id, record.ts
    values: dict[str, Any] = {}
    for key, num, text, vtype in record.values:
        if inserted is not None and (device_id, key, ts) not in inserted:
            continue  # stored before: a redelivery
        values[key] = text if vtype == _TEXT else (bool(num) if vtype == _BOOL else num)
    return values


def _states(parts: Sequence[Batch], changes: Changes, now: int) -> list[ChangeEvent]:
    """One state event per device: the keys that changed, and what it reported about itself."""
    by_device: dict[str, dict[str, Any]] = {}
    stamps: dict[str, int] = {}
    for device_id, key, value, ts in changes.states:
        by_device.setdefault(device_id, {}).setdefault("values", {})[key] = value
        stamps[device_id] = max(ts, stamps.get(device_id, 0))
    for part in parts:
        for report in part.reports:
            fields = {
                name: getattr(report, name)
                for name in ("online", "rssi", "fw_version")
                if getattr(report, name) is not None
            }
            if fields:
                by_device.setdefault(report.device_id, {}).update(fields)
                stamps[report.device_id] = max(report.ts, stamps.get(report.device_id, 0))
    for device_id in changes.came_online:
        entry = by_device.setdefault(device_id, {})
        entry.setdefault("online", True)
        stamps.setdefault(device_id, now)
    return [
        ChangeEvent(model.STATE, device_id, stamps.get(device_id, now), data) for device_id, data in by_device.items()
    ]
