"""Reads (SPEC §5): history with cursors, keys and time ranges, aggregates checked against Python's own
arithmetic on the posted points, latest, stats, CSV export and seed 003's reading aliases — on SQLite and
PostgreSQL. The tests share one app per backend and each works on a device of its own."""

from __future__ import annotations

import csv
import io
import random
from datetime import UTC, datetime
from typing import Any

import pytest

from telemetra.domain.timeutil import ms_to_iso, now_ms
from tests.api.shared_app import lenient_client, shared_app_fixture, unique
from tests.conftest import ADMIN, Running

shared = shared_app_fixture()
pytestmark = pytest.mark.asyncio(loop_scope="module")

HOUR = 3_600_000


async def new_device(api: Running, prefix: str = "q") -> tuple[str, dict[str, str]]:
    device_id = unique(prefix)
    key = await api.create_device(device_id)
    return device_id, {"X-API-Key": key}


async def post_batch(api: Running, headers: dict[str, str], messages: list[dict[str, Any]]) -> None:
    for i in range(0, len(messages), 500):
        r = await api.client.post("/api/v1/ingest/batch", json=messages[i : i + 500], headers=headers)
        assert r.status_code == 201, r.text


async def get_json(api: Running, path: str, status: int = 200) -> Any:
    r = await api.client.get(path, headers=ADMIN)
    assert r.status_code == status, r.text
    return r.json()


def iso_to_ms(text: str) -> int:
    assert text.endswith("Z") and len(text) == 24, text  # YYYY-MM-DDTHH:MM:SS.mmmZ
    return int(datetime.fromisoformat(text).timestamp() * 1000 + 0.5)


