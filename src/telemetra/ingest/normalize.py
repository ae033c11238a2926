"""Client JSON → typed values. Pure functions, no I/O; property-tested.

Accepted telemetry shapes (SPEC §4, PROTOCOLS.md):
- flat ``{"temperature": 22.5}``; nested objects flatten to dotted keys (``temperature.inlet``), arrays to
  indexed keys (``cells.0``);
- a device timestamp in ``ts`` or ``timestamp`` (epoch s/ms, or ISO 8601);
- values wrapped in ``values`` or ``metrics`` (seed 001's code);
- ``device_id`` / ``device`` names the device (seeds 001 and 003);
- a JSON array, or ``{"readings": [...]}``, is a batch.
Numbers are numeric series, booleans numeric 0/1 typed as booleans, strings text series, ``null`` skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from telemetra.domain.errors import InvalidInput
from telemetra.domain.records import Point, ValueType
from telemetra.domain.timeutil import epoch_to_ms, parse_iso_ms

DEVICE_FIELDS = ("device_id", "device", "deviceId")
TS_FIELDS = ("ts", "timestamp")
WRAPPER_FIELDS = ("values", "metrics")
META_FIELDS = frozenset((*DEVICE_FIELDS, *TS_FIELDS))
BATCH_FIELD = "readings"
NODE_FIELDS = frozenset(("name", "role", "firmware", "state", "node_id"))


@dataclass(frozen=True, slots=True)
class Limits:
    max_keys: int = 256
    max_key_length: int = 128
    max_depth: int = 8
    max_text_length: int = 1024
    max_batch_messages: int = 1000
    max_future_skew_ms: int = 300_000
    max_past_age_ms: int = 3650 * 86_400_000


@dataclass(frozen=True, slots=True)
class Value:
    key: str
    num: float | None
    text: str | None
    vtype: ValueType

    def at(self, ts: int) -> Point:
        return Point(self.key, ts, self.num, self.text, self.vtype)


@dataclass(frozen=True, slots=True)
class Message:
    """One normalised telemetry message. ``ts`` is None when the device sent no timestamp."""

    device_id: str | None
    ts: int | None
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class NodeReport:
    """Seed 000's node post: telemetry plus descriptive fields and a string state map."""

    message: Message
    name: str | None
    role: str | None
    firmware: str | None
    state: dict[str, str]


def split_batch(doc: Any, *, limits: Limits) -> list[Any]:
    """A document → the list of message objects it holds (one for a plain object)."""
    if isinstance(doc, Mapping) and isinstance(doc.get(BATCH_FIELD), list):
        items: list[Any] = doc[BATCH_FIELD]
        field = BATCH_FIELD
    elif isinstance(doc, list):
        items, field = doc, "body"
    elif isinstance(doc, Mapping):
        return [doc]
    else:
        raise InvalidInput("expected a JSON object or an array of objects", field="body")
    if not items:
        raise InvalidInput("the batch is empty", field=field)
    if len(items) > limits.max_batch_messages:
        raise InvalidInput(f"{len(items)} messages in one batch; the limit is {limits.max_batch_messages}", field=field)
    return items


def normalize_message(obj: Any, *, received_ms: int, limits: Limits, path: str = "body") -> Message:
    if not isinstance(obj, Mapping):
        raise InvalidInput("each message must be a JSON object", field=path)
    device_id = _device_id(obj, path)
    ts = _timestamp(obj, received_ms=received_ms, limits=limits, path=path)
    values: list[Value] = []
    for name, raw in obj.items():
        if name in META_FIELDS:
            continue
        if name in WRAPPER_FIELDS and isinstance(raw, Mapping):
            values.extend(_flatten(raw, "", 1, limits, f"{path}.{name}"))
        else:
            values.extend(_flatten({name: raw}, "", 1, limits, path))
        if len(values) > limits.max_keys:
            raise InvalidInput(f"more than {limits.max_keys} keys in one message", field=path)
    _no_duplicates(values, path)
    return Message(device_id, ts, tuple(values))


def normalize_node(obj: Any, *, received_ms: int, limits: Limits) -> NodeReport:
    """Seed 000: ``{"name","uptime","heap_free","peer_count","role","firmware","state":{…}}``, all optional."""
    if not isinstance(obj, Mapping):
        raise InvalidInput("expected a JSON object", field="body")
    telemetry = {k: v for k, v in obj.items() if k not in NODE_FIELDS}
    message = normalize_message(telemetry, received_ms=received_ms, limits=limits)
    state_raw = obj.get("state")
    state: dict[str, str] = {}
    if state_raw is not None:
        if not isinstance(state_raw, Mapping):
            raise InvalidInput("state must be an object of key → value", field="body.state")
        for key, value in state_raw.items():
            _check_key(key, limits, "body.state")
            if value is None:
                continue
            if isinstance(value, Mapping | list):
                raise InvalidInput("state values must be strings, numbers or booleans", field=f"body.state.{key}")
            text = _as_state_text(value)
            if len(text) > limits.max_text_length:
                raise InvalidInput(f"longer than {limits.max_text_length} characters", field=f"body.state.{key}")
            state[key] = text
    return NodeReport(
        message=message,
        name=_optional_text(obj, "name", limits),
        role=_optional_text(obj, "role", limits),
        firmware=_optional_text(obj, "firmware", limits),
        state=state,
    )


