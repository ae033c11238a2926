"""Structured logging, configured once at the edge (CLI or app factory): JSON or console via structlog,
over the standard library so every module just uses ``logging.getLogger(__name__)``."""

from __future__ import annotations

import logging
import sys
import time

import structlog

_SECRET_FIELDS = frozenset({"password", "secret", "api_key", "x-api-key", "authorization", "token"})


def _drop_secrets(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
    for key in list(event):
        if key.lower() in _SECRET_FIELDS:
            event[key] = "***"
    return event


def _drop_colour(_logger: object, _name: str, event: dict[str, object]) -> dict[str, object]:
    # uvicorn passes a copy of some messages with ANSI colour codes as the extra ``color_message`` (for its
    # own coloured formatter); in our log it would be a field full of escape sequences.
    event.pop("color_message", None)
    return event


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        _drop_colour,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _drop_secrets,
    ]
    final: list[structlog.types.Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt == "json":
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Plain tracebacks: the rich-rendered ones are slow enough to stall the event loop under load.
        final.append(structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback))
    formatter = structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=final)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("uvicorn.access", "amqtt", "transitions", "aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))


class Throttle:
    """At most one log line per key and period: a device that keeps sending the same bad message (or a
    retry loop) must not fill the log. ``allow(key)`` returns None to stay quiet, or how many lines
    were suppressed for that key since the last one that was let through."""

    def __init__(self, period_s: float, *, max_keys: int = 10_000) -> None:
        self._period = period_s
        self._max_keys = max_keys
        self._last: dict[object, tuple[float, int]] = {}

    def allow(self, key: object) -> int | None:
        now = time.monotonic()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self._period:
            self._last[key] = (seen[0], seen[1] + 1)
            return None
        if len(self._last) >= self._max_keys:
            self._last.clear()
        self._last[key] = (now, 0)
        return 0 if seen is None else seen[1]
