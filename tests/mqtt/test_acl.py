"""The topic ACL: explicit cases from SPEC §2 plus properties over arbitrary ids and topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telemetra.mqtt.acl import MqttPrincipal, TopicAcl, is_valid_device_id

ACL = TopicAcl(
    device_roots=("telemetra/{device}/", "heatpump/{device}/"),
    downlink=("telemetra/{device}/cmd", "telemetra/{device}/config"),
)
SERVICE = MqttPrincipal("telemetra-service", None, is_service=True)


def device(device_id: str) -> MqttPrincipal:
    return MqttPrincipal(f"user-{device_id}", device_id)


A = device("A")

# Ids that are valid topic levels: no wildcard, no separator, not empty.
valid_ids = st.text(st.characters(codec="utf-8", exclude_characters="+#/\x00"), min_size=1)
topic_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"))


@pytest.mark.parametrize(
    "topic",
    [
        "telemetra/A/telemetry",
        "telemetra/A/state",
        "telemetra/A/event/ack",
        "heatpump/A/status/mode",
        "telemetra/A/cmd/extra",
        "telemetra/A",  # MQTT's "telemetra/A/#" takes the level itself too (and so does Mosquitto's ACL)
    ],
)
def test_device_may_publish_under_its_own_roots(topic: str) -> None:
    assert ACL.may_publish(A, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "telemetra/B/telemetry",  # another device
        "telemetra/AB/telemetry",  # prefix of another id: roots match whole levels only
        "telemetra/A/cmd",  # own downlink: a device must not forge its commands
        "telemetra/A/config",
        "other/A/telemetry",
        "$SYS/broker",
        "$share/g/telemetra/A/telemetry",
        "telemetra/A/+",
        "telemetra/A/#",
    ],
)
def test_device_may_not_publish_elsewhere(topic: str) -> None:
    assert not ACL.may_publish(A, topic)


@pytest.mark.parametrize("topic_filter", ["telemetra/A/cmd", "telemetra/A/config"])
def test_device_may_subscribe_to_its_own_downlink(topic_filter: str) -> None:
    assert ACL.may_subscribe(A, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "telemetra/B/cmd",
        "telemetra/+/cmd",
        "telemetra/#",
        "#",
        "telemetra/A/#",
        "telemetra/A/+",
        "$share/g/telemetra/A/cmd",
        "telemetra/A/telemetry",  # may publish there, not subscribe
        "telemetra/AB/cmd",
    ],
)
def test_device_may_not_subscribe_elsewhere(topic_filter: str) -> None:
    assert not ACL.may_subscribe(A, topic_filter)


@pytest.mark.parametrize("bad_id", ["+", "#", "A/B", "", "a+b", "x#"])
def test_ids_that_would_change_topic_structure_match_nothing(bad_id: str) -> None:
    principal = device(bad_id)
    rendered = f"telemetra/{bad_id}/telemetry"
    assert not is_valid_device_id(bad_id)
    assert not ACL.may_publish(principal, rendered)
    assert not ACL.may_subscribe(principal, f"telemetra/{bad_id}/cmd")


def test_device_principal_without_device_id_may_do_nothing() -> None:
    nobody = MqttPrincipal("orphan", None)
    assert not ACL.may_publish(nobody, "telemetra/None/telemetry")
    assert not ACL.may_subscribe(nobody, "telemetra/None/cmd")


def test_for_prefix_builds_the_default_scheme() -> None:
    acl = TopicAcl.for_prefix("paku")
    assert acl.may_publish(device("d1"), "paku/d1/telemetry")
    assert acl.may_subscribe(device("d1"), "paku/d1/config")
    assert not acl.may_publish(device("d1"), "paku/d1/cmd")


@pytest.mark.parametrize(
    ("roots", "downlink"),
    [
        (("telemetra/{device}",), ()),  # no trailing slash
        (("telemetra/",), ()),  # no placeholder
        (("telemetra/{device}/{device}/",), ()),
        (("telemetra/{device}/x/#",), ()),  # a filter ends at the device: "<levels>/{device}/#"
        (("telemetra/#/{device}/#",), ()),
        (("telemetra/{system}/{device}/#",), ()),  # route placeholders become "+" before they get here
        (("$SYS/{device}/",), ()),
        ((), ("telemetra/cmd",)),
        ((), ("telemetra/{device}/#",)),
    ],
)
def test_malformed_templates_are_rejected(roots: tuple[str, ...], downlink: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        TopicAcl(device_roots=roots, downlink=downlink)


@given(topic=topic_text)
def test_service_may_do_everything(topic: str) -> None:
    assert ACL.may_publish(SERVICE, topic)
    assert ACL.may_subscribe(SERVICE, topic)


@given(a=valid_ids, b=valid_ids, suffix=topic_text)
def test_a_device_never_publishes_as_another(a: str, b: str, suffix: str) -> None:
    if a == b:
        return
    for root in ("telemetra", "heatpump"):
        assert not ACL.may_publish(device(a), f"{root}/{b}/{suffix}")


@given(device_id=valid_ids, suffix=topic_text)
def test_publish_under_own_root_is_allowed_unless_downlink_or_wildcard(device_id: str, suffix: str) -> None:
    topic = f"telemetra/{device_id}/{suffix}"
    expected = suffix not in ("cmd", "config") and "+" not in topic and "#" not in topic
    assert ACL.may_publish(device(device_id), topic) is expected


@given(device_id=valid_ids, topic_filter=topic_text)
def test_a_device_subscribes_only_to_exactly_its_downlink(device_id: str, topic_filter: str) -> None:
    allowed = ACL.may_subscribe(device(device_id), topic_filter)
    assert allowed is (topic_filter in (f"telemetra/{device_id}/cmd", f"telemetra/{device_id}/config"))
    if "+" in topic_filter or "#" in topic_filter or topic_filter.startswith("$"):
        assert not allowed


@given(device_id=valid_ids, topic=topic_text)
def test_devices_never_touch_dollar_topics(device_id: str, topic: str) -> None:
    assert not ACL.may_publish(device(device_id), "$" + topic)
    assert not ACL.may_subscribe(device(device_id), "$" + topic)


invalid_ids = st.builds(lambda head, bad, tail: head + bad + tail, st.text(), st.sampled_from("+#/"), st.text())


@given(device_id=invalid_ids, topic=topic_text)
def test_invalid_ids_match_nothing(device_id: str, topic: str) -> None:
    assert not ACL.may_publish(device(device_id), topic)
    assert not ACL.may_subscribe(device(device_id), topic)


@given(device_id=valid_ids, extra=valid_ids, suffix=topic_text)
def test_an_id_never_covers_longer_ids_it_prefixes(device_id: str, extra: str, suffix: str) -> None:
    assert not ACL.may_publish(device(device_id), f"telemetra/{device_id}{extra}/{suffix}")


# The paku-iot preset's templates, as the route table derives them (tests/mqtt/test_routes.py).
PAKU_IOT = TopicAcl(
    device_roots=("paku/heater/{device}/#", "paku/edge/{device}/#", "paku/+/{device}/#", "paku/ruuvi/{device}/#"),
    downlink=("paku/heater/{device}/cmd", "paku/edge/{device}/cmd/ota", "paku/edge/{device}/config/set"),
)


@pytest.mark.parametrize(
    ("topic", "allowed"),
    [
        ("paku/sensors/A/data", True),  # "+" stands for paku's {system}
        ("paku/heater/A/state", True),
        ("paku/ruuvi/A", True),  # a route whose last level is {device}
        ("paku/edge/A/ota/result", True),
        ("paku/sensors/B/data", False),
        ("paku/A/data", False),  # the device is the third level here
        ("paku/heater/A/cmd", False),  # its own downlink
        ("paku/edge/A/config/set", False),
        ("paku/edge/A/cmd/ota", False),
    ],
)
def test_wildcard_levels_and_device_last_routes(topic: str, allowed: bool) -> None:
    assert PAKU_IOT.may_publish(A, topic) is allowed


def test_rendered_templates_are_what_mosquitto_is_given() -> None:
    assert PAKU_IOT.rendered_publish("A")[2] == "paku/+/A/#"
    assert PAKU_IOT.rendered_downlink("A") == ("paku/heater/A/cmd", "paku/edge/A/cmd/ota", "paku/edge/A/config/set")
    assert all(PAKU_IOT.may_subscribe(A, t) for t in PAKU_IOT.rendered_downlink("A"))
    assert not PAKU_IOT.may_subscribe(A, "paku/+/A/#")