def _as_state_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _optional_text(obj: Mapping[str, Any], name: str, limits: Limits) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise InvalidInput("must be a string", field=f"body.{name}")
    text = str(value)
    if len(text) > limits.max_key_length:
        raise InvalidInput(f"longer than {limits.max_key_length} characters", field=f"body.{name}")
    return text


def _device_id(obj: Mapping[str, Any], path: str) -> str | None:
    for name in DEVICE_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not valid_device_id(value):
            raise InvalidInput(
                "device id must be 1-128 characters of letters, digits, '-', '_', '.', ':'", field=f"{path}.{name}"
            )
        return value
    return None


def valid_device_id(value: str) -> bool:
    return 0 < len(value) <= 128 and all(c.isascii() and (c.isalnum() or c in "-_.:") for c in value)


def _timestamp(obj: Mapping[str, Any], *, received_ms: int, limits: Limits, path: str) -> int | None:
    for name in TS_FIELDS:
        if name not in obj or obj[name] is None:
            continue
        ts = parse_timestamp(obj[name])
        field = f"{path}.{name}"
        if ts is None:
            raise InvalidInput("timestamp must be epoch seconds/milliseconds or ISO 8601", field=field)
        if ts > received_ms + limits.max_future_skew_ms:
            raise InvalidInput(
                f"timestamp is {(ts - received_ms) / 1000:.0f} s in the future; the allowed clock skew is "
                f"{limits.max_future_skew_ms / 1000:.0f} s",
                field=field,
            )
        if ts < received_ms - limits.max_past_age_ms:
            raise InvalidInput("timestamp is older than the accepted age", field=field)
        return ts
    return None


def parse_timestamp(raw: Any) -> int | None:
    """Epoch seconds/milliseconds (number or numeric string) or ISO 8601; None when it is none of them."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        try:
            number: float = float(text)
        except ValueError:
            return parse_iso_ms(text)
    elif isinstance(raw, int | float):
        number = raw
    else:
        return None
    try:
        if not math.isfinite(number):  # "inf", "nan", "1e400"
            return None
        return epoch_to_ms(number)
    except OverflowError:  # an integer too large for a float
        return None


def _flatten(obj: Mapping[str, Any] | list[Any], prefix: str, depth: int, limits: Limits, path: str) -> Iterator[Value]:
    if depth > limits.max_depth:
        raise InvalidInput(f"nested deeper than {limits.max_depth} levels", field=f"{path}.{prefix}".rstrip("."))
    items = obj.items() if isinstance(obj, Mapping) else ((str(i), v) for i, v in enumerate(obj))
    for name, raw in items:
        if not isinstance(name, str):
            raise InvalidInput("keys must be strings", field=path)
        key = f"{prefix}.{name}" if prefix else name
        if raw is None:
            continue
        if isinstance(raw, Mapping | list):
            yield from _flatten(raw, key, depth + 1, limits, path)
            continue
        _check_key(key, limits, path)
        yield _value(key, raw, limits, f"{path}.{key}")


def _check_key(key: Any, limits: Limits, path: str) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidInput("keys must be non-empty strings", field=path)
    if len(key) > limits.max_key_length:
        raise InvalidInput(f"key longer than {limits.max_key_length} characters", field=f"{path}.{key[:32]}…")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise InvalidInput("key contains control characters", field=path)


def _value(key: str, raw: Any, limits: Limits, field: str) -> Value:
    if isinstance(raw, bool):
        return Value(key, 1.0 if raw else 0.0, None, ValueType.BOOL)
    if isinstance(raw, int | float):
        try:
            num = float(raw)
        except OverflowError:
            raise InvalidInput("number out of range", field=field) from None
        if not math.isfinite(num):
            raise InvalidInput("number out of range", field=field)
        return Value(key, num, None, ValueType.NUMBER)
    if isinstance(raw, str):
        if len(raw) > limits.max_text_length:
            raise InvalidInput(f"text longer than {limits.max_text_length} characters", field=field)
        return Value(key, None, raw, ValueType.TEXT)
    raise InvalidInput(f"unsupported value type {type(raw).__name__}", field=field)


def _no_duplicates(values: list[Value], path: str) -> None:
    if len({v.key for v in values}) != len(values):
        seen: set[str] = set()
        for v in values:
            if v.key in seen:
                raise InvalidInput(f"key {v.key!r} appears twice (a dotted key and a nested one?)", field=path)
            seen.add(v.key)
