"""Who may publish or subscribe to which MQTT topic (pure functions, no I/O).

The rules of SPEC §2: a device publishes only under its own `{prefix}/{device}/…` roots, never to its
downlink topics, and subscribes only to exactly its own downlink topics (`cmd`, `config`); the
backend's service account may do everything. Both the embedded broker and the Mosquitto provisioning
derive their decisions from this one module so the two broker modes cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class TopicAcl:
    """Topic templates, with a `{device}` placeholder, that bound what a device may touch.

    `device_roots` end with `/`: a device may publish to any topic starting with one of its rendered
    roots (the trailing slash makes `telemetra/A/` never match `telemetra/AB/...`). `downlink` lists the
    only topics a device may subscribe to; it may not publish to them (it must not be able to forge its
    own commands or overwrite its retained desired configuration).
    """

    device_roots: tuple[str, ...]
    downlink: tuple[str, ...]

    def __post_init__(self) -> None:
        # Checked once here so the per-message methods below can stay simple string comparisons.
        for root in self.device_roots:
            if root.count(DEVICE_PLACEHOLDER) != 1 or not root.endswith("/"):
                raise ValueError(f"device root {root!r} must contain {DEVICE_PLACEHOLDER} once, end with '/'")
            if _has_wildcard(root) or root.startswith("$"):
                raise ValueError(f"device root {root!r} must not contain wildcards or start with '$'")
        for topic in self.downlink:
            if topic.count(DEVICE_PLACEHOLDER) != 1:
                raise ValueError(f"downlink topic {topic!r} must contain {DEVICE_PLACEHOLDER} once")
            if _has_wildcard(topic) or topic.startswith("$"):
                raise ValueError(f"downlink topic {topic!r} must not contain wildcards or start with '$'")

    @classmethod
    def for_prefix(cls, prefix: str) -> TopicAcl:
        """The default scheme of SPEC §2 for one topic prefix (`telemetra`, `paku`, …)."""
        return cls(
            device_roots=(f"{prefix}/{DEVICE_PLACEHOLDER}/",),
            downlink=(f"{prefix}/{DEVICE_PLACEHOLDER}/cmd", f"{prefix}/{DEVICE_PLACEHOLDER}/config"),
        )

    def rendered_roots(self, device_id: str) -> tuple[str, ...]:
        return tuple(root.replace(DEVICE_PLACEHOLDER, device_id) for root in self.device_roots)

    def rendered_downlink(self, device_id: str) -> tuple[str, ...]:
        return tuple(topic.replace(DEVICE_PLACEHOLDER, device_id) for topic in self.downlink)

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
        return any(topic.startswith(root) for root in self.rendered_roots(device_id))

    def may_subscribe(self, p: MqttPrincipal, topic_filter: str) -> bool:
        if p.is_service:
            return True
        device_id = p.device_id
        if device_id is None or not is_valid_device_id(device_id):
            return False
        # Exact equality refuses wildcards and `$share/...` without special cases: no rendered
        # downlink topic contains either (checked in __post_init__ and is_valid_device_id).
        return topic_filter in self.rendered_downlink(device_id)
