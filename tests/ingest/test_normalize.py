"""Property tests of the pure normaliser and decoder (SPEC §4): every accepted shape comes out as the
same typed values, every limit is refused with ``InvalidInput`` naming the field, and nothing a client
can send makes it raise anything else."""

from __future__ import annotations

import math
import string
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from telemetra.domain.errors import InvalidInput, MalformedPayload, PayloadTooLarge
from telemetra.domain.records import ValueType
from telemetra.ingest.decode import decode_json
from telemetra.ingest.normalize import (
    EPOCH_MS_FROM,
    META_FIELDS,
    WALL_CLOCK_FROM_MS,
    WRAPPER_FIELDS,
    Limits,
    Message,
    normalize_message,
    normalize_node,
    split_batch,
)

LIMITS = Limits()
NOW = 1_800_000_000_000  # 2027-01-15, a fixed "received" clock so the tests do not depend on today
RESERVED = META_FIELDS | set(WRAPPER_FIELDS) | {"readings"}

# Per test, not a global profile: other modules keep their own Hypothesis settings. No example database
# either, so a run leaves nothing behind in the working tree.
fast = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

safe_keys = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=24).filter(
    lambda k: k not in RESERVED
)
finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(finite, st.integers(min_value=-(2**53), max_value=2**53))
json_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson decodes as an int
# Text a device may send: anything but NUL, which no database stores (refused; see the NUL tests).
storable = st.characters(exclude_characters="\x00")
scalars = st.one_of(numbers, st.booleans(), st.text(storable, max_size=40))
# Device times the normaliser must accept: from 9 years back to the edge of the allowed skew.
valid_ms = st.integers(min_value=NOW - 9 * 365 * 86_400_000, max_value=NOW + LIMITS.max_future_skew_ms)


def norm(obj: Any, limits: Limits = LIMITS) -> Message:
    return normalize_message(obj, received_ms=NOW, limits=limits)


def as_dict(message: Message) -> dict[str, Any]:
    """key → plain value as the API would answer it (bool for BOOL, text for TEXT, float otherwise)."""
    out: dict[str, Any] = {}
    for v in message.values:
        if v.vtype == ValueType.TEXT:
            assert v.num is None
            out[v.key] = v.text
        elif v.vtype == ValueType.BOOL:
            assert v.text is None and v.num in (0.0, 1.0)
            out[v.key] = v.num == 1.0
        else:
            assert v.text is None and v.num is not None and math.isfinite(v.num)
            out[v.key] = v.num
    return out


def reference_flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """What SPEC §4 says the flattening is: dots for objects, indices for arrays, nulls dropped."""
    out: dict[str, Any] = {}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for name, raw in items:
        key = f"{prefix}.{name}" if prefix else str(name)
        if raw is None:
            continue
        if isinstance(raw, dict | list):
            out.update(reference_flatten(raw, key))
        elif isinstance(raw, bool):
            out[key] = raw
        elif isinstance(raw, int | float):
            out[key] = float(raw)
        else:
            out[key] = raw
    return out


# Nested documents within the default limits: at most 4 levels, a handful of keys per level.
nested_docs = st.recursive(
    st.one_of(scalars, st.none()),
    lambda children: st.one_of(
        st.dictionaries(safe_keys, children, min_size=1, max_size=4),
        st.lists(children, min_size=1, max_size=4),
    ),
    max_leaves=25,
).filter(lambda d: isinstance(d, dict) and _within_default_limits(d))


def _within_default_limits(doc: Any, depth: int = 1, prefix_len: int = 0) -> bool:
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for name, raw in items:
        key_len = prefix_len + len(str(name)) + (1 if prefix_len else 0)
        if isinstance(raw, dict | list):
            if depth + 1 > LIMITS.max_depth or not _within_default_limits(raw, depth + 1, key_len):
                return False
        elif key_len > LIMITS.max_key_length:
            return False
    return True


# ---------------------------------------------------------------------------------------------- shapes


