"""Firmware images on disk: received in a stream (never whole in memory), hashed while they are written,
moved into place atomically, served by path.

Layout: ``<dir>/<uuid>.bin`` for stored images, ``<dir>/.incoming/<uuid>.part`` while one is received.
A crash leaves at most a ``.part`` file or an image no row points to; ``sweep`` removes both at start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from telemetra.domain.errors import PayloadTooLarge

log = logging.getLogger(__name__)

# Chunks are gathered to this size before a worker thread writes and hashes them: fewer thread hops
# for a large image, and a bounded buffer per upload.
WRITE_BUFFER_BYTES = 1024 * 1024
INCOMING = ".incoming"
SUFFIX = ".bin"


@dataclass(frozen=True, slots=True)
class StoredImage:
    name: str  # file name inside the store
    size: int
    sha256: str
    md5: str


class IncomingImage:
    """One image being received. ``write`` refuses with 413 as soon as the size limit is passed."""

    def __init__(self, store: FirmwareStore) -> None:
        self._store = store
        self.name = f"{uuid.uuid4().hex}{SUFFIX}"
        self.part_path = store.incoming_dir / f"{self.name}.part"
        self._file = open(self.part_path, "wb")  # closed by commit() or discard()
        self._sha256 = hashlib.sha256()
        self._md5 = hashlib.md5(usedforsecurity=False)  # iotmesh nodes verify MD5; not a security check
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.size = 0

    def _write_blocking(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self._sha256.update(chunk)
            self._md5.update(chunk)
            self._file.write(chunk)

    async def _flush(self) -> None:
        if self._buffer:
            chunks, self._buffer, self._buffered = self._buffer, [], 0
            await asyncio.to_thread(self._write_blocking, chunks)

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self._store.max_bytes:
            raise PayloadTooLarge(
                f"firmware is larger than the limit of {self._store.max_bytes} bytes "
                "(TELEMETRA_OTA_MAX_FIRMWARE_BYTES)",
                field="file",
            )
        self._buffer.append(bytes(data))
        self._buffered += len(data)
        if self._buffered >= WRITE_BUFFER_BYTES:
            await self._flush()

    async def commit(self) -> StoredImage:
        """Flush, fsync and move the image into the store; returns its name and digests."""
        await self._flush()

        def finish() -> None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self.part_path, self._store.directory / self.name)

        await asyncio.to_thread(finish)
        return StoredImage(self.name, self.size, self._sha256.hexdigest(), self._md5.hexdigest())

    async def discard(self) -> None:
        def drop() -> None:
            self._file.close()
            self.part_path.unlink(missing_ok=True)

        await asyncio.to_thread(drop)


class FirmwareStore:
    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.directory = directory
        self.incoming_dir = directory / INCOMING
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        self.incoming_dir.mkdir(parents=True, exist_ok=True)

    def receive(self) -> IncomingImage:
        return IncomingImage(self)

    def path_of(self, name: str) -> Path:
        # Names come from our own rows, but never let one step outside the store.
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"not a store file name: {name!r}")
        return self.directory / name

    async def remove(self, name: str) -> None:
        await asyncio.to_thread(self.path_of(name).unlink, True)

    def sweep(self, known: set[str], *, older_than_s: float = 600.0) -> int:
        """Remove what a crash left behind: ``.part`` files and images no firmware row names. Only files
        older than ``older_than_s``, so an upload in flight in another process is left alone."""
        cutoff = time.time() - older_than_s
        removed = 0
        candidates = [*self.incoming_dir.glob("*.part"), *self.directory.glob(f"*{SUFFIX}")]
        for path in candidates:
            if path.parent == self.directory and path.name in known:
                continue
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d leftover firmware file(s) from %s", removed, self.directory)
        return removed
