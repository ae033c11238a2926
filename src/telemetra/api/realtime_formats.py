"""What each WebSocket client is sent for an event — one message shape per family of streams.

- ``telemetra`` (``/api/v1/realtime``): ``{"type", "id", "device_id", "ts", …}`` per SPEC §6 — telemetry
  ``values`` as ``/latest`` has them (dotted keys), state ``values`` and presence, device events' ``name``
  and ``payload``, the alert as ``GET /api/v1/alerts`` shows it, the command's status, the registry's
  ``change``.
- ``telemetry_app`` (its Flutter app, CLIENTS.md §2.2): ``{"type":"reading","device_id","data":Reading}``.
- ``heatpump`` (smart-heat-pump's dashboard, CLIENTS.md §3.3): ``sensor_data`` with the device's own nested
  payload, and its ``alert`` message.

Each message is encoded once per event and format (``ChangeEvent.encoded``), and framed once for the
clients without compression (``ChangeEvent.frames``), however many clients get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from telemetra.api.alerts import alert_out
from telemetra.api.compat_telemetry_app import reading_out
from telemetra.api.ws_transport import text_frame
from telemetra.domain.timeutil import ms_to_iso
from telemetra.events import model
from telemetra.events.model import ChangeEvent
from telemetra.storage.schema import AlertRow

Format = Callable[[ChangeEvent], dict[str, Any] | None]


def telemetra(event: ChangeEvent) -> dict[str, Any] | None:
    out: dict[str, Any] = {"type": event.type, "id": event.id, "device_id": event.device_id, "ts": ms_to_iso(event.ts)}
    data = event.data
    if event.type == model.TELEMETRY:
        out["values"] = data["values"]
    elif event.type == model.ALERT:
        out["alert"] = alert_out(AlertRow(**data["alert"]))
        out["change"] = data.get("change") or data["alert"].get("status")  # raised, acknowledged, cleared
    elif event.type == model.COMMAND:
        out["command"] = {k: data[k] for k in ("id", "name", "status") if k in data}
    else:
        out.update({k: v for k, v in data.items() if k != "raw"})
    return out


def telemetry_app(event: ChangeEvent) -> dict[str, Any] | None:
    if event.type != model.TELEMETRY or event.device_id is None:
        return None
    reading = reading_out(event.device_id, event.ts, dict(event.data["values"]))
    return {"type": "reading", "device_id": event.device_id, "data": reading}


def heatpump(event: ChangeEvent) -> dict[str, Any] | None:
    if event.type == model.TELEMETRY:
        return {
            "type": "sensor_data",
            "device_id": event.device_id,
            "data": _as_published(event),
            "timestamp": ms_to_iso(event.ts),
        }
    if event.type == model.ALERT:
        alert = event.data["alert"]
        return {
            "type": "alert",
            "device_id": event.device_id,
            "alert_type": alert.get("type"),
            "level": alert.get("severity"),
            "value": alert.get("value"),
            "message": alert.get("message"),
            "timestamp": ms_to_iso(event.ts),
        }
    return None


FORMATS: dict[str, Format] = {"telemetra": telemetra, "telemetry_app": telemetry_app, "heatpump": heatpump}


def encoded(event: ChangeEvent, name: str) -> str | None:
    """The message of ``event`` in format ``name`` as JSON text, or None when that format has none."""
    text = event.encoded.get(name)
    if text is None:
        message = FORMATS[name](event)
        text = orjson.dumps(message).decode() if message is not None else ""
        event.encoded[name] = text
    return text or None


def frame(event: ChangeEvent, name: str) -> bytes | None:
    """The message of ``event`` in format ``name`` as one WebSocket text frame, or None when that format
    has none. Built once: every client of the format is handed the same bytes."""
    built = event.frames.get(name)
    if built is None:
        text = encoded(event, name)
        built = text_frame(text.encode()) if text is not None else b""
        event.frames[name] = built
    return built or None


def _as_published(event: ChangeEvent) -> Any:
    """The device's own payload as it published it (MQTT), else its values nested back at the dots."""
    raw = event.data.get("raw")
    if isinstance(raw, bytes | bytearray):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    nested: dict[str, Any] = {}
    for key, value in event.data["values"].items():
        node = nested
        *path, last = key.split(".")
        for part in path:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[last] = value
    return nested
