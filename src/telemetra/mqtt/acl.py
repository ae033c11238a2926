"""Who may publish or subscribe to which MQTT topic (pure functions, no I/O).

The rules of SPEC §2, with the templates derived from the route table (``RouteTable.publish_filters`` and
``RouteTable.downlink``): a device publishes only where its routes put it — under MQTT filters such as
``telemetra/{device}/#`` or ``paku/+/{device}/#`` — never to its downlink topics, and subscribes only to
exactly its own downlink topics (``…/cmd``, ``…/config``, ``heatpump/{device}/commands``, …); the backend's
service account may do everything. Both the embedded broker and the Mosquitto provisioning derive their
decisions from this one module so the two broker modes cannot drift apart:

- publish: allow ``rendered_publish(device_id)`` (MQTT filters), deny ``rendered_downlink(device_id)``;
- subscribe: allow exactly ``rendered_downlink(device_id)`` (literal topics).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from telemetra.mqtt.topics import topic_matches

DEVICE_PLACEHOLDER = "{device}"

# Characters that would let an id escape its own topic level or act as a wildcard once substituted.
_FORBIDDEN_ID_CHARS = frozenset("+#/\x00")


@dataclass(frozen=True, slots=True)
class MqttPrincipal:
    """The identity a connection authenticated as."""

    username: str
    device_id: str | None  # None for the backend service account
    is_service: bool = False


def is_valid_device_id(device_id: str | None) -> bool:
    """True when the id can be substituted into a topic without changing its structure."""
    return bool(device_id) and not (_FORBIDDEN_ID_CHARS & set(device_id or ""))


def _has_wildcard(topic: str) -> bool:
    return "+" in topic or "#" in topic


def _as_filter(root: str) -> str:
    """``a/{device}/`` (the older way of writing a root) means ``a/{device}/#``."""
    return root + "#" if root.endswith("/") else root


def _check_filter(template: str) -> None:
    levels = template.split("/")
    if levels.count(DEVICE_PLACEHOLDER) != 1 or levels[-2:] != [DEVICE_PLACEHOLDER, "#"]:
        raise ValueError(f"publish filter {template!r} must look like 'a/+/{DEVICE_PLACEHOLDER}/#'")
    for level in levels[:-2]:
        if level != "+" and (_has_wildcard(level) or not level or "{" in level):
            raise ValueError(f"publish filter {template!r}: levels before {DEVICE_PLACEHOLDER} are words or '+'")
    if levels[0].startswith("$"):
        raise ValueError(f"publish filter {template!r} must not start with '$'")


@lru_cache(maxsize=8192)
def _render(templates: tuple[str, ...], device_id: str) -> tuple[str, ...]:
    return tuple(t.replace(DEVICE_PLACEHOLDER, device_id) for t in templates)


@dataclass(frozen=True, slots=True)
class TopicAcl:
    """Topic templates, with a `{device}` placeholder, that bound what a device may touch.

    `device_roots` are MQTT publish filters ending in `/#` (levels before `{device}` may be `+`); a root
    written the older way, ending in `/`, means the same with `#` added. `downlink` lists the only topics
    a device may subscribe to; it may not publish to them (it must not be able to forge its own commands
    or overwrite its retained desired configuration).
    """

    device_roots: tuple[str, ...]
    downlink: tuple[str, ...]

    def __post_init__(self) -> None:
        # Checked once here so the per-message methods below can stay simple comparisons.
        object.__setattr__(self, "device_roots", tuple(_as_filter(r) for r in self.device_roots))
        for template in self.device_roots:
            _check_filter(template)
        for topic in self.downlink:
            if topic.count(DEVICE_PLACEHOLDER) != 1:
                raise ValueError(f"downlink topic {topic!r} must contain {DEVICE_PLACEHOLDER} once")
            if _has_wildcard(topic) or topic.startswith("$"):
                raise ValueError(f"downlink topic {topic!r} must not contain wildcards or start with '$'")

    @classmethod
    def for_prefix(cls, prefix: str) -> TopicAcl:
        """The default scheme of SPEC §2 for one topic prefix (`telemetra`, `paku`, …)."""
        return cls(
            device_roots=(f"{prefix}/{DEVICE_PLACEHOLDER}/#",),
            downlink=(f"{prefix}/{DEVICE_PLACEHOLDER}/cmd", f"{prefix}/{DEVICE_PLACEHOLDER}/config"),
        )

    def rendered_publish(self, device_id: str) -> tuple[str, ...]:
        """The MQTT filters `device_id` may publish under (its downlink excepted)."""
        return _render(self.device_roots, device_id)

    def rendered_downlink(self, device_id: str) -> tuple[str, ...]:
        return _render(self.downlink, device_id)

    def may_publish(self, p: MqttPrincipal, topic: str) -> bool:
        if p.is_service:
            return True
        device_id = p.device_id
        if device_id is None or not is_valid_device_id(device_id):
            return False
        if topic.startswith("$") or _has_wildcard(topic) or "\x00" in topic:
            return False
        if topic in self.rendered_downlink(device_id):
            return False
        return any(topic_matches(f, topic) for f in self.rendered_publish(device_id))

    def may_subscribe(self, p: MqttPrincipal, topic_filter: str) -> bool:
        if p.is_service:
            return True
        device_id = p.device_id
        if device_id is None or not is_valid_device_id(device_id):
            return False
        # Exact equality refuses wildcards and `$share/...` without special cases: no rendered
        # downlink topic contains either (checked in __post_init__ and is_valid_device_id).
        return topic_filter in self.rendered_downlink(device_id)
