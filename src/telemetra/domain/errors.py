"""Domain errors. Each carries the HTTP status it maps to, the field it concerns and a reason;
``api.errors`` turns them into one JSON shape, so no handler builds error bodies itself."""

from __future__ import annotations


class TelemetraError(Exception):
    status: int = 400
    code: str = "bad_request"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class InvalidInput(TelemetraError):
    status = 422
    code = "invalid"


class MalformedPayload(TelemetraError):
    status = 400
    code = "malformed"


class PayloadTooLarge(TelemetraError):
    status = 413
    code = "too_large"


class Unauthorized(TelemetraError):
    status = 401
    code = "unauthorized"


class Forbidden(TelemetraError):
    status = 403
    code = "forbidden"


class NotFound(TelemetraError):
    status = 404
    code = "not_found"


class Conflict(TelemetraError):
    status = 409
    code = "conflict"


class Gone(TelemetraError):
    status = 410
    code = "gone"


class Overloaded(TelemetraError):
    """The ingest queue is full: the client should retry after ``retry_after`` seconds."""

    status = 503
    code = "overloaded"

    def __init__(self, reason: str, *, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Unstorable(TelemetraError):
    """The database refused this message's values and always will (a retry cannot help): 422."""

    status = 422
    code = "unstorable"


class StorageUnavailable(TelemetraError):
    """The database could not be reached or could not commit now; nothing of the request was stored and
    the client may retry after ``retry_after`` seconds."""

    status = 503
    code = "storage_unavailable"

    def __init__(self, reason: str, *, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Unavailable(TelemetraError):
    """A capability this request needs is not running (e.g. OTA in a process built without it)."""

    status = 503
    code = "unavailable"
