"""Topic routes are data, not code (SPEC §2).

A route maps a topic pattern to a message kind. Patterns are levels separated by ``/``: literals,
``{device}`` (exactly once: the device the topic belongs to), ``{name}`` (names an event or a state key),
a last ``{path}`` (the rest of the topic, any depth) and any other ``{word}`` (one level, any value, such as
paku's ``{system}``). A route whose last level is ``{device}`` is fine (paku's ``paku/ruuvi/{device}``).

A scheme also owns its downlink (``Downlink``): the command and configuration topics its devices subscribe
to, with their payload shapes (rendered by ``mqtt.shapes``). Presets live in ``mqtt.presets``.

From the routes follow, in one place (``RouteTable``):
- the device ACL: a device may publish under ``<levels up to {device}>/#`` of every route (other
  placeholders as ``+``) and subscribe to exactly its downlink topics (``mqtt.acl.TopicAcl``);
- the collector's subscriptions: those same filters with ``+`` for the device, so that whatever a device
  may publish reaches Telemetra — and what no route takes is kept as rejected, not lost in the broker;
- a refusal of route sets that would let one device publish as another: two filters that can match the
  same topic must name the device at the same level.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from telemetra.mqtt.topics import filter_covers, filters_intersect, topic_matches


class Kind(enum.Enum):
    TELEMETRY = "telemetry"
    STATE = "state"
    EVENT = "event"
    ALERT = "alert"
    ACK = "ack"
    CONFIG = "config"  # the device reports the configuration it runs
    DOWNLINK = "downlink"  # one of our own downlink topics, seen again through the wide subscription: ignored


class Purpose(enum.Enum):
    COMMAND = "command"
    CONFIG = "config"


class Shape(enum.Enum):
    ENVELOPE = "envelope"  # command {"id","name","params","ts"} (Telemetra's own scheme)
    NAME_KEY = "name_key"  # command {<name_key>: name, **params}, small and flat (heat pump, paku heater)
    PARAMS = "params"  # command: its params object as it is (paku's cmd/ota {url, version, checksum})
    VERSIONED = "versioned"  # configuration {**config, "version": n}
    PLAIN = "plain"  # configuration as it is (paku's config/set)


MATCH_CACHE_ENTRIES = 50_000
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True, slots=True)
class Profile:
    """How a route's payloads are read beyond the generic rules of ``ingest.normalize``."""

    boot_clock_ms: bool = False  # a numeric timestamp below epoch-ms magnitude is millis() since boot
    firmware_field: str | None = None  # a top-level string that is the firmware version, not a series


PLAIN_PROFILE = Profile()


@dataclass(frozen=True, slots=True)
class RouteMatch:
    kind: Kind
    device_id: str
    name: str | None
    route: Route


def _levels(pattern: str, what: str) -> list[str]:
    levels = pattern.split("/")
    if levels.count("{device}") != 1:
        raise ValueError(f"{what} {pattern!r} needs {{device}} exactly once, as a whole level")
    if any(c in pattern for c in "+#") or pattern.startswith("$"):
        raise ValueError(f"{what} {pattern!r}: use placeholders such as {{device}}/{{name}}, not MQTT wildcards")
    for level in levels:
        if ("{" in level or "}" in level) and not _PLACEHOLDER.fullmatch(level):
            raise ValueError(f"{what} {pattern!r}: a placeholder must be a whole level, such as {{system}}")
    return levels


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    kind: Kind
    profile: Profile = PLAIN_PROFILE
    name_prefix: str = ""  # put before the {name}/{path} an event is called by (paku's "ota/")

    def __post_init__(self) -> None:
        levels = _levels(self.pattern, "route")
        if "{path}" in levels and levels[-1] != "{path}":
            raise ValueError(f"route {self.pattern!r}: {{path}} must be the last level")
        if levels.count("{name}") > 1 or ("{name}" in levels and "{path}" in levels):
            raise ValueError(f"route {self.pattern!r}: one {{name}} or a last {{path}}, not both")

    @property
    def device_level(self) -> int:
        return self.pattern.split("/").index("{device}")

    @property
    def subscription(self) -> str:
        """The MQTT filter that receives exactly this route's topics."""
        return "/".join(
            "#" if level == "{path}" else "+" if _PLACEHOLDER.fullmatch(level) else level
            for level in self.pattern.split("/")
        )

    @property
    def publish_filter(self) -> str:
        """What a device may publish under because of this route: its levels up to ``{device}`` (other
        placeholders as ``+``) and everything below, as an MQTT filter with ``{device}`` left in."""
        levels = self.pattern.split("/")[: self.device_level + 1]
        kept = [level if level == "{device}" or not _PLACEHOLDER.fullmatch(level) else "+" for level in levels]
        return "/".join([*kept, "#"])

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
            elif _PLACEHOLDER.fullmatch(want):
                continue  # {system}, {site}, …: any one level
            elif want != got:
                return None
        else:
            if len(levels) != len(pattern):
                return None
        if not device:
            return None
        if self.name_prefix:
            name = self.name_prefix + (name or "")
        return RouteMatch(self.kind, device, name, self)


