"""Limits on free-form JSON documents (event and alert payloads, reported configuration, command results)
checked before anything recursive touches them. Pure.

``orjson`` parses up to 1,024 levels, but the JSON serialiser that stores a document (and the logging of
any error about it) recurses once per level and fails near Python's recursion limit — so a document is
walked here without recursion and refused when it is deeper than the setting allows. A NUL character
in any key or string is refused too: PostgreSQL cannot store it in text, and a message that can never be
stored must be refused up front rather than retried. So are the values Python's own JSON parser (the one
behind FastAPI's request bodies) lets through and orjson, PostgreSQL's ``json`` or a device's firmware
cannot take: integers past 64 bits, NaN and Infinity, and lone surrogates in text.
"""

from __future__ import annotations

from typing import Any

from telemetra.domain.errors import InvalidInput

NUL = "\x00"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_document(doc: Any, *, max_depth: int, max_text: int, max_nodes: int = 10_000, field: str = "payload") -> None:
    """Raise ``InvalidInput`` naming the place when ``doc`` breaks a limit; depth counts containers."""
    stack: list[tuple[Any, int, str]] = [(doc, 0, field)]
    nodes = 0
    while stack:
        value, depth, where = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise InvalidInput(f"more than {max_nodes} values in one document", field=field)
        kind = type(value)
        if kind is str:
            _check_text(value, max_text, where)
        elif kind is int:
            if not INT64_MIN <= value <= INT64_MAX:
                raise InvalidInput("integers must fit in 64 bits", field=where)
        elif kind is float:
            if value - value != 0.0:  # inf - inf and nan - nan are nan
                raise InvalidInput("numbers must be finite (no NaN or Infinity)", field=where)
        elif isinstance(value, str):
            _check_text(value, max_text, where)
        elif isinstance(value, dict):
            if depth + 1 > max_depth:
                raise InvalidInput(f"nested deeper than {max_depth} levels", field=where)
            for key, inner in value.items():
                name = f"{where}.{key}" if isinstance(key, str) and len(key) <= 64 else where
                if isinstance(key, str) and (NUL in key or not _encodable(key)):
                    raise InvalidInput("keys must not contain NUL characters or lone surrogates", field=where)
                stack.append((inner, depth + 1, name))
        elif isinstance(value, list):
            if depth + 1 > max_depth:
                raise InvalidInput(f"nested deeper than {max_depth} levels", field=where)
            stack.extend((inner, depth + 1, f"{where}[{i}]") for i, inner in enumerate(value))


def _check_text(text: str, max_text: int, where: str) -> None:
    if len(text) > max_text:
        raise InvalidInput(f"text longer than {max_text} characters", field=where)
    if NUL in text:
        raise InvalidInput("text must not contain NUL characters", field=where)
    if not _encodable(text):
        raise InvalidInput("text must be valid Unicode (no lone surrogates)", field=where)


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, *, max_text: int, field: str) -> str:
    _check_text(text, max_text, field)
    return text