@fast
@given(st.dictionaries(safe_keys, numbers, min_size=1, max_size=40))
def test_round_trip_every_finite_number_comes_back_under_its_key(doc: dict[str, float]) -> None:
    message = norm(doc)
    assert message.ts is None and message.device_id is None
    assert as_dict(message) == {k: float(v) for k, v in doc.items()}
    assert [v.key for v in message.values] == list(doc)
    assert all(v.vtype == ValueType.NUMBER for v in message.values)


@fast
@given(nested_docs)
def test_nested_objects_and_arrays_flatten_to_dotted_and_indexed_keys(doc: dict[str, Any]) -> None:
    expected = reference_flatten(doc)
    if not expected:
        assert norm(doc).values == ()
        return
    assert as_dict(norm(doc)) == expected


@pytest.mark.parametrize("wrapper", WRAPPER_FIELDS)
@fast
@given(doc=nested_docs)
def test_values_and_metrics_wrappers_are_transparent(wrapper: str, doc: dict[str, Any]) -> None:
    assert as_dict(norm({wrapper: doc})) == as_dict(norm(doc))


def test_wrapper_merges_with_top_level_keys_and_device_fields() -> None:
    message = norm({"device_id": "esp32_01", "rssi": -61, "metrics": {"temperature": 31.4, "humidity": 62.1}})
    assert message.device_id == "esp32_01"
    assert as_dict(message) == {"rssi": -61.0, "temperature": 31.4, "humidity": 62.1}


def test_a_wrapper_name_holding_a_plain_value_is_an_ordinary_key() -> None:
    assert as_dict(norm({"values": 3, "metrics": "x"})) == {"values": 3.0, "metrics": "x"}


def test_seed_003_heat_pump_payload() -> None:
    doc = {
        "device": "site1",
        "timestamp": NOW - 1000,
        "temperature": {"inlet": 45.1, "outlet": 50.2},
        "electrical": {"power": 1932},
        "status": {"compressor": True, "defrost": False},
    }
    message = norm(doc)
    assert message.device_id == "site1"
    assert message.ts == NOW - 1000
    assert as_dict(message) == {
        "temperature.inlet": 45.1,
        "temperature.outlet": 50.2,
        "electrical.power": 1932.0,
        "status.compressor": True,
        "status.defrost": False,
    }


def test_arrays_give_indexed_keys_and_skip_nulls_inside() -> None:
    assert as_dict(norm({"cells": [3.1, None, 3.3], "pack": [{"v": 1}, {"v": 2}]})) == {
        "cells.0": 3.1,
        "cells.2": 3.3,
        "pack.0.v": 1.0,
        "pack.1.v": 2.0,
    }


@fast
@given(st.dictionaries(safe_keys, st.booleans(), min_size=1, max_size=10))
def test_booleans_are_numeric_0_1_typed_bool(doc: dict[str, bool]) -> None:
    message = norm(doc)
    for value in message.values:
        assert value.vtype == ValueType.BOOL
        assert value.num == (1.0 if doc[value.key] else 0.0)
        assert value.text is None


@fast
@given(st.dictionaries(safe_keys, st.text(storable, max_size=LIMITS.max_text_length), min_size=1, max_size=10))
def test_strings_are_text_series(doc: dict[str, str]) -> None:
    message = norm(doc)
    assert {v.key: (v.text, v.num, v.vtype) for v in message.values} == {
        k: (s, None, ValueType.TEXT) for k, s in doc.items()
    }


def test_nulls_are_skipped_everywhere() -> None:
    message = norm({"a": None, "b": 1, "c": {"d": None}, "values": {"e": None, "f": 2}, "ts": None})
    assert as_dict(message) == {"b": 1.0, "f": 2.0}
    assert message.ts is None
    assert norm({"a": None}).values == ()