# ---------------------------------------------------------------------------------------------- history


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_history_pages_cover_every_point_exactly_once(shared: Running, order: str) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - 2 * HOUR
    # Three keys share each timestamp, so page boundaries fall between keys of one instant too.
    messages = [{"ts": base + i * 1000, "a": i, "b": -i, "c": i / 2} for i in range(40)]
    await post_batch(shared, headers, messages)
    posted = {(k, base + i * 1000) for i in range(40) for k in "abc"}

    seen: list[tuple[str, int]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"start={base}&end={base + 40_000}&limit=7&order={order}" + (f"&cursor={cursor}" if cursor else "")
        page = await get_json(shared, f"/api/v1/devices/{device_id}/telemetry?{query}")
        pages += 1
        points = sorted(
            ((k, iso_to_ms(p["ts"])) for k, ps in page["series"].items() for p in ps),
            key=lambda kt: (kt[1], kt[0]),
            reverse=order == "desc",
        )
        assert 0 < len(points) <= 7
        seen.extend(points)
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 30, "the cursor does not advance"
    assert len(seen) == len(posted) == 120
    assert set(seen) == posted  # every point, none twice (len equal)
    ordered = sorted(seen, key=lambda kt: (kt[1], kt[0]), reverse=order == "desc")
    assert seen == ordered, "pages are not in order across page boundaries"
    assert pages == 18  # ceil(120 / 7): no empty last page


async def test_history_keys_filter_order_and_values(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - HOUR
    await post_batch(
        shared,
        headers,
        [{"ts": base + i * 1000, "t": 20 + i, "h": 50 - i, "on": i % 2 == 0, "mode": f"m{i}"} for i in range(5)],
    )
    page = await get_json(shared, f"/api/v1/devices/{device_id}/telemetry?keys=t,on&start={base}")
    assert set(page["series"]) == {"t", "on"}
    assert [p["value"] for p in page["series"]["t"]] == [20.0, 21.0, 22.0, 23.0, 24.0]
    assert [p["value"] for p in page["series"]["on"]] == [True, False, True, False, True]
    assert page["series"]["t"][0]["ts"] == ms_to_iso(base)
    desc = await get_json(shared, f"/api/v1/devices/{device_id}/history?keys=mode&order=desc&start={base}")
    assert [p["value"] for p in desc["series"]["mode"]] == ["m4", "m3", "m2", "m1", "m0"]
    assert desc["next_cursor"] is None
    # A key with spaces around the comma, and a key the device never sent.
    page = await get_json(shared, f"/api/v1/devices/{device_id}/telemetry?keys=%20h%20,nope&start={base}")
    assert set(page["series"]) == {"h"}


async def test_time_range_by_iso_epoch_and_range(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    now = now_ms()
    recent, old = now - 2 * HOUR, now - 30 * HOUR
    await post_batch(shared, headers, [{"ts": recent, "x": 1}, {"ts": old, "x": 2}])

    def xs(page: dict[str, Any]) -> list[float]:
        return [p["value"] for p in page["series"].get("x", [])]

    path = f"/api/v1/devices/{device_id}/history"
    assert xs(await get_json(shared, path)) == [1.0]  # default: the last 24 hours
    assert xs(await get_json(shared, f"{path}?range=24h")) == [1.0]
    assert xs(await get_json(shared, f"{path}?range=2d")) == [2.0, 1.0]
    assert xs(await get_json(shared, f"{path}?range=1h")) == []
    window = (old - 1000, recent + 1000)
    for start, end in (
        (ms_to_iso(window[0]), ms_to_iso(window[1])),  # ISO with Z
        (str(window[0]), str(window[1])),  # epoch ms
        (str(window[0] // 1000), str(window[1] // 1000 + 1)),  # epoch s
        (
            datetime.fromtimestamp(window[0] / 1000, UTC).isoformat(),  # ISO with +00:00 (URL-encoded below)
            datetime.fromtimestamp(window[1] / 1000, UTC).isoformat(),
        ),
    ):
        page = await shared.client.get(path, params={"start": start, "end": end}, headers=ADMIN)
        assert page.status_code == 200, page.text
        assert xs(page.json()) == [2.0, 1.0], (start, end)
    # End is exclusive, start inclusive.
    assert xs(await get_json(shared, f"{path}?start={old}&end={recent}")) == [2.0]
    # range counts back from end.
    assert xs(await get_json(shared, f"{path}?end={old + 1}&range=1h")) == [2.0]


@pytest.mark.parametrize(
    ("endpoint", "query", "field"),
    [
        ("telemetry", "start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z", "start"),
        ("telemetry", "start=yesterday", "start"),
        ("telemetry", "end=soon", "end"),
        ("telemetry", "start=-5", "start"),
        ("telemetry", "range=forever", "range"),
        ("telemetry", "range=0h", "range"),
        ("telemetry", "cursor=not-a-cursor", "cursor"),
        ("telemetry", "cursor=%25%25%25", "cursor"),
        ("telemetry", "order=sideways", "order"),
        ("telemetry", "limit=0", "limit"),
        ("telemetry", "limit=10001", "limit"),
        ("aggregate", "interval=1s&range=7d", "interval"),  # 604800 buckets
        ("aggregate", "interval=500ms", "interval"),
        ("aggregate", "interval=often", "interval"),
        ("aggregate", "fn=median", "fn"),
        ("aggregate", "fn=min,p99", "fn"),
        ("aggregate", "start=2026-01-02&end=2026-01-01", "start"),
        ("stats", "range=nonsense", "range"),
        ("telemetry/export", "start=garbage", "start"),
        ("state/history", "range=x", "range"),
        ("events", "end=never", "end"),
    ],
)
async def test_bad_query_parameters_are_422_naming_the_field(
    shared: Running, endpoint: str, query: str, field: str
) -> None:
    device_id, _ = await new_device(shared)
    r = await shared.client.get(f"/api/v1/devices/{device_id}/{endpoint}?{query}", headers=ADMIN)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == field, body
    assert body["detail"]


@pytest.mark.parametrize(
    ("endpoint", "query", "field"),
    [
        ("aggregate", "interval=inf", "interval"),
        ("telemetry", "start=inf", "start"),
        ("telemetry", "end=1e400", "end"),
        ("telemetry", "range=99999999999999999999d", "range"),
        ("stats", "range=99999999999999999999d", "range"),
    ],
)
async def test_overflowing_query_parameters_are_422(shared: Running, endpoint: str, query: str, field: str) -> None:
    device_id, headers = await new_device(shared)
    await post_batch(shared, headers, [{"x": 1}])
    async with lenient_client(shared) as client:
        r = await client.get(f"/api/v1/devices/{device_id}/{endpoint}?{query}", headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


# ---------------------------------------------------------------------------------------------- aggregates


def expected_buckets(points: list[tuple[int, float]], start: int, end: int, interval: int | None) -> list[dict]:
    """The aggregate, computed the obvious way: buckets aligned to multiples of ``interval`` since the epoch."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for ts, value in points:
        if start <= ts < end:
            bucket = ts - ts % interval if interval else start
            groups.setdefault(bucket, []).append((ts, value))
    out = []
    for bucket in sorted(groups):
        values = [v for _, v in groups[bucket]]
        out.append(
            {
                "start": ms_to_iso(bucket),
                "min": min(values),
                "max": max(values),
                "avg": sum(values) / len(values),
                "sum": sum(values),
                "count": len(values),
                "last": max(groups[bucket])[1],
            }
        )
    return out


def assert_buckets_equal(actual: list[dict], expected: list[dict]) -> None:
    assert [b["start"] for b in actual] == [b["start"] for b in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got["count"] == want["count"], got
        assert got["min"] == want["min"] and got["max"] == want["max"] and got["last"] == want["last"], got
        assert got["avg"] == pytest.approx(want["avg"], rel=1e-9), got
        assert got["sum"] == pytest.approx(want["sum"], rel=1e-9), got


async def test_aggregate_buckets_match_python(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    rng = random.Random(20261123)
    h0 = (now_ms() - 6 * HOUR) // HOUR * HOUR
    # 4 hours of readings at irregular times, one hour left empty, two keys with different timestamps.
    points: dict[str, list[tuple[int, float]]] = {"temp": [], "volt": []}
    for key in points:
        for hour in (0, 1, 3, 4):
            for _ in range(rng.randint(3, 12)):
                ts = h0 + hour * HOUR + rng.randrange(HOUR)
                points[key].append((ts, round(rng.uniform(-40, 90), 3)))
        points[key] = sorted(dict(points[key]).items())  # one value per timestamp
    messages = [{"ts": ts, key: value} for key, series in points.items() for ts, value in series]
    rng.shuffle(messages)  # arrival order must not matter
    await post_batch(shared, headers, messages)

    start, end = h0 + HOUR // 2, h0 + 4 * HOUR  # not aligned: the first bucket holds only its second half
    body = await get_json(
        shared, f"/api/v1/devices/{device_id}/aggregate?keys=temp,volt&start={start}&end={end}&interval=1h"
    )
    assert body["interval"] == "1h"
    assert set(body["series"]) == {"temp", "volt"}
    for key, series in points.items():
        want = expected_buckets(series, start, end, HOUR)
        assert len(want) == 3  # hours 0 (half), 1 and 3; hour 2 is empty and absent
        assert_buckets_equal(body["series"][key], want)

    # Seconds as the interval, and a subset of functions: only those come back.
    body = await get_json(
        shared,
        f"/api/v1/devices/{device_id}/aggregate?keys=temp&start={h0}&end={h0 + 5 * HOUR}&interval=1800&fn=count,last",
    )
    want = expected_buckets(points["temp"], h0, h0 + 5 * HOUR, HOUR // 2)
    assert [set(b) for b in body["series"]["temp"]] == [{"start", "count", "last"}] * len(want)
    assert [(b["start"], b["count"], b["last"]) for b in body["series"]["temp"]] == [
        (b["start"], b["count"], b["last"]) for b in want
    ]


async def test_aggregate_without_interval_is_one_bucket_over_the_range(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - 3 * HOUR
    series = [(base + i * 60_000, float(v)) for i, v in enumerate([5, -1, 7.5, 3, 3])]
    await post_batch(shared, headers, [{"ts": ts, "p": v, "q": v * 2} for ts, v in series])
    start, end = base - 1000, base + HOUR
    body = await get_json(shared, f"/api/v1/devices/{device_id}/aggregate?start={start}&end={end}")
    assert body["interval"] is None
    assert set(body["series"]) == {"p", "q"}  # every numeric key when none is named
    assert_buckets_equal(body["series"]["p"], expected_buckets(series, start, end, None))
    assert_buckets_equal(body["series"]["q"], expected_buckets([(t, v * 2) for t, v in series], start, end, None))
    assert body["series"]["p"][0]["start"] == ms_to_iso(start)
    # Nothing in the range: the key is there with no buckets.
    empty = await get_json(shared, f"/api/v1/devices/{device_id}/aggregate?keys=p&start={end}&end={end + HOUR}")
    assert empty["series"] == {"p": []}


async def test_text_series_are_left_out_of_aggregates_but_kept_in_reads(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    ts = now_ms() - HOUR
    await post_batch(shared, headers, [{"ts": ts, "mode": "eco", "t": 21.5, "pump": True}])
    body = await get_json(shared, f"/api/v1/devices/{device_id}/aggregate?range=2h")
    assert set(body["series"]) == {"t", "pump"}
    assert body["series"]["pump"][0]["max"] == 1.0
    body = await get_json(shared, f"/api/v1/devices/{device_id}/aggregate?keys=mode,t&range=2h")
    assert body["series"]["mode"] == []
    assert body["series"]["t"][0]["count"] == 1
    latest = await get_json(shared, f"/api/v1/devices/{device_id}/latest")
    assert latest["values"] == {
        "mode": {"ts": ms_to_iso(ts), "value": "eco"},
        "pump": {"ts": ms_to_iso(ts), "value": True},
        "t": {"ts": ms_to_iso(ts), "value": 21.5},
    }
    history = await get_json(shared, f"/api/v1/devices/{device_id}/history?range=2h")
    assert history["series"]["mode"] == [{"ts": ms_to_iso(ts), "value": "eco"}]
    latest = await get_json(shared, f"/api/v1/devices/{device_id}/latest?keys=pump")
    assert set(latest["values"]) == {"pump"}


async def test_booleans_come_back_as_booleans(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - HOUR
    await post_batch(shared, headers, [{"ts": base, "door": True}, {"ts": base + 1, "door": False}])
    latest = await get_json(shared, f"/api/v1/devices/{device_id}/latest")
    assert latest["values"]["door"]["value"] is False  # the newest by device time
    history = await get_json(shared, f"/api/v1/devices/{device_id}/history?range=2h")
    assert [p["value"] for p in history["series"]["door"]] == [True, False]


async def test_latest_follows_device_time_not_arrival(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - HOUR
    await post_batch(shared, headers, [{"ts": base + 1000, "t": 2}])
    await post_batch(shared, headers, [{"ts": base, "t": 1}])  # a late, older reading
    latest = await get_json(shared, f"/api/v1/devices/{device_id}/latest")
    assert latest["values"]["t"] == {"ts": ms_to_iso(base + 1000), "value": 2.0}


async def test_stats_over_a_range(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    now = now_ms()
    await post_batch(
        shared,
        headers,
        [{"ts": now - HOUR, "t": 10}, {"ts": now - 2 * HOUR, "t": 20}, {"ts": now - 30 * HOUR, "t": 1000}],
    )
    body = await get_json(shared, f"/api/v1/devices/{device_id}/stats?range=24h")
    assert body["stats"]["t"] == {"start": body["start"], "min": 10.0, "max": 20.0, "avg": 15.0, "count": 2}
    body = await get_json(shared, f"/api/v1/devices/{device_id}/stats")  # 24h by default
    assert body["stats"]["t"]["count"] == 2
    body = await get_json(shared, f"/api/v1/devices/{device_id}/stats?range=2d")
    assert body["stats"]["t"]["max"] == 1000.0 and body["stats"]["t"]["count"] == 3


# ---------------------------------------------------------------------------------------------- export


async def test_csv_export(shared: Running) -> None:
    device_id, headers = await new_device(shared)
    base = now_ms() - HOUR
    texts = ["a,b", 'say "hi"', "line\nbreak", "=1+1", "-3"]
    messages: list[dict[str, Any]] = [{"ts": base + i, "note": text} for i, text in enumerate(texts)]
    messages += [{"ts": base + 10, "t": 21.5, "ok": True}]
    await post_batch(shared, headers, messages)
    r = await shared.client.get(f"/api/v1/devices/{device_id}/telemetry/export?range=2h", headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert f'filename="{device_id}-telemetry.csv"' in r.headers["content-disposition"]
    assert r.text.startswith("device_id,key,ts,value\r\n")
    assert '"a,b"' in r.text and '"say ""hi"""' in r.text and '"=1+1"' in r.text  # quoted, formula defused
    rows = list(csv.reader(io.StringIO(r.text, newline="")))
    assert rows[0] == ["device_id", "key", "ts", "value"]
    expected = [[device_id, "note", ms_to_iso(base + i), text] for i, text in enumerate(texts)]
    expected += [[device_id, "ok", ms_to_iso(base + 10), "true"], [device_id, "t", ms_to_iso(base + 10), "21.5"]]
    assert rows[1:] == expected
    # Keys filter and an empty range.
    r = await shared.client.get(f"/api/v1/devices/{device_id}/telemetry/export?range=2h&keys=t", headers=ADMIN)
    assert list(csv.reader(io.StringIO(r.text)))[1:] == [[device_id, "t", ms_to_iso(base + 10), "21.5"]]
    r = await shared.client.get(f"/api/v1/devices/{device_id}/telemetry/export?range=1m", headers=ADMIN)
    assert r.text == "device_id,key,ts,value\r\n"
