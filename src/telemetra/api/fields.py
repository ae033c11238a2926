"""Request value types shared by every router: each path, query and body value a client sends is
bounded here, before it reaches the database.

PostgreSQL refuses a NUL character in text and an integer past 64 bits in a BIGINT (SQLite takes both),
and the JSON that is stored or published to a device is written by serialisers that refuse integers past
64 bits, NaN and lone surrogates. A value like that used to travel to the database and come back as a
500 — or, for a desired configuration, be saved and then fail to publish. Declaring the bounds in the
parameter types refuses it as a 422 that names the field, in the OpenAPI document too.

Body strings and JSON documents carry validators; a query or path value uses the ``Annotated``
aliases below (``DeviceIdPath``, ``TextQuery``, ``Offset``…).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query
from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from telemetra.domain.errors import InvalidInput
from telemetra.domain.ids import DEVICE_ID_PATTERN
from telemetra.ingest.documents import INT64_MAX, check_document

# Documented on every free-text value (JSON Schema's ``pattern``), enforced by ``_nul_free``.
NUL_FREE_PATTERN = r"^[^\x00]*$"
# What a stored JSON document (metadata, command parameters and results, desired configuration) may
# hold. These are storage limits, not policy: well past what a device configuration needs, well short of
# what makes the serialisers recurse too deep or a row too big to read back in one answer.
DOCUMENT_MAX_DEPTH = 32
DOCUMENT_MAX_TEXT = 64 * 1024
DOCUMENT_MAX_VALUES = 10_000
MAX_QUERY_TEXT = 128
MAX_KEY_LIST = 100 * 129  # at most 100 keys of 128 characters, comma-separated (see api.params.key_list)

_NUL_FREE = {"pattern": NUL_FREE_PATTERN}


def refusal(reason: str) -> PydanticCustomError:
    """A validation error that reads as ``reason`` (a ``ValueError`` would read "Value error, reason")."""
    return PydanticCustomError("invalid", "{reason}", {"reason": reason})


def _nul_free(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise refusal("must not contain NUL characters")
    return value


def checked_document(label: str) -> AfterValidator:
    """A validator for a free-form JSON value: depth, size, NUL, 64-bit integers, finite numbers."""

    def check(value: Any) -> Any:
        try:
            check_document(
                value,
                max_depth=DOCUMENT_MAX_DEPTH,
                max_text=DOCUMENT_MAX_TEXT,
                max_nodes=DOCUMENT_MAX_VALUES,
                field=label,
            )
        except InvalidInput as exc:
            # Raised inside validation, it becomes pydantic's error at this field's location; a place
            # inside the document (``metadata.a.b[2]``) goes into the reason.
            place = (exc.field or "").lstrip(".")
            raise refusal(f"{exc.reason} (at {place})" if place and place != label else exc.reason) from None
        return value

    return AfterValidator(check)


def text(max_length: int) -> Any:
    """``Annotated`` metadata for a body string: at most ``max_length`` characters, no NUL."""
    return Field(max_length=max_length, json_schema_extra=_NUL_FREE)


# ------------------------------------------------------------------------------------------ body values

Name = Annotated[str, text(128), AfterValidator(_nul_free)]
ShortText = Annotated[str, text(32), AfterValidator(_nul_free)]
LongText = Annotated[str, text(10_000), AfterValidator(_nul_free)]
DeviceIdField = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
Metadata = Annotated[dict[str, Any], checked_document("metadata")]
Params = Annotated[dict[str, Any], checked_document("params")]
JsonValue = Annotated[Any, checked_document("result")]
ConfigValue = Annotated[Any, checked_document("")]  # the key is the field: places are below it

# ------------------------------------------------------------------------------------ path and query

DeviceIdPath = Annotated[
    str,
    Path(
        pattern=DEVICE_ID_PATTERN,
        description="letters, digits, '-', '_', '.', ':' (1-128)",
        examples=["esp32_01"],
    ),
]
# Command ids are UUIDs today; the bound leaves room for another scheme and nothing for a NUL.
CommandIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$")]
AlertIdPath = Annotated[int, Path(ge=1, le=INT64_MAX)]
DeviceIdQuery = Annotated[str | None, Query(pattern=DEVICE_ID_PATTERN, description="only this device")]
TextQuery = Annotated[
    str | None, Query(max_length=MAX_QUERY_TEXT, json_schema_extra=_NUL_FREE), AfterValidator(_nul_free)
]
KeysQuery = Annotated[
    str | None,
    Query(max_length=MAX_KEY_LIST, json_schema_extra=_NUL_FREE, description="comma-separated keys; all when absent"),
    AfterValidator(_nul_free),
]
Offset = Annotated[int, Query(ge=0, le=INT64_MAX)]