@dataclass(frozen=True, slots=True)
class Downlink:
    """A topic a scheme's devices subscribe to, and the shape of what is published there."""

    pattern: str  # an exact topic with {device} once
    purpose: Purpose
    shape: Shape
    scheme: str  # the preset it belongs to: a command goes out once per scheme (mqtt.shapes)
    qos: int = 1
    retain: bool = False
    name_key: str = "command"  # Shape.NAME_KEY: the key that carries the command's name
    max_bytes: int | None = None  # what the firmware reads of a payload (seed 003: the first 127 bytes)
    commands: frozenset[str] | None = None  # the names sent here; None: those no other downlink of the scheme lists

    def __post_init__(self) -> None:
        levels = _levels(self.pattern, "downlink topic")
        if any(_PLACEHOLDER.fullmatch(level) for level in levels if level != "{device}"):
            raise ValueError(f"downlink topic {self.pattern!r} must be one exact topic per device")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"downlink topic {self.pattern!r}: QoS must be 0, 1 or 2")

    def topic(self, device_id: str) -> str:
        return self.pattern.replace("{device}", device_id)


def _as_filter(template: str) -> str:
    return template.replace("{device}", "+")


class RouteTable:
    def __init__(self, routes: Sequence[Route], downlinks: Sequence[Downlink] = ()) -> None:
        if not routes:
            raise ValueError("no MQTT routes configured")
        self.routes = list(routes)
        self.downlinks = list(downlinks)
        # Our own downlink topics lie under the devices' filters: recognised first, and ignored.
        self._matchers = [Route(d.pattern, Kind.DOWNLINK) for d in self.downlinks] + self.routes
        self._check_ownership()
        # topic → match: a fleet publishes on a few topics per device, over and over (MQTT hot path).
        self._matches: dict[str, RouteMatch | None] = {}

    def _check_ownership(self) -> None:
        """Refuse routes under which a device could publish as another device, or forge another's downlink:
        whenever two filters can match one topic, they must find the device at the same level."""
        templates = [(r.pattern, r.publish_filter) for r in self.routes]
        templates += [(d.pattern, d.pattern) for d in self.downlinks]
        for i, (pattern_a, a) in enumerate(templates):
            for pattern_b, b in templates[i + 1 :]:
                level_a, level_b = a.split("/").index("{device}"), b.split("/").index("{device}")
                if level_a != level_b and filters_intersect(_as_filter(a), _as_filter(b)):
                    raise ValueError(
                        f"MQTT routes {pattern_a!r} and {pattern_b!r} overlap but find the device at different "
                        "levels, so one device could publish as another; do not enable both presets (e.g. "
                        "'paku' and 'paku-iot'), or give the route a first level of its own"
                    )

    def match(self, topic: str) -> RouteMatch | None:
        try:
            return self._matches[topic]
        except KeyError:
            pass
        found = None
        for route in self._matchers:
            found = route.match(topic)
            if found is not None:
                break
        if len(self._matches) >= MATCH_CACHE_ENTRIES:
            self._matches.clear()
        self._matches[topic] = found
        return found

    def owner(self, topic: str) -> str | None:
        """The device under whose topics ``topic`` lies (whether or not a route takes it)."""
        for template in self.publish_filters:
            if topic_matches(_as_filter(template), topic):
                level = template.split("/").index("{device}")
                return topic.split("/")[level] or None
        return None

    @property
    def publish_filters(self) -> tuple[str, ...]:
        """MQTT filters with ``{device}``: where a device may publish (``mqtt.acl.TopicAcl.device_roots``)."""
        return tuple(dict.fromkeys(r.publish_filter for r in self.routes))

    @property
    def downlink(self) -> tuple[str, ...]:
        """Exact topics with ``{device}``: all a device may subscribe to, and never publish to."""
        return tuple(dict.fromkeys(d.pattern for d in self.downlinks))

    @property
    def subscriptions(self) -> list[str]:
        """The collector's filters: everything devices may publish, in the smallest set of filters
        (overlapping subscriptions would make the broker deliver a message once per matching filter)."""
        filters = list(dict.fromkeys(_as_filter(f) for f in self.publish_filters))
        return [f for f in filters if not any(o != f and filter_covers(o, f) for o in filters)]
