"""Firmware downloads: whole, by ETag, or one byte range — served from disk by Starlette's
``FileResponse`` (64 KB reads in a worker thread, ``Content-Length`` always set, never chunked or
compressed: the iotmesh gateway reads the socket raw, CLIENTS.md §1.1).

The conditional and range headers are checked here first, so that every refusal is our JSON
``{detail, field, code}`` (``FileResponse`` would answer a bad range in plain text): a range past the
end is 416 with ``Content-Range: bytes */size``, a malformed or multi-part range is 400.
"""

from __future__ import annotations

import os
import re
from email.utils import format_datetime

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from telemetra.api.errors import error_response
from telemetra.domain.timeutil import ms_to_datetime
from telemetra.storage.schema import FirmwareRow

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


class RangeRefused(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def parse_range(header: str, size: int) -> tuple[int, int]:
    """``bytes=a-b`` (end inclusive, clamped to the file), ``bytes=a-`` or ``bytes=-n`` → (start, end
    exclusive). One range only: no client of ours asks for several, and a multipart answer would break
    the raw-socket readers that asked for one."""
    if "," in header:
        raise RangeRefused(400, "one byte range per request (bytes=start-end)")
    match = _RANGE.match(header)
    if match is None:
        raise RangeRefused(400, f"Range must be bytes=start-end, bytes=start- or bytes=-suffix, not {header!r}")
    first, last = match.group(1), match.group(2)
    if not first and not last:
        raise RangeRefused(400, "Range needs a start or a suffix length")
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeRefused(416, f"a suffix of {suffix} bytes selects nothing of a {size}-byte file")
        return max(0, size - suffix), size
    start = int(first)
    if start >= size:
        raise RangeRefused(416, f"Range starts at byte {start}, beyond the end of the {size}-byte file")
    if last:
        end = int(last)
        if end < start:
            raise RangeRefused(400, f"Range end {end} is before its start {start}")
        return start, min(end, size - 1) + 1
    return start, size


def _matches(if_none_match: str, etag: str) -> bool:
    wanted = etag.strip('"')
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag.strip('"') == wanted:
            return True
    return False


def firmware_response(
    request: Request, firmware: FirmwareRow, path: os.PathLike[str] | str, signature: str | None
) -> Response:
    etag = f'"{firmware.sha256}"'
    headers = {
        "ETag": etag,
        "Accept-Ranges": "bytes",
        "X-MD5": firmware.md5,
        "X-Checksum-SHA256": firmware.sha256,
        "X-Firmware-Version": firmware.version,
        # An id always names the same bytes, but SQLite may give a deleted firmware's id to the next one:
        # caches revalidate, which the ETag makes cheap.
        "Cache-Control": "no-cache",
        "Last-Modified": _http_date(firmware.created_at),
    }
    if signature is not None:
        headers["X-Signature-Ed25519"] = signature
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    size = firmware.size_bytes
    range_header = request.headers.get("range")
    if range_header is not None and _range_applies(request.headers.get("if-range"), etag, firmware):
        try:
            parse_range(range_header, size)
        except RangeRefused as exc:
            extra = {"Content-Range": f"bytes */{size}"} if exc.status == 416 else None
            return error_response(
                exc.status, "range_not_satisfiable" if exc.status == 416 else "invalid", exc.detail, "Range", extra
            )
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return error_response(404, "not_found", "the firmware file is missing from the store", "firmware_id")
    return FileResponse(
        path,
        headers=headers,
        media_type="application/octet-stream",
        filename=firmware.filename,
        stat_result=stat,
    )


def _range_applies(if_range: str | None, etag: str, firmware: FirmwareRow) -> bool:
    """RFC 9110 If-Range: honour the range only if the client still has this very file."""
    if if_range is None:
        return True
    return if_range.strip() in (etag, _http_date(firmware.created_at))


def _http_date(ms: int) -> str:
    return format_datetime(ms_to_datetime(ms), usegmt=True)
