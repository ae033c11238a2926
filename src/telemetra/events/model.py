"""What a committed change looks like to everything that reacts to it (realtime streams, command waiters,
the registry cache, broker sessions, OTA, rules). Pure values.

Every event says what happened (``type`` and, for registry changes, ``data["change"]``), to which device,
and when (``ts``, UTC epoch ms of the change as stored). ``id`` is given by the hub that delivers it:
increasing within one process, so a client can ask to resume after the last one it saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

TELEMETRY: Final = "telemetry"  # data: values {key: number | bool | text}; raw: the MQTT payload, when there was one
STATE: Final = "state"  # data: values {key: text}; online, rssi, fw_version when reported
EVENT: Final = "event"  # data: name, payload
ALERT: Final = "alert"  # data: the alert as the API shows it
COMMAND: Final = "command"  # data: id, name, status (queued, sent, acked, failed, expired), result
DEVICE: Final = "device"  # data: change (created, updated, rotated, disabled, enabled, deleted, config, claimed)
OTA: Final = "ota"  # data: update_id, status, and the device's state when it is about one device

TYPES: Final = frozenset({TELEMETRY, STATE, EVENT, ALERT, COMMAND, DEVICE, OTA})


@dataclass(slots=True, eq=False)
class ChangeEvent:
    type: str
    device_id: str | None
    ts: int
    data: Mapping[str, Any]
    id: int = 0
    # Per stream format, the encoded message (built once, however many clients receive it).
    encoded: dict[str, str] = field(default_factory=dict, repr=False)
    # Per stream format, that message as a WebSocket frame (the same bytes for every uncompressed client).
    frames: dict[str, bytes] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Gap:
    """A subscriber fell behind (or asked to resume from further back than is kept): ``missed`` events
    it will never see."""

    missed: int
