"""The built-in topic schemes (``TELEMETRA_MQTT_PRESETS``): each one's uplink routes and its own downlink.

- ``default`` / ``paku`` / ``telemetra`` — SPEC §2's scheme under a prefix (seed 004's requirements);
- ``heatpump`` — smart-heat-pump (seed 003, CLIENTS.md §3): its firmware sends ``millis()`` since boot as
  ``timestamp`` and its version as ``version``, and reads commands as ``{"command": name, …}`` on
  ``heatpump/{id}/commands`` (only the first 127 bytes);
- ``paku-iot`` — the tree paku-iot actually built (CLIENTS.md §4.2–§4.5): ``paku/{system}/{device}/data``,
  the heater emulator's ``paku/heater/{id}/state|data`` with commands ``{"cmd": …}`` on ``…/cmd``, the
  Ruuvi emulator's legacy ``paku/ruuvi/{device}``, and the edge devices' ``paku/edge/{id}/…`` status,
  configuration report, ``ota/status|progress|result``, retained ``config/set`` and ``cmd/ota``.

Extra routes come from ``TELEMETRA_MQTT_ROUTES`` as ``pattern=kind``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from telemetra.mqtt.routes import Downlink, Kind, Profile, Purpose, Route, RouteTable, Shape

# smart-heat-pump's firmware parses the first 127 bytes of a command (CLIENTS.md §3.1).
HEATPUMP_COMMAND_BYTES = 127


def telemetra_scheme(prefix: str) -> tuple[list[Route], list[Downlink]]:
    """SPEC §2 under ``prefix``. Order matters: specific event names first."""
    routes = [
        Route(f"{prefix}/{{device}}/telemetry", Kind.TELEMETRY),
        Route(f"{prefix}/{{device}}/state", Kind.STATE),
        Route(f"{prefix}/{{device}}/event/ack", Kind.ACK),
        Route(f"{prefix}/{{device}}/event/alert", Kind.ALERT),
        Route(f"{prefix}/{{device}}/event/{{name}}", Kind.EVENT),
    ]
    downlinks = [
        Downlink(f"{prefix}/{{device}}/cmd", Purpose.COMMAND, Shape.ENVELOPE, scheme=prefix),
        Downlink(f"{prefix}/{{device}}/config", Purpose.CONFIG, Shape.VERSIONED, scheme=prefix, retain=True),
    ]
    return routes, downlinks


def heatpump_scheme() -> tuple[list[Route], list[Downlink]]:
    routes = [
        Route("heatpump/{device}/data", Kind.TELEMETRY, Profile(boot_clock_ms=True, firmware_field="version")),
        Route("heatpump/{device}/status/{path}", Kind.STATE),
        Route("heatpump/{device}/alerts", Kind.ALERT),
    ]
    downlinks = [
        Downlink(
            "heatpump/{device}/commands",
            Purpose.COMMAND,
            Shape.NAME_KEY,
            scheme="heatpump",
            name_key="command",
            max_bytes=HEATPUMP_COMMAND_BYTES,
        )
    ]
    return routes, downlinks


def paku_iot_scheme() -> tuple[list[Route], list[Downlink]]:
    routes = [
        Route("paku/heater/{device}/state", Kind.STATE),
        Route("paku/edge/{device}/status", Kind.STATE),
        Route("paku/edge/{device}/config/report", Kind.CONFIG),
        Route("paku/edge/{device}/config", Kind.CONFIG),  # the 4-level form paku's collector matched
        Route("paku/edge/{device}/telemetry", Kind.TELEMETRY),
        Route("paku/edge/{device}/ota/{name}", Kind.EVENT, name_prefix="ota/"),
        Route("paku/{system}/{device}/data", Kind.TELEMETRY),  # heater data, sensors, power, flow
        Route("paku/ruuvi/{device}", Kind.TELEMETRY),  # the Ruuvi emulator's legacy 3-level topic
    ]
    downlinks = [
        Downlink("paku/heater/{device}/cmd", Purpose.COMMAND, Shape.NAME_KEY, scheme="paku-iot", name_key="cmd"),
        Downlink(
            "paku/edge/{device}/cmd/ota", Purpose.COMMAND, Shape.PARAMS, scheme="paku-iot", commands=frozenset({"ota"})
        ),
        Downlink("paku/edge/{device}/config/set", Purpose.CONFIG, Shape.PLAIN, scheme="paku-iot", retain=True),
    ]
    return routes, downlinks


def parse_route(spec: str) -> Route:
    pattern, sep, kind = spec.partition("=")
    if not sep:
        raise ValueError(f"route {spec!r} must look like 'pattern=kind'")
    try:
        parsed = Kind(kind.strip())
        if parsed is Kind.DOWNLINK:
            raise ValueError("'downlink' is not a kind a device publishes")
        return Route(pattern.strip(), parsed)
    except ValueError as exc:
        raise ValueError(f"route {spec!r}: {exc}") from None


def build_table(prefix: str, presets: Sequence[str], extra: Iterable[str] = ()) -> RouteTable:
    """The route table of the enabled presets (in order) and extra routes; ``ValueError`` when they
    conflict (see ``RouteTable``)."""
    routes: list[Route] = []
    downlinks: list[Downlink] = []
    seen: set[str] = set()
    for preset in presets:
        if preset not in ("default", "paku", "telemetra", "heatpump", "paku-iot"):
            raise ValueError(f"unknown preset {preset!r}")
        if preset in ("heatpump", "paku-iot"):
            key = preset
        else:  # SPEC §2's scheme: "default" under the configured prefix, "paku" and "telemetra" under theirs
            key = f"scheme:{prefix if preset == 'default' else preset}"
        if key in seen:
            continue
        seen.add(key)
        if preset == "heatpump":
            r, d = heatpump_scheme()
        elif preset == "paku-iot":
            r, d = paku_iot_scheme()
        else:
            r, d = telemetra_scheme(key.removeprefix("scheme:"))
        routes.extend(r)
        downlinks.extend(d)
    routes.extend(parse_route(spec) for spec in extra)
    return RouteTable(routes, downlinks)
