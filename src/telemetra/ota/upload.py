"""A multipart firmware upload read as a stream (python-multipart's parser, fed chunk by chunk): the
``file`` part goes straight to an ``IncomingImage`` on disk, the text fields are kept (small, bounded).

Starlette's own form parsing would first spool the whole file to a temporary file and only then hand it
over; here the size limit refuses an oversized image while it arrives, and the image is written once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from telemetra.domain.errors import InvalidInput, MalformedPayload, PayloadTooLarge
from telemetra.ota.store import FirmwareStore, IncomingImage

MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 32
FILE_FIELD = "file"


@dataclass
class Upload:
    """What the form carried: its text fields and the received image (not yet committed to the store)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    image: IncomingImage | None = None


class _Part:
    __slots__ = ("data", "filename", "header_field", "header_value", "headers", "name")

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.name: str | None = None
        self.filename: str | None = None
        self.data = bytearray()


class _Reader:
    """python-multipart's callbacks are synchronous: they queue file data, which ``feed`` then writes."""

    def __init__(
        self,
        store: FirmwareStore,
        on_field: Callable[[str, str], None],
        before_file: Callable[[dict[str, str]], Awaitable[None]] | None,
    ) -> None:
        self.store = store
        self.on_field = on_field
        self.before_file = before_file
        self.checked = False
        self.upload = Upload()
        self.part = _Part()
        self.pending: list[bytes] = []
        self.ended = False

    # -- callbacks (sync) --
    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.part.header_field.lower()] = self.part.header_value
        self.part.header_field = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise MalformedPayload("a multipart part has no name", field="body")
        self.part.name = name.decode("utf-8", "replace")
        if self.part.name == FILE_FIELD:
            if self.upload.image is not None:
                raise InvalidInput("send one file per upload", field=FILE_FIELD)
            filename = options.get(b"filename")
            self.upload.filename = filename.decode("utf-8", "replace") if filename else None
            self.upload.image = self.store.receive()
        elif len(self.upload.fields) >= MAX_FIELDS:
            raise InvalidInput(f"at most {MAX_FIELDS} form fields", field="body")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.name == FILE_FIELD:
            self.pending.append(data[start:end])
            return
        if len(self.part.data) + (end - start) > MAX_FIELD_BYTES:
            raise InvalidInput(f"form field longer than {MAX_FIELD_BYTES} bytes", field=self.part.name)
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        if self.part.name is not None and self.part.name != FILE_FIELD:
            value = self.part.data.decode("utf-8", "replace")
            self.upload.fields[self.part.name] = value
            self.on_field(self.part.name, value)

    def on_end(self) -> None:
        self.ended = True

    async def drain(self) -> None:
        image = self.upload.image
        if image is not None and not self.checked:
            self.checked = True
            if self.before_file is not None:
                await self.before_file(dict(self.upload.fields))
        chunks, self.pending = self.pending, []
        if image is not None:
            for chunk in chunks:
                await image.write(chunk)


async def receive_upload(
    stream: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: int | None,
    store: FirmwareStore,
    on_field: Callable[[str, str], None] = lambda _name, _value: None,
    before_file: Callable[[dict[str, str]], Awaitable[None]] | None = None,
) -> Upload:
    """Read the form; ``on_field`` sees each text field as it arrives and ``before_file`` the fields sent
    before the file, so bad metadata or a duplicate is refused before a large image is read. The caller
    commits or discards ``upload.image``."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise InvalidInput("send the firmware as multipart/form-data with a 'file' part", field="file")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedPayload("multipart/form-data without a boundary", field="body")
    if content_length is not None and content_length > store.max_bytes + MAX_FIELDS * MAX_FIELD_BYTES:
        raise PayloadTooLarge(
            f"request of {content_length} bytes is over the firmware limit of {store.max_bytes} bytes "
            "(TELEMETRA_OTA_MAX_FIRMWARE_BYTES)",
            field="file",
        )
    reader = _Reader(store, on_field, before_file)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": reader.on_part_begin,
                "on_part_data": reader.on_part_data,
                "on_part_end": reader.on_part_end,
                "on_header_field": reader.on_header_field,
                "on_header_value": reader.on_header_value,
                "on_header_end": reader.on_header_end,
                "on_headers_finished": reader.on_headers_finished,
                "on_end": reader.on_end,
            },
        )
        async for chunk in stream:
            parser.write(chunk)
            await reader.drain()
        parser.finalize()
        await reader.drain()
        if not reader.ended:
            raise MalformedPayload("the multipart body ended before its closing boundary", field="body")
    except FormParserError as exc:
        await discard_upload(reader.upload)
        raise MalformedPayload(f"malformed multipart body: {exc}", field="body") from None
    except BaseException:
        await discard_upload(reader.upload)
        raise
    return reader.upload


async def discard_upload(upload: Upload) -> None:
    if upload.image is not None:
        with contextlib.suppress(OSError):
            await upload.image.discard()
