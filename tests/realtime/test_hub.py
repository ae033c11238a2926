"""The event hub on its own: bounded subscribers that lose their oldest events and are told how many,
filters by device and type, and resume from an id within the kept window."""

from __future__ import annotations

import asyncio

from telemetra.events import model
from telemetra.events.hub import ID_STRIDE, UNKNOWN, EventHub
from telemetra.events.model import ChangeEvent, Gap


def telemetry(device: str, n: int) -> ChangeEvent:
    return ChangeEvent(model.TELEMETRY, device, 1_790_000_000_000 + n, {"values": {"n": n}})


def drain(sub) -> list[ChangeEvent | Gap]:  # type: ignore[no-untyped-def]
    out = []
    while (item := sub.take_nowait()) is not None:
        out.append(item)
    return out


def test_a_full_subscriber_loses_its_oldest_events_and_is_told_how_many() -> None:
    hub = EventHub()
    slow = hub.subscribe(maxsize=10)
    fast = hub.subscribe(maxsize=1000)
    hub.publish(telemetry("a", n) for n in range(25))
    got = drain(slow)
    assert isinstance(got[0], Gap) and got[0].missed == 15
    assert [e.data["values"]["n"] for e in got[1:]] == list(range(15, 25))  # the newest ten, in order
    assert len(drain(fast)) == 25  # a slow neighbour costs the others nothing


def test_filters_by_device_and_type() -> None:
    hub = EventHub()
    mine = hub.subscribe(devices=["a"], types=[model.TELEMETRY])
    states = hub.subscribe(types=[model.STATE])
    hub.publish([telemetry("b", 1), telemetry("a", 2), ChangeEvent(model.STATE, "a", 1, {"online": True})])
    assert [(e.device_id, e.type) for e in drain(mine)] == [("a", model.TELEMETRY)]
    assert [(e.device_id, e.type) for e in drain(states)] == [("a", model.STATE)]
    assert hub.wants(model.STATE) and hub.wants(model.TELEMETRY) and not hub.wants(model.OTA)
    mine.close()
    states.close()
    assert hub.subscribers == 0
    assert hub.wants(model.TELEMETRY)  # still built for a while: a client that reconnects may resume
    assert not hub.wants(model.OTA)  # a type nobody ever asked for is not


def test_resume_within_the_window_replays_exactly_what_was_missed() -> None:
    hub = EventHub(history=100)
    hub.publish(telemetry("a", n) for n in range(10))
    seen = hub.last_id
    hub.publish(telemetry(d, n) for n in range(10, 13) for d in ("a", "b"))
    resumed = hub.subscribe(devices=["a"], since=seen)
    assert [e.data["values"]["n"] for e in drain(resumed)] == [10, 11, 12]


def test_resume_from_before_the_window_says_how_many_are_gone() -> None:
    hub = EventHub(history=5)
    everything = hub.subscribe(maxsize=100)
    hub.publish(telemetry("a", n) for n in range(20))
    first = drain(everything)[0].id
    got = drain(hub.subscribe(since=first))  # saw only the first event
    assert isinstance(got[0], Gap) and got[0].missed == 14  # 2nd … 15th are no longer kept
    assert len(got) == 6
    ancient = drain(hub.subscribe(since=1))  # an id from an earlier run of the server
    assert isinstance(ancient[0], Gap) and ancient[0].missed == UNKNOWN


async def test_a_waiting_subscriber_wakes_on_publish_and_ends_on_close() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    waiter = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    assert not waiter.done()  # positive control below: the same wait does end once something is published
    hub.publish([telemetry("a", 1)])
    assert (await asyncio.wait_for(waiter, 1)).device_id == "a"
    ending = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)
    sub.close()
    try:
        await asyncio.wait_for(ending, 1)
        raise AssertionError("a closed subscription must end")
    except StopAsyncIteration:
        pass


def test_an_id_another_process_issued_is_an_unknown_gap_not_a_replay_from_a_wrong_place() -> None:
    """Behind a load balancer a client's reconnect may reach another process: both saw the same events
    (the event bridge) but numbered them each their own way, so the other's id says nothing here."""
    here, there = EventHub(history=100, tag=1), EventHub(history=100, tag=2)
    for hub in (here, there):
        hub.publish(telemetry("a", n) for n in range(10))
    seen_there, seen_here = there.last_id, here.last_id
    for hub in (here, there):
        hub.publish(telemetry("a", n) for n in range(10, 13))
    got = drain(here.subscribe(since=seen_there))
    assert isinstance(got[0], Gap) and got[0].missed == UNKNOWN
    assert [e.data["values"]["n"] for e in got[1:]] == list(range(13))  # all it still keeps, after the gap
    # Positive control: the id this process issued resumes exactly, with no gap.
    assert [e.data["values"]["n"] for e in drain(here.subscribe(since=seen_here))] == [10, 11, 12]
    # An id of this process that it has not issued yet (a client that saw a later run? a forged one) is
    # not taken for "nothing missed" either.
    future = drain(here.subscribe(since=here.last_id + 1_000_000 * ID_STRIDE))
    assert isinstance(future[0], Gap) and future[0].missed == UNKNOWN


def test_before_any_event_the_last_id_resumes_without_a_gap() -> None:
    hub = EventHub()
    sub = hub.subscribe(since=hub.last_id)  # what a resubscribe asks for when nothing was seen yet
    hub.publish([telemetry("a", 1)])
    got = drain(sub)
    assert len(got) == 1 and not isinstance(got[0], Gap)
