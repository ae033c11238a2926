"""What every transport turns a message into: the same typed records, whatever came in."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ValueType(enum.IntEnum):
    NUMBER = 0
    BOOL = 1
    TEXT = 2


class Value(NamedTuple):
    """One key's value in a message. ``vtype`` is a plain ``int`` of ``ValueType``: it goes to the
    database as it is. A named tuple, because the ingest path makes one per reading."""

    key: str
    num: float | None
    text: str | None
    vtype: int


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The values of one message for one device, all taken at ``ts`` (UTC epoch milliseconds).

    ``device_ts`` is True when the device stamped the reading itself; those readings are idempotent
    on (device, key, ts), so redeliveries are stored once.
    """

    device_id: str
    ts: int
    values: tuple[Value, ...]
    device_ts: bool


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """Key/value state of a device (seed 000's shared state, MQTT ``state`` topics)."""

    device_id: str
    ts: int
    values: dict[str, str]


@dataclass(frozen=True, slots=True)
class DeviceReport:
    """What a message says about the device itself: presence, radio, firmware, descriptive fields."""

    device_id: str
    ts: int
    online: bool | None = None
    rssi: int | None = None
    fw_version: str | None = None
    name: str | None = None
    role: str | None = None
    reported_config: dict[str, Any] | None = None
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    device_id: str
    ts: int
    name: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message we could not take, kept with its reason so an operator can see what devices send."""

    received_ts: int
    source: str
    reason: str
    payload: bytes
    device_id: str | None = None
    topic: str | None = None


@dataclass(frozen=True, slots=True)
class AutoRegister:
    """Create the device if it does not exist (fleet keys, gateway children, anonymous nodes)."""

    device_id: str
    kind: str = "device"
    parent_id: str | None = None


@dataclass(frozen=True, slots=True)
class AlertRaise:
    """A device-raised alert (``event/alert``, heat pump ``alerts``): active until acknowledged/cleared."""

    device_id: str
    ts: int
    type: str
    severity: str
    message: str | None
    value: float | None
    payload: Any


@dataclass(frozen=True, slots=True)
class CommandAck:
    """A device's answer to a command (``event/ack`` or the HTTP ack)."""

    device_id: str
    command_id: str
    ts: int
    ok: bool
    result: Any


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from, kept beside its records: should the database refuse them (a value it
    cannot store), the message is kept as a rejected record instead, with this payload."""

    transport: str
    kind: str  # telemetry, state, event, … (for the log: refusals are reported per kind and device)
    topic: str | None
    payload: bytes
    device_id: str | None
    received_ts: int


@dataclass(slots=True)
class Batch:
    """Everything one client message carries, committed together. ``origin`` is set on a single
    message's batch (not on merged ones) when the transport can keep a refused message as a record."""

    telemetry: list[Telemetry] = field(default_factory=list)
    states: list[StateUpdate] = field(default_factory=list)
    reports: list[DeviceReport] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    register: list[AutoRegister] = field(default_factory=list)
    alerts: list[AlertRaise] = field(default_factory=list)
    acks: list[CommandAck] = field(default_factory=list)
    origin: Origin | None = None
    # Messages refused and counted but not kept, because their device used up its allowance of rejected
    # records (mqtt.rejections): nothing to write, but the message was not taken either.
    suppressed: int = 0

    @property
    def point_count(self) -> int:
        return sum([len(t.values) for t in self.telemetry])

    @property
    def weight(self) -> int:
        """Queue accounting: points plus one per other record, so any message costs at least one."""
        return (
            self.point_count
            + len(self.states)
            + len(self.reports)
            + len(self.events)
            + len(self.rejected)
            + len(self.register)
            + len(self.alerts)
            + len(self.acks)
        ) or 1

    def extend(self, other: Batch) -> None:
        self.telemetry.extend(other.telemetry)
        self.states.extend(other.states)
        self.reports.extend(other.reports)
        self.events.extend(other.events)
        self.rejected.extend(other.rejected)
        self.register.extend(other.register)
        self.alerts.extend(other.alerts)
        self.acks.extend(other.acks)
        self.suppressed += other.suppressed
