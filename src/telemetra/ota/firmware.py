"""The firmware store as a service: upload (streamed, hashed, validated), delete, sign, look up."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import PurePath

from telemetra.domain.errors import Conflict, InvalidInput
from telemetra.domain.timeutil import now_ms
from telemetra.domain.versions import is_prerelease, normalize_version
from telemetra.ota.signing import Signer
from telemetra.ota.store import FirmwareStore
from telemetra.ota.upload import Upload, discard_upload, receive_upload
from telemetra.storage.firmware import FirmwareRepository
from telemetra.storage.schema import FirmwareRow

log = logging.getLogger(__name__)

MODEL_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
HARDWARE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,32}$")
DEFAULT_HARDWARE = "ESP32"
MAX_NOTES = 10_000
DOWNLOAD_ROW_CACHE_S = 2.0
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def check_model(value: str, field: str = "model") -> str:
    value = value.strip()
    if not MODEL_PATTERN.match(value):
        raise InvalidInput("model: letters, digits, '-', '_', '.', ':' (1-128 characters)", field=field)
    return value


def parse_bool(value: str, field: str) -> bool:
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise InvalidInput(f"{field} must be true or false", field=field)


class FirmwareMeta:
    """The upload's metadata, read from the form (iotmesh's names or Telemetra's) with the query string as
    a fallback (``curl -F file=@fw.bin '…/upload?model=m&version=1.2.3'``)."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        model = fields.get("model") or fields.get("node_type")
        if not model:
            raise InvalidInput("model (or iotmesh's node_type) is required", field="model")
        self.model = check_model(model, "model" if fields.get("model") else "node_type")
        version = fields.get("version")
        if not version:
            raise InvalidInput("version is required", field="version")
        self.version = normalize_version(version)
        hardware = (fields.get("hardware") or DEFAULT_HARDWARE).strip()
        if not HARDWARE_PATTERN.match(hardware):
            raise InvalidInput("hardware: letters, digits, '-', '_', '.' (1-32 characters)", field="hardware")
        self.hardware = hardware
        notes = fields.get("release_notes", fields.get("notes"))
        if notes is not None and len(notes) > MAX_NOTES:
            raise InvalidInput(f"release notes longer than {MAX_NOTES} characters", field="release_notes")
        self.release_notes = notes or None  # iotmesh: an empty form value is null
        self.is_stable = parse_bool(fields.get("is_stable", "false"), "is_stable")


def _filename(given: str | None, meta: FirmwareMeta) -> str:
    name = PurePath((given or "").replace("\\", "/")).name.strip()
    return (name or f"{meta.model}_{meta.version}.bin")[:255]


class FirmwareService:
    def __init__(self, repo: FirmwareRepository, store: FirmwareStore, signer: Signer | None) -> None:
        self.repo = repo
        self.store = store
        self.signer = signer
        # Downloads come in 1 KB parts (iotmesh) or a few ranges per device: the row behind them is read
        # from memory for a moment instead of once per part. A deleted image's file is gone at once, so a
        # stale row answers 404 from the missing file, never with other bytes.
        self._rows: dict[int, tuple[float, FirmwareRow]] = {}

    async def for_download(self, firmware_id: int) -> FirmwareRow:
        now = time.monotonic()
        cached = self._rows.get(firmware_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self.repo.get(firmware_id)
        if len(self._rows) > 256:
            self._rows.clear()
        self._rows[firmware_id] = (now + DOWNLOAD_ROW_CACHE_S, row)
        return row

    def signature(self, firmware: FirmwareRow) -> str | None:
        return self.signature_of_digest(firmware.sha256)

    def signature_of_digest(self, sha256_hex: str) -> str | None:
        return self.signer.sign_digest(sha256_hex) if self.signer is not None else None

    async def upload(
        self,
        stream: AsyncIterator[bytes],
        *,
        content_type: str | None,
        content_length: int | None,
        query: Mapping[str, str],
    ) -> FirmwareRow:
        early: dict[str, str] = {}

        def on_field(name: str, value: str) -> None:
            early[name] = value
            # Refuse a bad name or version at once, before a large file is read.
            if name in ("model", "node_type"):
                check_model(value, name)
            elif name == "version":
                normalize_version(value)

        async def before_file(fields: dict[str, str]) -> None:
            merged = {**query, **fields}
            if ("model" in merged or "node_type" in merged) and "version" in merged:
                meta = FirmwareMeta(merged)
                if await self.repo.exists(meta.model, meta.version, meta.hardware):
                    raise _duplicate(meta)

        upload = await receive_upload(
            stream,
            content_type=content_type,
            content_length=content_length,
            store=self.store,
            on_field=on_field,
            before_file=before_file,
        )
        try:
            meta = FirmwareMeta({**query, **upload.fields})
            if upload.image is None:
                raise InvalidInput("the form has no 'file' part", field="file")
            if upload.image.size == 0:
                raise InvalidInput("the firmware file is empty", field="file")
        except BaseException:
            await discard_upload(upload)
            raise
        return await self._store(upload, meta)

    async def _store(self, upload: Upload, meta: FirmwareMeta) -> FirmwareRow:
        assert upload.image is not None
        try:
            image = await upload.image.commit()
        except BaseException:
            await discard_upload(upload)
            raise
        try:
            row = await self.repo.create(
                model=meta.model,
                version=meta.version,
                hardware=meta.hardware,
                filename=_filename(upload.filename, meta),
                path=image.name,
                size_bytes=image.size,
                sha256=image.sha256,
                md5=image.md5,
                release_notes=meta.release_notes,
                is_stable=meta.is_stable,
                prerelease=is_prerelease(meta.version),
                created_at=now_ms(),
            )
        except BaseException:
            await self.store.remove(image.name)
            raise
        log.info("stored firmware %s %s (%d bytes, sha256 %s)", row.model, row.version, row.size_bytes, row.sha256)
        return row

    async def delete(self, firmware_id: int) -> FirmwareRow:
        row = await self.repo.delete(firmware_id)
        self._rows.pop(firmware_id, None)
        try:
            await self.store.remove(row.path)
        except OSError as exc:  # the row is gone; the start-up sweep removes the file later
            log.warning("could not remove firmware file %s: %s", row.path, exc)
        return row

    async def sweep(self) -> None:
        self.store.prepare()
        self.store.sweep(await self.repo.paths())


def _duplicate(meta: FirmwareMeta) -> Conflict:
    return Conflict(
        f"firmware {meta.model!r} {meta.version!r} for hardware {meta.hardware!r} already exists; "
        "delete it first or upload another version",
        field="version",
    )
