"""Topic routes are data, not code (SPEC §2): patterns with ``{device}``, ``{name}`` and a trailing
``{path}`` (the rest of the topic, any depth) map a topic to a message kind. Presets give the seeds'
schemes; settings add more as ``pattern=kind``."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class Kind(enum.Enum):
    TELEMETRY = "telemetry"
    STATE = "state"
    EVENT = "event"
    ALERT = "alert"
    ACK = "ack"


MATCH_CACHE_ENTRIES = 50_000
_PLACEHOLDER = re.compile(r"\{(device|name|path)\}")


@dataclass(frozen=True, slots=True)
class RouteMatch:
    kind: Kind
    device_id: str
    name: str | None
    route: Route


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    kind: Kind

    def __post_init__(self) -> None:
        levels = self.pattern.split("/")
        if "{device}" not in levels:
            raise ValueError(f"route {self.pattern!r} needs a whole {{device}} level")
        if any(c in self.pattern for c in "+#"):
            raise ValueError(f"route {self.pattern!r}: use {{device}}/{{name}}/{{path}}, not MQTT wildcards")
        if "{path}" in levels and levels[-1] != "{path}":
            raise ValueError(f"route {self.pattern!r}: {{path}} must be the last level")

    @property
    def subscription(self) -> str:
        """The MQTT filter that receives this route's topics."""
        return "/".join(
            "#" if level == "{path}" else "+" if _PLACEHOLDER.fullmatch(level) else level
            for level in self.pattern.split("/")
        )

    @property
    def device_root(self) -> str:
        """The topic prefix a device owns under this route, with ``{device}`` left in (for ACLs)."""
        levels = self.pattern.split("/")
        return "/".join(levels[: levels.index("{device}") + 1]) + "/"

    def match(self, topic: str) -> RouteMatch | None:
        pattern = self.pattern.split("/")
        levels = topic.split("/")
        device = name = None
        for i, want in enumerate(pattern):
            if want == "{path}":
                if i >= len(levels):
                    return None
                name = "/".join(levels[i:])
                break
            if i >= len(levels):
                return None
            got = levels[i]
            if want == "{device}":
                device = got
            elif want == "{name}":
                name = got
            elif want != got:
                return None
        else:
            if len(levels) != len(pattern):
                return None
        if not device:
            return None
        return RouteMatch(self.kind, device, name, self)


def default_routes(prefix: str) -> list[Route]:
    """Seed 004's scheme (``paku`` / ``telemetra``). Order matters: specific event names first."""
    return [
        Route(f"{prefix}/{{device}}/telemetry", Kind.TELEMETRY),
        Route(f"{prefix}/{{device}}/state", Kind.STATE),
        Route(f"{prefix}/{{device}}/event/ack", Kind.ACK),
        Route(f"{prefix}/{{device}}/event/alert", Kind.ALERT),
        Route(f"{prefix}/{{device}}/event/{{name}}", Kind.EVENT),
    ]


def heatpump_routes() -> list[Route]:
    """Seed 003: nested telemetry on ``data``, ``status/<key>`` state (retained), ``alerts``."""
    return [
        Route("heatpump/{device}/data", Kind.TELEMETRY),
        Route("heatpump/{device}/status/{path}", Kind.STATE),
        Route("heatpump/{device}/alerts", Kind.ALERT),
    ]


def parse_route(spec: str) -> Route:
    pattern, sep, kind = spec.partition("=")
    if not sep:
        raise ValueError(f"route {spec!r} must look like 'pattern=kind'")
    try:
        return Route(pattern.strip(), Kind(kind.strip()))
    except ValueError as exc:
        raise ValueError(f"route {spec!r}: {exc}") from None


def build_routes(prefix: str, presets: Sequence[str], extra: Iterable[str] = ()) -> list[Route]:
    routes: list[Route] = []
    prefixes: list[str] = []
    for preset in presets:
        if preset == "default":
            prefixes.append(prefix)
        elif preset in ("paku", "telemetra"):
            prefixes.append(preset)
        elif preset == "heatpump":
            routes.extend(heatpump_routes())
        else:
            raise ValueError(f"unknown preset {preset!r}")
    for p in dict.fromkeys(prefixes):
        routes.extend(default_routes(p))
    routes.extend(parse_route(spec) for spec in extra)
    return routes


class RouteTable:
    def __init__(self, routes: Sequence[Route], *, downlink_prefix: str) -> None:
        if not routes:
            raise ValueError("no MQTT routes configured")
        self.routes = list(routes)
        self.downlink_prefix = downlink_prefix
        # topic → match: a fleet publishes on a few topics per device, over and over (MQTT hot path).
        self._matches: dict[str, RouteMatch | None] = {}

    def match(self, topic: str) -> RouteMatch | None:
        try:
            return self._matches[topic]
        except KeyError:
            pass
        found = None
        for route in self.routes:
            found = route.match(topic)
            if found is not None:
                break
        if len(self._matches) >= MATCH_CACHE_ENTRIES:
            self._matches.clear()
        self._matches[topic] = found
        return found

    @property
    def subscriptions(self) -> list[str]:
        """The smallest set of filters: overlapping subscriptions would make the broker deliver one
        message once per matching filter."""
        filters = list(dict.fromkeys(r.subscription for r in self.routes))
        return [f for f in filters if not any(o != f and filter_covers(o, f) for o in filters)]

    @property
    def device_roots(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.device_root for r in self.routes))

    @property
    def downlink(self) -> tuple[str, ...]:
        return (self.command_topic("{device}"), self.config_topic("{device}"))

    def command_topic(self, device_id: str) -> str:
        return f"{self.downlink_prefix}/{device_id}/cmd"

    def config_topic(self, device_id: str) -> str:
        return f"{self.downlink_prefix}/{device_id}/config"


def filter_covers(general: str, specific: str) -> bool:
    """True when every topic matched by filter ``specific`` is matched by filter ``general``."""
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(s) or s[i] == "#":
            return False
        if level != "+" and level != s[i]:
            return False
        if level == "+" and s[i] == "#":
            return False
    return len(g) == len(s)
