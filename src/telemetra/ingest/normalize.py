"""Client JSON → typed values. Pure functions, no I/O; property-tested.

Accepted telemetry shapes (SPEC §4, PROTOCOLS.md):
- flat ``{"temperature": 22.5}``; nested objects flatten to dotted keys (``temperature.inlet``), arrays to
  indexed keys (``cells.0``);
- a device timestamp in ``ts`` or ``timestamp`` (epoch s/ms, or ISO 8601). A device clock is not always a
  wall clock (seed 003's firmware sends ``millis()`` since boot): a value before 2001, as epoch ms or s, is
  not a time — the reading is stamped on arrival and the device's value kept as a series of its own (under
  its field name). Where a route says the device counts milliseconds since boot (``boot_clock_ms``), any
  number below epoch-millisecond magnitude is read that way. Only a wall-clock time beyond the allowed skew
  (or older than the allowed age) is refused;
- values wrapped in ``values`` or ``metrics`` (seed 001's code);
- ``device_id`` / ``device`` names the device (seeds 001 and 003);
- a JSON array, or ``{"readings": [...]}``, is a batch.
Numbers are numeric series, booleans numeric 0/1 typed as booleans, strings text series, ``null`` skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from telemetra.domain.errors import InvalidInput
from telemetra.domain.records import Value, ValueType
from telemetra.domain.timeutil import epoch_to_ms, parse_iso_ms

DEVICE_FIELDS = ("device_id", "device", "deviceId")
TS_FIELDS = ("ts", "timestamp")
WRAPPER_FIELDS = ("values", "metrics")
META_FIELDS = frozenset((*DEVICE_FIELDS, *TS_FIELDS))
BATCH_FIELD = "readings"
# 2001-01-01T00:00:00Z. A device "time" before it is a clock that was never set (boot-relative, or an RTC
# that starts at 1970), not a moment: it cannot be a reading's time.
WALL_CLOCK_FROM_MS = 978_307_200_000
# Epoch milliseconds from here on (1973 in ms; year 5138 in seconds): the magnitude that tells ms from s.
EPOCH_MS_FROM = 100_000_000_000
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
    # Strings inside free-form documents (event payloads, reported config): bounded by the payload size.
    max_document_text: int = 256 * 1024


# Built with tuple.__new__ directly: a named tuple's own constructor is a Python-level call, and the
# hot path makes one value per reading.
_new_value = partial(tuple.__new__, Value)
_NUMBER, _BOOL, _TEXT = int(ValueType.NUMBER), int(ValueType.BOOL), int(ValueType.TEXT)


class Message(NamedTuple):
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


def normalize_message(
    obj: Any, *, received_ms: int, limits: Limits, path: str = "body", boot_clock_ms: bool = False
) -> Message:
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise InvalidInput("each message must be a JSON object", field=path)
    device_id = _device_id(obj, path)
    ts, device_clock = _timestamp(obj, received_ms=received_ms, limits=limits, path=path, boot_clock_ms=boot_clock_ms)
    values: list[Value] = [] if device_clock is None else [device_clock]
    append = values.append
    clean_keys, max_key_length = _CLEAN_KEYS, limits.max_key_length
    nested = False
    for name, raw in obj.items():
        if raw is None or name in META_FIELDS:
            continue
        kind = type(raw)
        if kind is dict or kind is list:
            nested = True
            if name in WRAPPER_FIELDS and kind is dict:
                values.extend(_flatten(raw, "", 1, limits, f"{path}.{name}"))
            else:
                values.extend(_flatten(raw, name, 2, limits, path))
            if len(values) > limits.max_keys:
                raise InvalidInput(f"more than {limits.max_keys} keys in one message", field=path)
            continue
        # The common case, a flat reading: no generator, no wrapping dict, no call for a finite float.
        if name not in clean_keys or len(name) > max_key_length:
            _check_key(name, limits, path)
        if kind is float and raw - raw == 0.0:  # finite (inf - inf and nan - nan are nan)
            append(_new_value((name, raw, None, _NUMBER)))
        else:
            append(_value(name, raw, limits, path))
    if len(values) > limits.max_keys:
        raise InvalidInput(f"more than {limits.max_keys} keys in one message", field=path)
    if nested:  # a flat object cannot repeat a key; a dotted key beside a nested one can
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
            if "\x00" in text:
                raise InvalidInput("must not contain NUL characters", field=f"body.state.{key}")
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
    if "\x00" in text:
        raise InvalidInput("must not contain NUL characters", field=f"body.{name}")
    return text


def _device_id(obj: Mapping[str, Any], path: str) -> str | None:
    if "device_id" not in obj and "device" not in obj and "deviceId" not in obj:
        return None  # the usual case: the key or the path names the device
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


def _timestamp(
    obj: Mapping[str, Any], *, received_ms: int, limits: Limits, path: str, boot_clock_ms: bool = False
) -> tuple[int | None, Value | None]:
    """The reading's time (None: stamp on arrival) and, for a device clock that is not a wall clock, the
    device's value as a value of its own."""
    name, raw = "ts", obj.get("ts")
    if raw is None:
        name, raw = "timestamp", obj.get("timestamp")
        if raw is None:
            return None, None
    if type(raw) is int and WALL_CLOCK_FROM_MS <= raw < 100_000_000_000_000:  # epoch ms, the usual
        ts: int | None = raw
    else:
        number = isinstance(raw, int | float) and not isinstance(raw, bool)
        if number and boot_clock_ms and 0 <= raw < EPOCH_MS_FROM:
            return None, _value(name, raw, limits, path)
        ts = parse_timestamp(raw)
        if ts is not None and ts < WALL_CLOCK_FROM_MS:
            if ts < 0:
                raise InvalidInput("timestamp must not be negative", field=f"{path}.{name}")
            return None, _value(name, raw, limits, path)
    if ts is None:
        raise InvalidInput("timestamp must be epoch seconds/milliseconds or ISO 8601", field=f"{path}.{name}")
    if ts > received_ms + limits.max_future_skew_ms:
        raise InvalidInput(
            f"timestamp is {(ts - received_ms) / 1000:.0f} s in the future; the allowed clock skew is "
            f"{limits.max_future_skew_ms / 1000:.0f} s",
            field=f"{path}.{name}",
        )
    if ts < received_ms - limits.max_past_age_ms:
        raise InvalidInput("timestamp is older than the accepted age", field=f"{path}.{name}")
    return ts, None


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


def _flatten(obj: dict[str, Any] | list[Any], prefix: str, depth: int, limits: Limits, path: str) -> Iterator[Value]:
    if depth > limits.max_depth:
        raise InvalidInput(f"nested deeper than {limits.max_depth} levels", field=f"{path}.{prefix}".rstrip("."))
    items = obj.items() if isinstance(obj, dict) else ((str(i), v) for i, v in enumerate(obj))
    for name, raw in items:
        if not isinstance(name, str):
            raise InvalidInput("keys must be strings", field=path)
        key = f"{prefix}.{name}" if prefix else name
        if raw is None:
            continue
        if isinstance(raw, dict | list):
            yield from _flatten(raw, key, depth + 1, limits, path)
            continue
        _check_key(key, limits, path)
        yield _value(key, raw, limits, path)


# Keys seen to be free of control characters. Devices send the same few keys over and over, so the
# character scan runs once per key instead of once per reading; bounded, cleared when full.
_CLEAN_KEYS: set[str] = set()
_CLEAN_KEYS_MAX = 100_000


def _check_key(key: Any, limits: Limits, path: str) -> None:
    if key in _CLEAN_KEYS:
        if len(key) > limits.max_key_length:
            raise InvalidInput(f"key longer than {limits.max_key_length} characters", field=f"{path}.{key[:32]}…")
        return
    if not isinstance(key, str) or not key:
        raise InvalidInput("keys must be non-empty strings", field=path)
    if len(key) > limits.max_key_length:
        raise InvalidInput(f"key longer than {limits.max_key_length} characters", field=f"{path}.{key[:32]}…")
    if any(ord(c) < 32 or c == "\x7f" for c in key):
        raise InvalidInput("key contains control characters", field=path)
    if len(_CLEAN_KEYS) >= _CLEAN_KEYS_MAX:
        _CLEAN_KEYS.clear()
    _CLEAN_KEYS.add(key)


def _value(key: str, raw: Any, limits: Limits, path: str) -> Value:
    """``path`` is where ``key`` sits; the field named in an error is built only when there is one."""
    kind = type(raw)
    if kind is float:
        if raw - raw != 0.0:  # inf or nan, without a call
            raise InvalidInput("number out of range", field=f"{path}.{key}")
        return _new_value((key, raw, None, _NUMBER))
    if kind is bool:
        return _new_value((key, 1.0 if raw else 0.0, None, _BOOL))
    if isinstance(raw, int | float):
        try:
            num = float(raw)
        except OverflowError:
            raise InvalidInput("number out of range", field=f"{path}.{key}") from None
        if not math.isfinite(num):
            raise InvalidInput("number out of range", field=f"{path}.{key}")
        return _new_value((key, num, None, _NUMBER))
    if isinstance(raw, str):
        if len(raw) > limits.max_text_length:
            raise InvalidInput(f"text longer than {limits.max_text_length} characters", field=f"{path}.{key}")
        if "\x00" in raw:  # PostgreSQL cannot store it; refused here rather than by the database
            raise InvalidInput("text must not contain NUL characters", field=f"{path}.{key}")
        return _new_value((key, None, raw, _TEXT))
    raise InvalidInput(f"unsupported value type {type(raw).__name__}", field=f"{path}.{key}")


def _no_duplicates(values: list[Value], path: str) -> None:
    if len({v.key for v in values}) != len(values):
        seen: set[str] = set()
        for v in values:
            if v.key in seen:
                raise InvalidInput(f"key {v.key!r} appears twice (a dotted key and a nested one?)", field=path)
            seen.add(v.key)
