"""The collector's MQTT client id: random, kept in the data directory, one per running process.

It must be unguessable: on Mosquitto anyone who can log in and knows a client id can take that session
over (with device client ids bound to device ids this is closed for devices, but not for every setup).
It must be stable: the broker keeps the collector's persistent session — its subscription and every
message queued while Telemetra is away — under it, so a new id after a restart would strand what was
queued. And two processes running at once must not share one, or the broker would drop each in turn.

So: ``<data_dir>/mqtt/collector-<n>.id`` holds ``telemetra-<96 random bits>``, and a process holds an
exclusive lock on ``collector-<n>.lock`` for as long as it runs; it takes the lowest ``n`` no one holds.
A restarted process finds its slot free again and resumes its session; a second process on the same
data directory (a shared volume, another port) gets the next slot and a session of its own.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["CollectorClientId"]

_MAX_SLOTS = 64


class CollectorClientId:
    """``with CollectorClientId(data_dir) as lease: lease.client_id`` — the lock lasts as long as the lease."""

    def __init__(self, data_dir: Path) -> None:
        self._dir = Path(data_dir) / "mqtt"
        self._lock_fd: int | None = None
        self.client_id = ""
        self.slot = -1

    def __enter__(self) -> Self:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for slot in range(_MAX_SLOTS):
            fd = os.open(self._dir / f"collector-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._lock_fd, self.slot = fd, slot
            self.client_id = self._read_or_create(self._dir / f"collector-{slot}.id")
            return self
        raise RuntimeError(f"more than {_MAX_SLOTS} Telemetra processes on {self._dir}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    @staticmethod
    def _read_or_create(path: Path) -> str:
        try:
            existing = path.read_text().strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            return existing
        client_id = f"telemetra-{secrets.token_hex(12)}"
        # Written whole and renamed, so a crash never leaves a half-written id behind.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(client_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return client_id
