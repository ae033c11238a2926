"""What goes down to a device, per scheme: the topics and payload shapes its preset declares (pure).

A command goes out once per enabled scheme that can carry it — on the scheme's downlink that lists the
command's name, or else on the one that takes any name — so a device hears it on the topic its firmware
subscribes to, in the shape it parses. A shape that cannot carry a command (a heat-pump command over its
127-byte budget, nested parameters where the firmware reads a flat object) skips that scheme; a command no
enabled scheme can carry is refused when it is created, naming the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from telemetra.domain.errors import InvalidInput
from telemetra.mqtt.routes import Downlink, Purpose, Shape

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


def render_command(downlink: Downlink, *, command_id: str, name: str, params: Any, created_ms: int) -> bytes:
    """The payload of one command in ``downlink``'s shape; ``InvalidInput`` when the shape cannot carry it."""
    if downlink.shape is Shape.ENVELOPE:
        payload = orjson.dumps({"id": command_id, "name": name, "params": params or {}, "ts": created_ms})
    elif downlink.shape is Shape.NAME_KEY:
        flat = dict(params or {})
        nested = [k for k, v in flat.items() if isinstance(v, Mapping | list)]
        if nested:
            raise InvalidInput(f"{downlink.pattern} takes flat parameters; {nested[0]!r} is nested", field="params")
        if downlink.name_key in flat:
            raise InvalidInput(f"{downlink.pattern} carries the name in {downlink.name_key!r}", field="params")
        # The name first: a firmware that reads a prefix of the payload finds it there.
        payload = orjson.dumps({downlink.name_key: name, **flat})
    elif downlink.shape is Shape.PARAMS:
        payload = orjson.dumps(params or {})
    else:
        raise ValueError(f"{downlink.pattern} is a configuration topic, not a command topic")
    if downlink.max_bytes is not None and len(payload) > downlink.max_bytes:
        raise InvalidInput(
            f"{downlink.pattern} reads {downlink.max_bytes} bytes of a command; this one is {len(payload)}",
            field="params",
        )
    return payload


def render_config(downlink: Downlink, config: Mapping[str, Any], version: int) -> bytes:
    if downlink.shape is Shape.VERSIONED:
        return orjson.dumps({**config, "version": version})
    if downlink.shape is Shape.PLAIN:
        return orjson.dumps(dict(config))
    raise ValueError(f"{downlink.pattern} is a command topic, not a configuration topic")


class DownlinkPlan:
    """The enabled schemes' downlinks, and what to publish for a command or a desired configuration."""

    def __init__(self, downlinks: Sequence[Downlink]) -> None:
        self._commands = [d for d in downlinks if d.purpose is Purpose.COMMAND]
        self._configs = [d for d in downlinks if d.purpose is Purpose.CONFIG]

    def command_topics(self, name: str) -> list[Downlink]:
        """Per scheme: the downlink listing ``name``, else the scheme's downlinks that take any name."""
        chosen: list[Downlink] = []
        for scheme in dict.fromkeys(d.scheme for d in self._commands):
            mine = [d for d in self._commands if d.scheme == scheme]
            listed = [d for d in mine if d.commands is not None and name in d.commands]
            chosen.extend(listed or [d for d in mine if d.commands is None])
        return chosen

    def check_command(self, name: str, params: Any) -> None:
        """Refuse a command no enabled scheme can carry (with the reason of the last one that could not)."""
        topics = self.command_topics(name)
        if not self._commands:
            return  # no MQTT: devices poll over HTTP, which carries anything
        problem: InvalidInput | None = None
        for downlink in topics:
            try:
                render_command(downlink, command_id="0" * 36, name=name, params=params, created_ms=0)
                return
            except InvalidInput as exc:
                problem = exc
        raise problem or InvalidInput(f"no enabled MQTT scheme sends a command named {name!r}", field="name")

    def command(self, device_id: str, *, command_id: str, name: str, params: Any, created_ms: int) -> list[Outgoing]:
        out: list[Outgoing] = []
        for downlink in self.command_topics(name):
            try:
                payload = render_command(
                    downlink, command_id=command_id, name=name, params=params, created_ms=created_ms
                )
            except InvalidInput as exc:
                log.debug("command %s not sent on %s: %s", command_id, downlink.pattern, exc.reason)
                continue
            out.append(Outgoing(downlink.topic(device_id), payload, downlink.qos, downlink.retain))
        return out

    def config(self, device_id: str, config: Mapping[str, Any], version: int) -> list[Outgoing]:
        return [Outgoing(d.topic(device_id), render_config(d, config, version), d.qos, d.retain) for d in self._configs]