def test_device_id_aliases_and_invalid_ids() -> None:
    assert norm({"device": "site1", "a": 1}).device_id == "site1"
    assert norm({"deviceId": "x:y.z-1_2", "a": 1}).device_id == "x:y.z-1_2"
    for bad in ("", "has space", "ä", "x" * 129, 5, True, {"id": 1}):
        with pytest.raises(InvalidInput) as exc:
            norm({"device_id": bad, "a": 1})
        assert exc.value.field == "body.device_id"


def test_dotted_key_and_nested_key_collision_is_refused() -> None:
    with pytest.raises(InvalidInput) as exc:
        norm({"a.b": 1, "a": {"b": 2}})
    assert "a.b" in exc.value.reason
    assert exc.value.field == "body"


def test_non_finite_or_huge_numbers_are_refused() -> None:
    for raw in (float("inf"), float("-inf"), float("nan"), 10**400):
        with pytest.raises(InvalidInput) as exc:
            norm({"x": raw})
        assert exc.value.field == "body.x"


def test_control_characters_in_keys_are_refused() -> None:
    with pytest.raises(InvalidInput) as exc:
        norm({"bad\nkey": 1})
    assert exc.value.field == "body"


# ---------------------------------------------------------------------------------------------- timestamps


@pytest.mark.parametrize("field", ["ts", "timestamp"])
@fast
@given(ms=valid_ms)
def test_epoch_milliseconds(field: str, ms: int) -> None:
    assert norm({field: ms, "a": 1}).ts == ms
    assert norm({field: str(ms), "a": 1}).ts == ms


@fast
@given(ms=valid_ms)
def test_epoch_seconds_integer_and_fractional(ms: int) -> None:
    assert norm({"ts": ms // 1000, "a": 1}).ts == ms // 1000 * 1000
    assert norm({"ts": ms / 1000, "a": 1}).ts == ms


@fast
@given(
    ms=valid_ms,
    offset_min=st.integers(min_value=-12 * 60, max_value=14 * 60),
)
def test_iso_8601_with_offset_z_and_naive(ms: int, offset_min: int) -> None:
    instant = datetime.fromtimestamp(ms / 1000, tz=UTC)
    with_offset = instant.astimezone(timezone(timedelta(minutes=offset_min))).isoformat(timespec="milliseconds")
    zulu = instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    naive = instant.replace(tzinfo=None).isoformat(timespec="milliseconds")  # no offset: taken as UTC
    for text in (with_offset, zulu, naive):
        assert norm({"ts": text, "a": 1}).ts == ms, text


def test_iso_examples_from_the_spec() -> None:
    assert norm({"ts": "2026-11-23T10:00:00Z", "values": {"t": 1}}, Limits()).ts == 1795428000000
    assert norm({"ts": "2026-11-23T12:00:00+02:00", "t": 1}).ts == 1795428000000
    assert norm({"ts": "2026-11-23T10:00:00.123", "t": 1}).ts == 1795428000123
    assert norm({"ts": 1732300000123, "t": 1}).ts == 1732300000123
    assert norm({"ts": 1732300000, "t": 1}).ts == 1732300000000


@pytest.mark.parametrize("raw", ["yesterday", "2026-13-01T00:00:00Z", "", True, [1], {"s": 1}, float("nan")])
def test_unparseable_timestamps_are_refused(raw: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        norm({"ts": raw, "a": 1})
    assert exc.value.field == "body.ts"


@pytest.mark.parametrize("raw", ["inf", "-Infinity", "1e400"])
def test_infinite_timestamp_strings_are_refused(raw: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        norm({"ts": raw, "a": 1})
    assert exc.value.field == "body.ts"


def test_future_skew_limit_is_inclusive_and_names_the_field() -> None:
    assert norm({"ts": NOW + LIMITS.max_future_skew_ms, "a": 1}).ts == NOW + LIMITS.max_future_skew_ms
    with pytest.raises(InvalidInput) as exc:
        norm({"ts": NOW + LIMITS.max_future_skew_ms + 1, "a": 1})
    assert exc.value.field == "body.ts"
    assert "future" in exc.value.reason
    with pytest.raises(InvalidInput) as exc:
        norm({"timestamp": "2100-01-01T00:00:00Z", "a": 1})
    assert exc.value.field == "body.timestamp"


def test_too_old_wall_clock_time_is_refused() -> None:
    assert norm({"ts": NOW - LIMITS.max_past_age_ms, "a": 1}).ts == NOW - LIMITS.max_past_age_ms
    # 2016 and 2001 are wall-clock times (just too old); a time before 1970 is nothing a clock counts.
    for old in (NOW - LIMITS.max_past_age_ms - 1, WALL_CLOCK_FROM_MS, -5, "1969-12-31T23:59:59Z", "-5"):
        with pytest.raises(InvalidInput) as exc:
            norm({"ts": old, "a": 1})
        assert exc.value.field == "body.ts"
    tight = Limits(max_past_age_ms=86_400_000)
    with pytest.raises(InvalidInput, match="older"):
        norm({"ts": NOW - 2 * 86_400_000, "a": 1}, tight)


# ---------------------------------------------------------------------------------------------- device clocks

# Numbers that are before 2001 read as epoch seconds (below 1e11) or as epoch milliseconds (from 1e11).
before_2001 = st.one_of(
    st.integers(min_value=0, max_value=WALL_CLOCK_FROM_MS // 1000 - 1),
    st.floats(min_value=0, max_value=WALL_CLOCK_FROM_MS / 1000 - 1, allow_nan=False),
    st.integers(min_value=EPOCH_MS_FROM, max_value=WALL_CLOCK_FROM_MS - 1),
)


@pytest.mark.parametrize("field", ["ts", "timestamp"])
@fast
@given(raw=before_2001)
def test_a_clock_before_2001_is_stamped_on_arrival_and_kept_as_a_series(field: str, raw: float) -> None:
    message = norm({field: raw, "t": 21.5})
    assert message.ts is None  # the server stamps it
    assert as_dict(message) == {field: float(raw), "t": 21.5}


def test_an_unset_rtc_in_iso_form_is_kept_as_text() -> None:
    message = norm({"timestamp": "1970-01-01T00:03:12Z", "t": 1})
    assert message.ts is None
    assert as_dict(message) == {"timestamp": "1970-01-01T00:03:12Z", "t": 1.0}


@fast
@given(millis=st.integers(min_value=0, max_value=EPOCH_MS_FROM - 1))
def test_a_boot_clock_route_reads_any_smaller_number_as_millis_since_boot(millis: int) -> None:
    """Seed 003's firmware: ``millis()`` passes 2001 in seconds after 11 days of uptime, and reaches 2106 in
    seconds (4.29e9) when it wraps: on its route no such number is a time."""
    message = normalize_message({"timestamp": millis, "t": 1}, received_ms=NOW, limits=LIMITS, boot_clock_ms=True)
    assert message.ts is None
    assert as_dict(message) == {"timestamp": float(millis), "t": 1.0}


@fast
@given(ms=valid_ms)
def test_a_boot_clock_route_still_takes_epoch_milliseconds(ms: int) -> None:
    """The heat pump's simulator sends epoch ms in the same field: those stay the reading's time."""
    message = normalize_message({"timestamp": ms, "t": 1}, received_ms=NOW, limits=LIMITS, boot_clock_ms=True)
    assert message.ts == ms and as_dict(message) == {"t": 1.0}


def test_without_a_boot_clock_route_seconds_after_2001_are_wall_clock_time() -> None:
    assert norm({"ts": 1_732_300_000, "t": 1}).ts == 1_732_300_000_000
    with pytest.raises(InvalidInput, match="future"):
        norm({"ts": 4_000_000_000, "t": 1})  # 2096, as seconds: a wall clock far ahead is refused


# ---------------------------------------------------------------------------------------------- limits


def test_keys_per_message_limit() -> None:
    limits = Limits(max_keys=10)
    assert len(norm({f"k{i}": i for i in range(10)}, limits).values) == 10
    with pytest.raises(InvalidInput) as exc:
        norm({f"k{i}": i for i in range(11)}, limits)
    assert exc.value.field == "body" and "10" in exc.value.reason
    # Keys produced by flattening count too, wrapped or not.
    with pytest.raises(InvalidInput):
        norm({"values": {"arr": list(range(11))}}, limits)


def test_key_length_limit_counts_the_dotted_key() -> None:
    limits = Limits(max_key_length=16)
    assert as_dict(norm({"a" * 16: 1}, limits)) == {"a" * 16: 1.0}
    with pytest.raises(InvalidInput) as exc:
        norm({"a" * 17: 1}, limits)
    assert exc.value.field is not None and exc.value.field.startswith("body.")
    with pytest.raises(InvalidInput):
        norm({"a" * 8: {"b" * 8: 1}}, limits)  # "aaaaaaaa.bbbbbbbb" is 17


def _nested(depth: int) -> dict[str, Any]:
    doc: Any = 1.0
    for i in range(depth):
        doc = {f"l{i}": doc}
    return doc


def test_depth_limit() -> None:
    limits = Limits(max_depth=4)
    assert len(norm(_nested(4), limits).values) == 1
    with pytest.raises(InvalidInput) as exc:
        norm(_nested(5), limits)
    assert "deeper" in exc.value.reason and exc.value.field is not None and exc.value.field.startswith("body")
    # The default allows the documented 8 levels.
    assert len(norm(_nested(8)).values) == 1
    with pytest.raises(InvalidInput):
        norm(_nested(9))


def test_text_length_limit() -> None:
    limits = Limits(max_text_length=5)
    assert as_dict(norm({"s": "12345"}, limits)) == {"s": "12345"}
    with pytest.raises(InvalidInput) as exc:
        norm({"s": "123456"}, limits)
    assert exc.value.field == "body.s"


# ---------------------------------------------------------------------------------------------- batches


@fast
@given(st.lists(st.dictionaries(safe_keys, numbers, min_size=1, max_size=3), min_size=1, max_size=20))
def test_split_batch_array_and_readings(items: list[dict[str, float]]) -> None:
    assert split_batch(items, limits=LIMITS) == items
    assert split_batch({"readings": items}, limits=LIMITS) == items


def test_split_batch_plain_object_is_one_message() -> None:
    doc = {"a": 1}
    assert split_batch(doc, limits=LIMITS) == [doc]
    assert split_batch({"readings": "not a list"}, limits=LIMITS) == [{"readings": "not a list"}]


@pytest.mark.parametrize(("doc", "field"), [([], "body"), ({"readings": []}, "readings")])
def test_empty_batch_is_refused(doc: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        split_batch(doc, limits=LIMITS)
    assert exc.value.field == field


@pytest.mark.parametrize("doc", ["text", 5, None, True])
def test_batch_of_a_scalar_is_refused(doc: Any) -> None:
    with pytest.raises(InvalidInput) as exc:
        split_batch(doc, limits=LIMITS)
    assert exc.value.field == "body"


def test_batch_size_limit() -> None:
    limits = Limits(max_batch_messages=3)
    assert len(split_batch([{"a": 1}] * 3, limits=limits)) == 3
    for doc, field in (([{"a": 1}] * 4, "body"), ({"readings": [{"a": 1}] * 4}, "readings")):
        with pytest.raises(InvalidInput) as exc:
            split_batch(doc, limits=limits)
        assert exc.value.field == field and "3" in exc.value.reason


# ---------------------------------------------------------------------------------------------- robustness

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), finite, json_ints, st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
timestamps = st.one_of(st.none(), json_ints, finite, st.booleans(), st.text(alphabet="0123456789-:TZ.+ ", max_size=30))


@fast
@given(doc=json_values, ts=timestamps, device=st.one_of(st.none(), st.text(max_size=10), json_ints))
def test_any_json_document_normalises_or_is_refused_cleanly(doc: Any, ts: Any, device: Any) -> None:
    if isinstance(doc, dict):
        doc = {k: v for k, v in doc.items() if k not in META_FIELDS}
        doc.update({"ts": ts, "device_id": device})
    try:
        message = norm(doc)
    except InvalidInput as exc:
        assert exc.status == 422 and exc.field and exc.reason
        return
    assert len(message.values) <= LIMITS.max_keys
    assert len({v.key for v in message.values}) == len(message.values)
    for v in message.values:
        assert 0 < len(v.key) <= LIMITS.max_key_length
        assert (v.num is None) == (v.vtype == ValueType.TEXT)
        assert v.text is None or "\x00" not in v.text  # what is accepted can be stored


@fast
@given(doc=st.dictionaries(safe_keys, scalars, min_size=1, max_size=5), where=st.integers(0, 4), nested=st.booleans())
def test_a_nul_anywhere_in_a_text_value_is_refused_naming_it(doc: dict[str, Any], where: int, nested: bool) -> None:
    key = sorted(doc)[where % len(doc)]
    doc[key] = "bad\x00value"
    body = {"values": doc} if nested else doc
    with pytest.raises(InvalidInput) as exc:
        norm(body)
    assert exc.value.field is not None and exc.value.field.endswith(key) and "NUL" in exc.value.reason


# ---------------------------------------------------------------------------------------------- node posts


def test_node_report_seed_000() -> None:
    report = normalize_node(
        {
            "name": "pir1",
            "uptime": 120,
            "heap_free": 180000,
            "peer_count": 3,
            "role": "PIR",
            "firmware": "1.0.0",
            "state": {"motion": "1", "armed": True, "level": 3, "gone": None},
        },
        received_ms=NOW,
        limits=LIMITS,
    )
    assert as_dict(report.message) == {"uptime": 120.0, "heap_free": 180000.0, "peer_count": 3.0}
    assert (report.name, report.role, report.firmware) == ("pir1", "PIR", "1.0.0")
    assert report.state == {"motion": "1", "armed": "true", "level": "3"}


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"state": ["motion"]}, "body.state"),
        ({"state": {"m": {"x": 1}}}, "body.state.m"),
        ({"name": {"x": 1}}, "body.name"),
        ({"firmware": True}, "body.firmware"),
        ({"role": "r" * 200}, "body.role"),
        ([{"uptime": 1}], "body"),
    ],
)
def test_bad_node_reports_name_the_field(doc: Any, field: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        normalize_node(doc, received_ms=NOW, limits=LIMITS)
    assert exc.value.field == field


# ---------------------------------------------------------------------------------------------- decode_json


@fast
@given(json_values.filter(lambda v: v is not None))
def test_decode_json_round_trips(value: Any) -> None:
    import orjson

    body = orjson.dumps(value)
    assert decode_json(body, max_bytes=len(body)) == value


@pytest.mark.parametrize("body", [b"", b"   ", b"\n\t"])
def test_decode_empty_body(body: bytes) -> None:
    with pytest.raises(MalformedPayload) as exc:
        decode_json(body, max_bytes=1024)
    assert exc.value.field == "body" and exc.value.status == 400


@pytest.mark.parametrize("body", [b"{", b"{'a': 1}", b"[1,]", b"NaN", b'{"a": 1} x', b"\xff\xfe"])
def test_decode_malformed(body: bytes) -> None:
    with pytest.raises(MalformedPayload) as exc:
        decode_json(body, max_bytes=1024)
    assert exc.value.field == "body" and exc.value.reason.startswith("malformed JSON")


def test_decode_oversize_is_checked_before_parsing() -> None:
    assert decode_json(b'{"a": 1}', max_bytes=8) == {"a": 1}
    for body in (b'{"a": 12}', b"{" * 20):
        with pytest.raises(PayloadTooLarge) as exc:
            decode_json(body, max_bytes=8)
        assert exc.value.status == 413 and exc.value.field == "body"
