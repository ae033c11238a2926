"""Which device ids may be created. Pure.

A device id is an MQTT username, a topic level, a URL path segment and a Mosquitto client name, so
a few ids are kept from every creation path — the admin API, claim codes, the CLI and
auto-registration (a gateway's unknown child, a fleet key's first post):

- account names an operator's broker or proxy is likely to hold (``admin`` is what `mosquitto_ctrl
  dynsec init` is documented with), and ``telemetra`` with anything under it (the service account and
  the collector's client id live there);
- ids made only of dots: ``.`` and ``..`` are rewritten away by every URL client, so such a device
  could never be read back.

The character set itself is ``telemetra.ingest.normalize.valid_device_id`` (the same as
``DEVICE_ID_PATTERN``). Real gateways are unaffected: iotmesh's node ids are lowercase hex
(CLIENTS.md §1.1), the other systems' ids are names such as ``ruuvi_cabin`` or ``hp-001``.
"""

from __future__ import annotations

# Letters, digits and - _ . : ; 1–128 characters (what the path, topic and username all carry).
DEVICE_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"

RESERVED_DEVICE_IDS = frozenset({"admin", "administrator", "root", "anonymous", "system", "telemetra"})
_RESERVED_PREFIXES = ("telemetra-", "telemetra_", "telemetra.", "telemetra:")


def reserved_reason(device_id: str) -> str | None:
    """Why ``device_id`` may not be given to a new device, or None when it may (case-insensitive)."""
    lowered = device_id.lower()
    if lowered in RESERVED_DEVICE_IDS or lowered.startswith(_RESERVED_PREFIXES):
        return f"device id {device_id!r} is reserved (admin, root, telemetra… name accounts, not devices)"
    if device_id.strip(".") == "":
        return f"device id {device_id!r} is made only of dots, which URLs cannot carry"
    return None
