"""How many refused MQTT messages are kept, per device: nothing refused is silent, but a misconfigured
device publishing ten times a second to a topic no route takes must not fill the disk.

Every refusal is counted (``telemetra_rejected_messages``); the first ones of each device — a burst, then
``per_minute`` — are also kept in the rejected-messages store with their topic, payload and reason; past
that they are counted as not kept (``telemetra_rejected_unkept``) until the device's allowance refills.
Messages that name no device share one allowance per topic root (their first two levels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from telemetra.domain.records import Batch
from telemetra.metrics import Metrics

# Refusals kept at once after a quiet spell, per key, as a multiple of the per-minute rate.
BURST_MINUTES = 2
MAX_KEYS = 10_000  # devices (or topic roots) tracked at once; a full table starts over (bounded memory)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class RejectionLimiter:
    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute * BURST_MINUTES)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, key: str) -> bool:
        """Take one from ``key``'s allowance; False when it is used up."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_KEYS:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        else:
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False


def limit_key(device_id: str | None, topic: str | None) -> str:
    if device_id:
        return f"device:{device_id}"
    return "topic:" + "/".join((topic or "").split("/")[:2])


def reason_label(reason: str) -> str:
    """A short, bounded label for the metric (the full reason is stored with the message)."""
    return reason.split(":", 1)[0][:40]


class RejectionGate:
    """Applies the allowance to the batches of refused messages, counting what it does not keep."""

    def __init__(self, limiter: RejectionLimiter, metrics: Metrics | None, *, transport: str = "mqtt") -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._transport = transport

    def apply(self, batch: Batch) -> Batch:
        """``batch`` itself, or for a refusal over its device's allowance an empty batch marked suppressed."""
        if not batch.rejected:
            return batch
        decisions = [(r, self._limiter.allow(limit_key(r.device_id, r.topic))) for r in batch.rejected]
        if all(ok for _, ok in decisions):
            return batch
        kept = [r for r, ok in decisions if ok]
        if self._metrics is not None:
            for dropped, ok in decisions:
                if not ok:
                    self._metrics.rejected.labels(self._transport, reason_label(dropped.reason)).inc()
                    self._metrics.rejected_unkept.labels(self._transport).inc()
        batch.suppressed += len(decisions) - len(kept)
        batch.rejected = kept
        return batch
