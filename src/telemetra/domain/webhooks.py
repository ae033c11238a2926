"""Webhooks as rules, no I/O: which events a subscription takes, what a delivery's signature is, and when
a failed delivery is tried again.

Event names are ``<subject>.<what>``: ``alert.raised``, ``device.offline``, ``rollout.completed`` …
(``EVENT_NAMES``). A subscription lists names or shell-style patterns (``alert.*``, ``*``); a pattern
must match at least one known name, so a typo is refused rather than silently never delivered.

The signature is GitHub's and Stripe's scheme: ``sha256=`` and the hex HMAC-SHA256, keyed with the
webhook's secret, of ``"<timestamp>.<body>"`` — the timestamp (``X-Telemetra-Timestamp``, Unix seconds)
is signed with the body so a captured delivery cannot be replayed later under a fresh timestamp.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import random
from collections.abc import Iterable, Sequence
from typing import Final

from telemetra.domain import ota

ALERT_CHANGES: Final = ("raised", "repeated", "acknowledged", "cleared")
DEVICE_CHANGES: Final = ("created", "updated", "rotated", "disabled", "enabled", "deleted", "claimed", "config")
# A rollout (``rollout.<status>``) and one device's update in it (``rollout.device.<status>``): OTA's words.
ROLLOUT_STATES: Final = (*ota.JOB_STATUSES, "deleted")
DEVICE_UPDATE_STATES: Final = ota.DEVICE_STATUSES
TEST: Final = "webhook.test"

EVENT_NAMES: Final = (
    *(f"alert.{c}" for c in ALERT_CHANGES),
    "device.online",
    "device.offline",
    *(f"device.{c}" for c in DEVICE_CHANGES),
    *(f"rollout.{s}" for s in ROLLOUT_STATES),
    *(f"rollout.device.{s}" for s in DEVICE_UPDATE_STATES),
    TEST,
)

# Delivery states
PENDING: Final = "pending"  # waiting for its (next) attempt
DELIVERED: Final = "delivered"  # the receiver answered 2xx
FAILED: Final = "failed"  # every attempt failed; kept in the log, tried again only when asked
STATUSES: Final = (PENDING, DELIVERED, FAILED)


def unknown_patterns(patterns: Iterable[str]) -> list[str]:
    """The patterns that match no event name (what a subscription must not hold)."""
    return [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in EVENT_NAMES)]


def subscribed(patterns: Sequence[str], name: str) -> bool:
    """Does a subscription to ``patterns`` take event ``name``? (``webhook.test`` goes to whoever asks
    for it, subscribed or not.)"""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, timestamp: int, body: bytes, header: str) -> bool:
    """What a receiver does (constant time); here for the tests and the README's example."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


def retry_delay_s(
    attempts: int, *, base_s: float, max_s: float, retry_after_s: float | None = None, rng: random.Random | None = None
) -> float:
    """How long after its ``attempts``-th failed attempt a delivery waits: exponential (``base_s`` × 2ⁿ⁻¹,
    at most ``max_s``) with "equal jitter" — half fixed, half random — so a receiver that comes back is not
    hit by every queued delivery in the same second; never sooner than the receiver's ``Retry-After``."""
    ceiling = min(max_s, base_s * 2 ** max(0, attempts - 1))
    delay = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay
