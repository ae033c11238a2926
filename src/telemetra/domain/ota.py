"""OTA words and rules, decided once: job and device status, allowed job transitions, waves and the
stable device-id hash that percentages and waves cut by. No I/O."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from telemetra.domain.errors import InvalidInput

# Jobs: iotmesh's words (CLIENTS.md §1.6) plus `paused`; `cancelled` is stored (iotmesh only deleted).
PENDING = "pending"
DISTRIBUTING = "distributing"
PAUSED = "paused"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
JOB_STATUSES = (PENDING, DISTRIBUTING, PAUSED, COMPLETED, FAILED, CANCELLED)
JOB_ACTIVE = (DISTRIBUTING, PAUSED)  # a rollout is running: its firmware may not be deleted
JOB_FINAL = (COMPLETED, FAILED, CANCELLED)

# Devices (nodes): pending → notified → downloading → installing → completed | failed | timed_out.
NOTIFIED = "notified"
DOWNLOADING = "downloading"
INSTALLING = "installing"
TIMED_OUT = "timed_out"
DEVICE_STATUSES = (PENDING, NOTIFIED, DOWNLOADING, INSTALLING, COMPLETED, FAILED, TIMED_OUT)
DEVICE_IN_PROGRESS = (NOTIFIED, DOWNLOADING, INSTALLING)
DEVICE_FINAL = (COMPLETED, FAILED, TIMED_OUT)

# Delivery: a gateway polls for the job (iotmesh) or the server notifies devices (a rollout).
GATEWAY = "gateway"
DEVICES = "devices"

# What a job may become from each state; the same state again is an idempotent no-op.
_JOB_MOVES: dict[str, tuple[str, ...]] = {
    PENDING: (DISTRIBUTING, COMPLETED, FAILED, CANCELLED),
    DISTRIBUTING: (PAUSED, COMPLETED, FAILED, CANCELLED),
    PAUSED: (DISTRIBUTING, COMPLETED, FAILED, CANCELLED),
    COMPLETED: (),
    FAILED: (),
    CANCELLED: (),
}

# What devices and gateways report, read into the words above (paku and ESP-IDF say it differently).
_REPORTED = {
    "pending": PENDING,
    "queued": PENDING,
    "notified": NOTIFIED,
    "received": NOTIFIED,
    "accepted": NOTIFIED,
    "started": DOWNLOADING,
    "downloading": DOWNLOADING,
    "in_progress": DOWNLOADING,
    "downloaded": INSTALLING,
    "verifying": INSTALLING,
    "installing": INSTALLING,
    "rebooting": INSTALLING,
    "completed": COMPLETED,
    "complete": COMPLETED,
    "success": COMPLETED,
    "succeeded": COMPLETED,
    "done": COMPLETED,
    "ok": COMPLETED,
    "failed": FAILED,
    "failure": FAILED,
    "error": FAILED,
    "rejected": FAILED,
    "rolled_back": FAILED,
    "timed_out": TIMED_OUT,
}


def can_move(current: str, to: str) -> bool:
    return to in _JOB_MOVES.get(current, ())


def reported_status(text: str, *, field: str = "status") -> str:
    """A reported device status in Telemetra's words, or ``InvalidInput`` naming ``field``."""
    word = _REPORTED.get(text.strip().lower().replace("-", "_").replace(" ", "_"))
    if word is None:
        raise InvalidInput(f"unknown status {text!r}; use one of {', '.join(DEVICE_STATUSES)}", field=field)
    return word


def device_bucket(device_id: str) -> int:
    """0–99, stable for a device across jobs and processes (SHA-256 of the id, as paku does), so
    ``target_percentage=10`` always picks the same tenth of a fleet and a bigger percentage adds to it."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") % 100


def device_rank(device_id: str) -> int:
    """A stable order of devices for cutting waves (finer than the bucket, so ties are rare)."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")


def exponential_waves(start_percent: float, factor: float) -> list[int]:
    """Cumulative wave percentages growing by ``factor``: (1, 2) → 1, 2, 4, … 64, 100."""
    if not 0 < start_percent <= 100:
        raise InvalidInput("start_percent must be greater than 0 and at most 100", field="waves.start_percent")
    if not 1 < factor <= 100:
        raise InvalidInput("factor must be greater than 1 and at most 100", field="waves.factor")
    waves: list[int] = []
    value = start_percent
    while value < 100:
        percent = max(1, math.floor(value))
        if not waves or percent > waves[-1]:
            waves.append(percent)
        value *= factor
    waves.append(100)
    return waves


def check_waves(waves: Sequence[int]) -> list[int]:
    """Cumulative percentages, strictly increasing within 1–100; 100 is appended when missing, so every
    targeted device is in some wave."""
    out = [int(w) for w in waves]
    if any(not 1 <= w <= 100 for w in out):
        raise InvalidInput("every wave is a cumulative percentage between 1 and 100", field="waves")
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise InvalidInput("waves must be strictly increasing cumulative percentages, e.g. [5, 25, 100]", field="waves")
    if len(out) > 100:
        raise InvalidInput("at most 100 waves", field="waves")
    if not out or out[-1] != 100:
        out.append(100)
    return out


def assign_waves(device_ids: Sequence[str], waves: Sequence[int]) -> list[tuple[str, int, int]]:
    """(device id, wave index, position) for each device: devices ordered by their stable rank, wave k
    holding the devices up to ``ceil(waves[k] % of N)`` (at least one device per non-empty wave)."""
    ordered = sorted(set(device_ids), key=lambda d: (device_rank(d), d))
    total = len(ordered)
    out: list[tuple[str, int, int]] = []
    start = 0
    for index, percent in enumerate(waves):
        end = total if percent >= 100 else min(total, max(start + 1, math.ceil(total * percent / 100)))
        for position in range(start, end):
            out.append((ordered[position], index, position))
        start = end
    return out


@dataclass(frozen=True, slots=True)
class OtaChange:
    """One state change of a job (``device_id`` None) or of one device in it. Every change goes through
    ``RolloutService._changed``, the one place that will publish it as an event."""

    job_id: int
    device_id: str | None
    old: str | None
    new: str
    ts: int
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Criteria:
    """Pause when at least ``min_finished`` devices have finished and ``failure_percent`` of them failed
    (failed or timed out), counted per wave and overall."""

    failure_percent: float | None
    min_finished: int

    def tripped(self, finished: int, failed: int) -> bool:
        if self.failure_percent is None or finished < max(1, self.min_finished):
            return False
        return failed * 100 >= self.failure_percent * finished
