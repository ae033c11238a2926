"""Query parameters shared by the read endpoints: time ranges, key lists, cursors, intervals."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from telemetra.domain.errors import InvalidInput
from telemetra.domain.timeutil import now_ms, parse_duration_ms
from telemetra.ingest.documents import INT64_MAX
from telemetra.ingest.normalize import parse_timestamp

DEFAULT_RANGE_MS = 24 * 3_600_000
MAX_BUCKETS = 10_000
MAX_SPAN_MS = 100 * 366 * 86_400_000


@dataclass(frozen=True, slots=True)
class TimeRange:
    start: int
    end: int


def time_range(
    start: str | None, end: str | None, range_: str | None, *, default_ms: int = DEFAULT_RANGE_MS
) -> TimeRange:
    """``start``/``end`` as ISO 8601 or epoch s/ms; or ``range=24h`` back from now (seed 001)."""
    now = now_ms()
    end_ms = _instant(end, "end") if end else now + 1
    if range_:
        span = parse_duration_ms(range_)
        if span is None or span <= 0 or span > MAX_SPAN_MS:
            raise InvalidInput("range must be a duration such as 30m, 24h or 7d, at most 100 years", field="range")
        start_ms = max(0, end_ms - span)
    else:
        start_ms = _instant(start, "start") if start else end_ms - default_ms
    if start_ms >= end_ms:
        raise InvalidInput("start must be before end", field="start")
    return TimeRange(start_ms, end_ms)


def _instant(text: str, field: str) -> int:
    value = parse_timestamp(text)
    if value is None or value < 0 or value > 32_503_680_000_000:  # year 3000
        raise InvalidInput(f"{field} must be ISO 8601 or epoch seconds/milliseconds", field=field)
    return value


def key_list(keys: str | None, *, field: str = "keys") -> list[str] | None:
    if keys is None or not keys.strip():
        return None
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    if len(parts) > 100:
        raise InvalidInput("at most 100 keys at once", field=field)
    if any(len(k) > 128 for k in parts):
        raise InvalidInput("key longer than 128 characters", field=field)
    return parts


def interval_ms(interval: str | None, span: TimeRange) -> int | None:
    if interval is None or not interval.strip():
        return None
    value = parse_duration_ms(interval)
    if value is None:
        try:
            value = round(float(interval) * 1000)  # plain seconds
        except (ValueError, OverflowError):  # not a number, or inf/1e400
            raise InvalidInput("interval must be a duration such as 1m, 1h, 1d or seconds", field="interval") from None
    if value < 1000 or value > MAX_SPAN_MS:
        raise InvalidInput("interval must be between 1s and 100 years", field="interval")
    if (span.end - span.start) / value > MAX_BUCKETS:
        raise InvalidInput(f"more than {MAX_BUCKETS} buckets; widen the interval or narrow the range", field="interval")
    return value


def encode_cursor(after: tuple[int, str] | None) -> str | None:
    if after is None:
        return None
    return base64.urlsafe_b64encode(f"{after[0]}:{after[1]}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, key = raw.split(":", 1)
        after = int(ts), key
    except ValueError:
        raise InvalidInput("cursor is not one this server issued", field="cursor") from None
    # It goes into the query as a BIGINT and a text: anything this server did not issue stops here.
    if not 0 <= after[0] <= INT64_MAX or "\x00" in after[1] or len(after[1]) > 1024:
        raise InvalidInput("cursor is not one this server issued", field="cursor")
    return after
