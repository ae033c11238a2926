"""Rollup tiers and which one answers an aggregate request exactly. Pure.

A tier of width ``w`` holds, per series and per bucket ``[b, b + w)`` with ``b`` a multiple of ``w``
since the epoch, what min/max/sum/count/avg/last need. It answers a request exactly when every answer
bucket is a union of whole tier buckets — the interval is a multiple of ``w`` (answer buckets are
aligned to multiples of the interval, so they are then aligned to ``w`` too) — and the range's edges fall
on tier bucket edges, so no tier bucket is only partly inside it. The coarsest such tier reads the fewest
rows; otherwise the raw points answer. Retention: a tier whose data stops short of the request's start
(``kept_since``) cannot answer it exactly either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

RAW: Final = "raw"
MINUTE: Final = "1m"
HOUR: Final = "1h"
WIDTHS: Final[Mapping[str, int]] = {MINUTE: 60_000, HOUR: 3_600_000}  # coarsest last
TIERS: Final = (RAW, MINUTE, HOUR)


def answers_exactly(width: int, *, start: int, end: int, interval_ms: int | None) -> bool:
    if start % width or end % width:
        return False
    return interval_ms is None or interval_ms % width == 0


def choose_resolution(
    *,
    start: int,
    end: int,
    interval_ms: int | None,
    enabled: bool = True,
    kept_since: Mapping[str, int] | None = None,
) -> str:
    """The coarsest tier that answers exactly; ``RAW`` when none does (or rollups are off).

    ``kept_since``: per tier, the oldest time retention still keeps (absent: everything). A tier that
    lost part of the range is passed over for a finer one that still has it; when no tier still holds
    the whole range, the one that holds the most of it answers (raw first among equals), so an answer
    never mixes tiers."""
    kept = kept_since or {}
    candidates = [RAW]
    if enabled:
        exact = [t for t, w in WIDTHS.items() if answers_exactly(w, start=start, end=end, interval_ms=interval_ms)]
        candidates += exact
    whole = [t for t in candidates if kept.get(t, start) <= start]
    if whole:
        return whole[-1]
    return min(candidates, key=lambda t: (kept.get(t, start), TIERS.index(t)))
