"""Route tables and presets (pure): what each preset routes, where its devices may publish and subscribe,
what the collector subscribes to, which route sets are refused, and what goes down in which shape."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telemetra.domain.errors import InvalidInput
from telemetra.mqtt.acl import MqttPrincipal, TopicAcl
from telemetra.mqtt.presets import build_table
from telemetra.mqtt.routes import Kind, Route
from telemetra.mqtt.shapes import DownlinkPlan

ALL = build_table("telemetra", ["default", "heatpump", "paku-iot"])


def kind_of(topic: str, table=ALL) -> tuple[Kind, str, str | None] | None:  # type: ignore[no-untyped-def]
    found = table.match(topic)
    return None if found is None else (found.kind, found.device_id, found.name)


def test_default_preset_is_spec_section_2() -> None:
    table = build_table("telemetra", ["default"])
    assert table.publish_filters == ("telemetra/{device}/#",)
    assert table.downlink == ("telemetra/{device}/cmd", "telemetra/{device}/config")
    assert table.subscriptions == ["telemetra/+/#"]
    assert kind_of("telemetra/d1/event/ack", table) == (Kind.ACK, "d1", None)
    assert kind_of("telemetra/d1/event/boot", table) == (Kind.EVENT, "d1", "boot")
    assert kind_of("telemetra/d1/cmd", table) == (Kind.DOWNLINK, "d1", None)  # our own, seen again


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("heatpump/site1/data", (Kind.TELEMETRY, "site1", None)),
        ("heatpump/site1/status/online", (Kind.STATE, "site1", "online")),
        ("heatpump/site1/alerts", (Kind.ALERT, "site1", None)),
        ("heatpump/site1/commands", (Kind.DOWNLINK, "site1", None)),
        ("paku/heater/emu01/state", (Kind.STATE, "emu01", None)),
        ("paku/heater/emu01/data", (Kind.TELEMETRY, "emu01", None)),
        ("paku/heater/emu01/cmd", (Kind.DOWNLINK, "emu01", None)),
        ("paku/sensors/ruuvi_cabin/data", (Kind.TELEMETRY, "ruuvi_cabin", None)),
        ("paku/ruuvi/van_inside", (Kind.TELEMETRY, "van_inside", None)),
        ("paku/edge/ESP32-AB12CD34/status", (Kind.STATE, "ESP32-AB12CD34", None)),
        ("paku/edge/ESP32-AB12CD34/config/report", (Kind.CONFIG, "ESP32-AB12CD34", None)),
        ("paku/edge/ESP32-AB12CD34/config", (Kind.CONFIG, "ESP32-AB12CD34", None)),
        ("paku/edge/ESP32-AB12CD34/telemetry", (Kind.TELEMETRY, "ESP32-AB12CD34", None)),
        ("paku/edge/ESP32-AB12CD34/ota/progress", (Kind.EVENT, "ESP32-AB12CD34", "ota/progress")),
        ("paku/edge/ESP32-AB12CD34/config/set", (Kind.DOWNLINK, "ESP32-AB12CD34", None)),
        ("paku/edge/ESP32-AB12CD34/cmd/ota", (Kind.DOWNLINK, "ESP32-AB12CD34", None)),
        ("paku/heater/emu01/whatever", None),  # under emu01's topics, but no route takes it
        ("paku/emu01/telemetry", None),  # the seed-004 scheme is the "paku" preset, not this one
    ],
)
def test_heatpump_and_paku_iot_topics(topic: str, expected: tuple[Kind, str, str | None] | None) -> None:
    assert kind_of(topic) == expected


def test_collector_subscribes_to_everything_devices_may_publish_once() -> None:
    assert ALL.subscriptions == ["telemetra/+/#", "heatpump/+/#", "paku/+/+/#"]
    assert ALL.owner("paku/heater/emu01/whatever") == "emu01"
    assert ALL.owner("paku/ruuvi/van_inside") == "van_inside"
    assert ALL.owner("elsewhere/x/y") is None


def test_downlink_of_every_enabled_preset_is_the_subscribe_acl() -> None:
    assert ALL.downlink == (
        "telemetra/{device}/cmd",
        "telemetra/{device}/config",
        "heatpump/{device}/commands",
        "paku/heater/{device}/cmd",
        "paku/edge/{device}/cmd/ota",
        "paku/edge/{device}/config/set",
    )


@pytest.mark.parametrize(
    ("presets", "extra"),
    [
        (["paku", "paku-iot"], []),  # paku/{device}/… and paku/{system}/{device}/… overlap
        (["default"], ["{site}/{system}/{device}/data=telemetry"]),  # +/+/{device} covers telemetra/{device}/…
        (["paku-iot"], ["paku/{device}/up=telemetry"]),
    ],
)
def test_route_sets_that_let_a_device_publish_as_another_are_refused(presets: list[str], extra: list[str]) -> None:
    with pytest.raises(ValueError, match="one device could publish as another"):
        build_table("telemetra", presets, extra)


def test_wildcard_routes_are_fine_on_their_own() -> None:
    table = build_table(
        "telemetra", [], ["{site}/{system}/{device}/data=telemetry", "{site}/{system}/{device}/up=state"]
    )
    assert kind_of("van/sensors/d1/data", table) == (Kind.TELEMETRY, "d1", None)
    assert kind_of("van/sensors/d1/up", table) == (Kind.STATE, "d1", None)
    assert table.subscriptions == ["+/+/+/#"]


@pytest.mark.parametrize(
    "pattern",
    ["a/x{device}", "a/{device}/{path}/b", "a/+/{device}", "a/{device}/{device}", "a/b", "a/{Device}/x"],
)
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError):
        Route(pattern, Kind.TELEMETRY)


# A property over the whole table: whatever topic a device's ACL lets it publish, no route hands to another.
levels = st.sampled_from(["paku", "heater", "edge", "ruuvi", "heatpump", "telemetra", "data", "state", "x", "ota"])
ids = st.sampled_from(["A", "B", "emu01", "data", "heater"])


@settings(max_examples=400, deadline=None, database=None)
@given(device=ids, topic=st.lists(st.one_of(levels, ids), min_size=1, max_size=6).map("/".join))
def test_no_topic_a_device_may_publish_is_routed_to_another_device(device: str, topic: str) -> None:
    acl = TopicAcl(device_roots=ALL.publish_filters, downlink=ALL.downlink)
    if not acl.may_publish(MqttPrincipal(device, device), topic):
        return
    found = ALL.match(topic)
    assert found is None or found.device_id == device, (device, topic, found)


# -- downlink shapes ------------------------------------------------------------------------------------


def outgoing(plan: DownlinkPlan, name: str, params: object) -> dict[str, object]:
    return {
        o.topic: orjson.loads(o.payload)
        for o in plan.command("d1", command_id="c" * 36, name=name, params=params, created_ms=1)
    }


def test_each_scheme_gets_the_command_in_its_own_shape() -> None:
    plan = DownlinkPlan(ALL.downlinks)
    assert outgoing(plan, "start", {"power": 5}) == {
        "telemetra/d1/cmd": {"id": "c" * 36, "name": "start", "params": {"power": 5}, "ts": 1},
        "heatpump/d1/commands": {"command": "start", "power": 5},
        "paku/heater/d1/cmd": {"cmd": "start", "power": 5},
    }
    ota = {"url": "http://ota/api/firmware/download/1.2.0", "version": "1.2.0", "checksum": "ab" * 32}
    sent = outgoing(plan, "ota", ota)
    assert sent["paku/edge/d1/cmd/ota"] == ota  # paku's workflow shape, on its topic; not on the heater's
    assert "paku/heater/d1/cmd" not in sent
    # The heat pump's 127-byte budget: this one cannot go there, but goes to the other schemes.
    assert "heatpump/d1/commands" not in sent
    heatpump = [o for o in plan.command("d1", command_id="x", name="start", params={}, created_ms=1)]
    assert next(o for o in heatpump if o.topic == "heatpump/d1/commands").payload.startswith(b'{"command":"start"')


def test_a_command_no_scheme_can_carry_is_refused() -> None:
    plan = DownlinkPlan(build_table("telemetra", ["heatpump"]).downlinks)
    plan.check_command("reboot", {"delay_s": 5})
    with pytest.raises(InvalidInput, match="127 bytes"):
        plan.check_command("set", {"note": "x" * 120})
    with pytest.raises(InvalidInput, match="flat"):
        plan.check_command("set", {"curve": {"a": 1}})
    DownlinkPlan([]).check_command("set", {"curve": {"a": 1}})  # no MQTT: HTTP polls carry anything


def test_configuration_shapes() -> None:
    plan = DownlinkPlan(ALL.downlinks)
    sent = {o.topic: (orjson.loads(o.payload), o.retain, o.qos) for o in plan.config("d1", {"timing": {"x": 1}}, 3)}
    assert sent == {
        "telemetra/d1/config": ({"timing": {"x": 1}, "version": 3}, True, 1),
        "paku/edge/d1/config/set": ({"timing": {"x": 1}}, True, 1),  # paku's device reads it on connect
    }
