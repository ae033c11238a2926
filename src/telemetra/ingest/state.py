"""State, event, alert and ack payloads → typed values. Pure.

State (SPEC §2): ``{"online":true,"rssi":-61,"fwVersion":"1.2.0",...}`` or plain ``online``/``offline``
(the Last Will); seed 003 publishes one key per topic (``status/online`` = ``true``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from telemetra.domain.errors import InvalidInput
from telemetra.ingest.documents import check_document, check_text
from telemetra.ingest.normalize import Limits

_TRUE = frozenset({"online", "true", "1", "on", "up", "connected"})
_FALSE = frozenset({"offline", "false", "0", "off", "down", "disconnected"})
_FW_FIELDS = ("fwVersion", "fw_version", "firmware_version", "firmware", "fw")  # paku's edge: firmware_version
_MODEL_FIELDS = ("device_model",)  # paku's edge status: what its OTA service registers devices by


@dataclass(slots=True)
class StateReport:
    online: bool | None = None
    rssi: int | None = None
    fw_version: str | None = None
    model: str | None = None
    reported_config: dict[str, Any] | None = None
    values: dict[str, str] = field(default_factory=dict)


def _presence(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def parse_any(payload: bytes) -> Any:
    """JSON when it is JSON, else the text itself (devices publish ``online`` without quotes)."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        try:
            return payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise InvalidInput("payload is neither JSON nor UTF-8 text", field="payload") from None


def normalize_state(payload: bytes, *, key: str | None, limits: Limits) -> StateReport:
    doc = parse_any(payload)
    check_document(doc, max_depth=limits.max_depth, max_text=limits.max_document_text)
    report = StateReport()
    if key is not None and not isinstance(doc, Mapping):
        text = _text(doc, limits, key)
        report.values[key] = text
        if key == "online":
            report.online = _presence(doc)
        elif key in _FW_FIELDS:
            report.fw_version = text
        return report
    if not isinstance(doc, Mapping):
        presence = _presence(doc)
        if presence is None:
            raise InvalidInput("state must be a JSON object or online/offline", field="payload")
        report.online = presence
        report.values["online"] = "true" if presence else "false"
        return report
    prefix = f"{key}." if key else ""
    for name, value in doc.items():
        if value is None:
            continue
        if name == "online":
            report.online = _presence(value)
        elif name == "rssi" and isinstance(value, int | float) and not isinstance(value, bool):
            report.rssi = int(value)
        elif name in _FW_FIELDS and isinstance(value, str):
            report.fw_version = check_text(value[:64], max_text=64, field=f"payload.{name}")
        elif name in _MODEL_FIELDS and isinstance(value, str):
            report.model = check_text(value[:128], max_text=128, field=f"payload.{name}")
        elif name == "wifi" and isinstance(value, Mapping) and report.rssi is None:
            rssi = value.get("rssi")  # paku's edge status nests it: {"wifi": {"rssi": -61, …}}
            if isinstance(rssi, int | float) and not isinstance(rssi, bool):
                report.rssi = int(rssi)
        elif name == "config" and isinstance(value, Mapping):
            check_document(value, max_depth=limits.max_depth, max_text=limits.max_document_text, field="payload.config")
            report.reported_config = dict(value)
            continue
        _flatten_into(report.values, prefix + name, value, limits, depth=1)
    if len(report.values) > limits.max_keys:
        raise InvalidInput(f"more than {limits.max_keys} state keys", field="payload")
    return report


def _flatten_into(out: dict[str, str], key: str, value: Any, limits: Limits, *, depth: int) -> None:
    if depth > limits.max_depth:
        raise InvalidInput(f"nested deeper than {limits.max_depth} levels", field=key)
    if isinstance(value, Mapping):
        for name, inner in value.items():
            if inner is not None:
                _flatten_into(out, f"{key}.{name}", inner, limits, depth=depth + 1)
        return
    if len(key) > limits.max_key_length:
        raise InvalidInput(f"key longer than {limits.max_key_length} characters", field=key[:32])
    out[key] = _text(value, limits, key)


def _text(value: Any, limits: Limits, key: str) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = value
    else:
        text = orjson.dumps(value).decode()
    if len(text) > limits.max_text_length:
        raise InvalidInput(f"longer than {limits.max_text_length} characters", field=key)
    if "\x00" in text:
        raise InvalidInput("must not contain NUL characters", field=key)
    return text


@dataclass(frozen=True, slots=True)
class AlertFields:
    type: str
    severity: str
    message: str | None
    value: float | None


_SEVERITIES = {
    "info": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "critical",
    "critical": "critical",
    "crit": "critical",
    "major": "critical",
    "minor": "warning",
}


def alert_fields(doc: Any) -> AlertFields:
    """Seed 003: ``{"type":"high_temp","level":"warning","value":82.5,"message":"…"}``."""
    if not isinstance(doc, Mapping):
        return AlertFields("alert", "warning", str(doc)[:1000] if doc is not None else None, None)
    raw_type = doc.get("type") or doc.get("name") or doc.get("code") or "alert"
    level = str(doc.get("level") or doc.get("severity") or "warning").lower()
    value = doc.get("value")
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    message = doc.get("message") or doc.get("msg")
    return AlertFields(
        str(raw_type)[:128],
        _SEVERITIES.get(level, "warning"),
        str(message)[:1000] if message is not None else None,
        number,
    )


@dataclass(frozen=True, slots=True)
class AckFields:
    command_id: str
    ok: bool
    result: Any


def ack_fields(doc: Any) -> AckFields:
    """``{"id":"<command id>","status":"ok"|"error","result":…}`` (``ok: true/false`` also read)."""
    if not isinstance(doc, Mapping):
        raise InvalidInput("an ack must be a JSON object with the command id", field="payload")
    command_id = doc.get("id") or doc.get("command_id") or doc.get("cmd_id")
    if not isinstance(command_id, str) or not command_id:
        raise InvalidInput("an ack needs the command's id in 'id'", field="payload.id")
    if "ok" in doc:
        ok = bool(doc["ok"])
    else:
        ok = str(doc.get("status", "ok")).lower() in ("ok", "success", "done", "acked", "true")
    result = doc.get("result", doc.get("response", doc.get("error")))
    return AckFields(command_id[:36], ok, result)
