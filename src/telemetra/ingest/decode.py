"""Bytes → JSON value, with the size limit checked first. Pure."""

from __future__ import annotations

from typing import Any

import orjson

from telemetra.domain.errors import MalformedPayload, PayloadTooLarge


def decode_json(body: bytes, *, max_bytes: int) -> Any:
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"payload is {len(body)} bytes; the limit is {max_bytes}", field="body")
    if not body.strip():
        raise MalformedPayload("empty body; expected a JSON object or array", field="body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedPayload(f"malformed JSON: {exc}", field="body") from None
