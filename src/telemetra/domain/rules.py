"""Server-side rules, decided once. Pure.

A **threshold** rule watches one key (a **rate** rule the key's change per second between consecutive
readings, compared the same way; a **nodata** rule fires when the key has had no reading for ``for_s``
and clears at the next one): it *breaches* when ``value op threshold`` holds. It fires once it
has breached for ``for_s`` seconds without a reading in between that did not (``pending`` until then),
and clears when a reading *clears* it: ``value op clear_value`` no longer holds (hysteresis: a rule
``> 30`` with ``clear_value`` 25 fires above 30 and clears only at 25 or below). Without a clear value
the threshold itself clears it. Between the two (above 25, not above 30, while firing) nothing changes.

A rule watches every device unless it names ``devices`` (ids), or ``models`` (model names) and/or
``kinds`` (``device`` or ``gateway``); given both, a device must match both.

An **offline** rule says how long a device may stay silent (``for_s``) before it counts as offline; the
most specific one applies to a device (one naming the device, then its model — with its kind before
without —, then its kind, then every device; the shortest among equals), and without one the
``offline_after_s`` setting does (``domain.presence``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from telemetra.domain.errors import InvalidInput

THRESHOLD: Final = "threshold"
RATE: Final = "rate"  # a threshold on the key's change per second between consecutive readings
NODATA: Final = "nodata"  # no reading of the key for for_s seconds
OFFLINE: Final = "offline"
KINDS: Final = (THRESHOLD, RATE, NODATA, OFFLINE)
VALUED: Final = (THRESHOLD, RATE)  # the kinds that compare a value with op and value
SEVERITIES: Final = ("info", "warning", "critical")
DEVICE_KINDS: Final = ("device", "gateway")  # what a rule's ``kinds`` filter names (a device's ``kind``)
OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
PENDING: Final = "pending"
FIRING: Final = "firing"


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    name: str
    kind: str
    severity: str
    key: str | None = None
    op: str | None = None
    value: float | None = None
    for_s: int = 0
    clear_value: float | None = None
    devices: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    enabled: bool = True
    kinds: tuple[str, ...] | None = None

    def applies_to(self, device_id: str, model: str | None, kind: str | None = None) -> bool:
        if self.devices is not None:
            return device_id in self.devices
        if self.models is not None and (model is None or model not in self.models):
            return False
        return self.kinds is None or (kind is not None and kind in self.kinds)

    @property
    def needs_device(self) -> bool:
        """Whether deciding ``applies_to`` takes the device's model or kind (not its id alone)."""
        return self.devices is None and (self.models is not None or self.kinds is not None)

    def breaches(self, value: float) -> bool:
        assert self.op is not None and self.value is not None
        return OPS[self.op](value, self.value)

    def clears(self, value: float) -> bool:
        assert self.op is not None and self.value is not None
        limit = self.clear_value if self.clear_value is not None else self.value
        return not OPS[self.op](value, limit)


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a rule stands for one device (absent: nothing going on)."""

    status: str  # PENDING or FIRING
    since: int  # epoch ms: first breaching reading of this run
    value: float | None


# What a step asks to happen: "raise" (the alert), "clear", or None.
Step = tuple[Standing | None, str | None]


def step(rule: Rule, standing: Standing | None, value: float, ts: int) -> Step:
    """A reading of the rule's key: the new standing, and the alert action it calls for."""
    if standing is not None and standing.status == FIRING:
        if rule.clears(value):
            return None, "clear"
        return standing, None
    if not rule.breaches(value):
        return None, None
    since = standing.since if standing is not None else ts
    if ts - since >= rule.for_s * 1000:
        return Standing(FIRING, since, value), "raise"
    return Standing(PENDING, since, value), None


def rate_per_s(previous: tuple[int, float] | None, ts: int, value: float) -> float | None:
    """The change per second since the previous reading (None: no previous one, or the same instant)."""
    if previous is None or ts <= previous[0]:
        return None
    return (value - previous[1]) * 1000 / (ts - previous[0])


def held_long_enough(rule: Rule, standing: Standing, now: int) -> bool:
    """A pending breach whose hold has passed with no reading since: the last reading still stands."""
    return standing.status == PENDING and now - standing.since >= rule.for_s * 1000


def offline_after_s(
    device_id: str, model: str | None, rules: Sequence[Rule], default_s: int, kind: str | None = None
) -> int:
    rule = offline_rule_for(device_id, model, rules, kind)
    return default_s if rule is None else rule.for_s


def offline_rule_for(device_id: str, model: str | None, rules: Sequence[Rule], kind: str | None = None) -> Rule | None:
    """The offline rule that decides ``device_id``'s interval (None: the setting's default)."""
    chosen: Rule | None = None
    best: tuple[int, int, int, int] | None = None
    for rule in rules:
        if rule.kind != OFFLINE or not rule.enabled or not rule.applies_to(device_id, model, kind):
            continue
        candidate = (rule.devices is not None, rule.models is not None, rule.kinds is not None, -rule.for_s)
        if best is None or candidate > best:
            best, chosen = candidate, rule
    return chosen


MAX_FOR_S: Final = 30 * 86_400


def check_rule(values: dict[str, object]) -> None:
    """What a rule needs beyond each field's own bounds; ``InvalidInput`` naming the field otherwise."""
    kind = values.get("kind") or THRESHOLD
    if values.get("devices") is not None and values.get("models") is not None:
        raise InvalidInput("give devices or models, not both", field="models")
    if values.get("devices") is not None and values.get("kinds") is not None:
        raise InvalidInput("give devices or kinds, not both: devices names the devices", field="kinds")
    if kind in VALUED:
        for name in ("key", "op", "value"):
            if values.get(name) is None:
                raise InvalidInput(f"a {kind} rule needs {name}", field=name)
    elif kind == NODATA:
        if values.get("key") is None:
            raise InvalidInput("a nodata rule needs key", field="key")
        for_s = values.get("for_s")
        if not isinstance(for_s, int) or for_s < 1:
            raise InvalidInput("a nodata rule needs for_s: the seconds without a reading", field="for_s")
    elif kind == OFFLINE:
        for_s = values.get("for_s")
        if not isinstance(for_s, int) or for_s < 1:
            raise InvalidInput(
                "an offline rule needs for_s: the seconds of silence after which a device is offline", field="for_s"
            )
