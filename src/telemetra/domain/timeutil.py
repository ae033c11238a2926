"""Time in Telemetra is UTC epoch milliseconds inside, ISO 8601 with ``Z`` and milliseconds outside."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache

_RANGE = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


_EPOCH = datetime(1970, 1, 1)  # naive on purpose: adding to it skips the time zone machinery


def ms_to_iso(ms: int) -> str:
    # Epoch + timedelta is ~2.5x faster than fromtimestamp + strftime (an aggregate answer has thousands).
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds") + "Z"


# Aggregate bucket edges repeat: every key of an answer has the same ones, and charts ask the same ranges
# again. A hit is ~10x cheaper than formatting; 32,768 edges (a few MB) hold a year of hours three times.
bucket_iso = lru_cache(maxsize=32_768)(ms_to_iso)


def ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def parse_duration_ms(text: str) -> int | None:
    """``90s``, ``5m``, ``24h``, ``7d`` → milliseconds; None when it is not such a duration."""
    match = _RANGE.match(text.strip())
    if not match:
        return None
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_iso_ms(text: str) -> int | None:
    """ISO 8601 → epoch ms; a time without offset is taken as UTC. None when it does not parse."""
    try:
        dt = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def epoch_to_ms(value: float) -> int:
    """Seconds or milliseconds (or micro/nanoseconds) since the epoch, told apart by magnitude."""
    magnitude = abs(value)
    if magnitude < 1e11:  # seconds until the year 5138
        return round(value * 1000)
    if magnitude < 1e14:
        return round(value)
    if magnitude < 1e17:
        return round(value / 1000)
    return round(value / 1_000_000)
