"""The rule decisions themselves (domain.rules): hold, hysteresis, the offline interval that applies."""

from __future__ import annotations

import pytest

from telemetra.domain.errors import InvalidInput
from telemetra.domain.rules import FIRING, OFFLINE, PENDING, THRESHOLD, Rule, check_rule, offline_after_s, step

HOT = Rule(id=1, name="hot", kind=THRESHOLD, severity="critical", key="t", op=">", value=30, for_s=10, clear_value=25)


def run(rule: Rule, readings: list[tuple[int, float]]) -> list[str | None]:
    standing, actions = None, []
    for ts, value in readings:
        standing, action = step(rule, standing, value, ts)
        actions.append(action)
    return actions


def test_a_breach_fires_only_once_held_for_its_duration() -> None:
    assert run(HOT, [(0, 31), (5_000, 35), (9_999, 32), (10_000, 31), (11_000, 40)]) == [
        None,
        None,
        None,
        "raise",
        None,
    ]


def test_a_reading_within_limits_restarts_the_hold() -> None:
    assert run(HOT, [(0, 31), (6_000, 29), (7_000, 31), (16_000, 31), (17_000, 31)]) == [
        None,
        None,
        None,
        None,
        "raise",
    ]


def test_hysteresis_clears_only_at_the_clear_value() -> None:
    rule = Rule(id=1, name="hot", kind=THRESHOLD, severity="info", key="t", op=">", value=30, clear_value=25)
    assert run(rule, [(0, 31), (1, 28), (2, 26), (3, 25), (4, 31)]) == ["raise", None, None, "clear", "raise"]
    without = Rule(id=2, name="hot", kind=THRESHOLD, severity="info", key="t", op=">=", value=30)
    assert run(without, [(0, 30), (1, 29.9)]) == ["raise", "clear"]


@pytest.mark.parametrize(("op", "value", "breach"), [("<", 1, 0), ("<=", 1, 1), ("==", 1, 1), ("!=", 1, 2)])
def test_every_operator(op: str, value: float, breach: float) -> None:
    rule = Rule(id=1, name="r", kind=THRESHOLD, severity="info", key="k", op=op, value=value)
    standing, action = step(rule, None, breach, 0)
    assert (standing.status if standing else None, action) == (FIRING, "raise")
    assert (
        step(
            Rule(id=1, name="r", kind=THRESHOLD, severity="info", key="k", op=op, value=value, for_s=5), None, breach, 0
        )[0].status
        == PENDING
    )  # type: ignore[union-attr]


def test_the_most_specific_offline_rule_sets_the_interval() -> None:
    rules = [
        Rule(id=1, name="all", kind=OFFLINE, severity="info", for_s=600),
        Rule(id=2, name="sensors", kind=OFFLINE, severity="info", for_s=300, models=("sensor",)),
        Rule(id=3, name="sensors fast", kind=OFFLINE, severity="info", for_s=60, models=("sensor",)),
        Rule(id=4, name="that one", kind=OFFLINE, severity="info", for_s=3600, devices=("d1",)),
    ]
    assert offline_after_s("d1", "sensor", rules, 120) == 3600
    assert offline_after_s("d2", "sensor", rules, 120) == 60
    assert offline_after_s("d3", "pump", rules, 120) == 600
    assert offline_after_s("d3", "pump", [], 120) == 120


def test_a_kinds_filter_narrows_a_rule_and_ranks_below_a_model() -> None:
    gateways = Rule(id=1, name="gw", kind=OFFLINE, severity="info", for_s=30, kinds=("gateway",))
    assert gateways.applies_to("g1", None, "gateway") and not gateways.applies_to("d1", None, "device")
    assert not gateways.applies_to("g1", None, None)  # an unknown device's kind is no gateway
    both = Rule(id=2, name="hub gw", kind=OFFLINE, severity="info", for_s=900, models=("hub",), kinds=("gateway",))
    assert both.applies_to("g1", "hub", "gateway")
    assert not both.applies_to("g2", "other", "gateway") and not both.applies_to("d1", "hub", "device")
    hubs = Rule(id=3, name="hubs", kind=OFFLINE, severity="info", for_s=600, models=("hub",))
    rules = [gateways, both, hubs]
    assert offline_after_s("g1", "hub", rules, 120, "gateway") == 900  # model and kind: the most specific
    assert offline_after_s("d1", "hub", rules, 120, "device") == 600  # model only
    assert offline_after_s("g2", "other", rules, 120, "gateway") == 30  # kind only
    assert offline_after_s("d2", "other", rules, 120, "device") == 120


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"kind": "threshold", "op": ">", "value": 1}, "key"),
        ({"kind": "threshold", "key": "t", "value": 1}, "op"),
        ({"kind": "threshold", "key": "t", "op": ">"}, "value"),
        ({"kind": "threshold", "key": "t", "op": ">", "value": 1, "devices": ["a"], "models": ["m"]}, "models"),
        ({"kind": "offline", "for_s": 0}, "for_s"),
        ({"kind": "offline", "for_s": 5, "devices": ["a"], "kinds": ["gateway"]}, "kinds"),
    ],
)
def test_incomplete_rules_are_refused_naming_the_field(values: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        check_rule(values)
    assert refused.value.field == field
