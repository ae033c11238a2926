"""The pure OTA rules: which versions are accepted and how they order, waves, the stable device hash,
pause criteria, reported status words, manifest selection, and the Range parser."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from telemetra.api.firmware_download import RangeRefused, parse_range
from telemetra.domain.errors import InvalidInput
from telemetra.domain.ota import (
    Criteria,
    assign_waves,
    check_waves,
    device_bucket,
    exponential_waves,
    reported_status,
)
from telemetra.domain.versions import normalize_version, parse_version, same_version
from telemetra.ota import manifest
from telemetra.storage.schema import FirmwareRow


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("1.2.3", "1.2.3"),
        ("1.2.3-rc.1", "1.2.3-rc.1"),
        ("1.2.3+build.7", "1.2.3+build.7"),
        ("v1.2.3", "1.2.3"),
        ("V2.0.0-beta", "2.0.0-beta"),
        ("1.2", "1.2.0"),
        ("1.2-rc.1", "1.2.0-rc.1"),
        (" 1.0.0 ", "1.0.0"),
    ],
)
def test_accepted_versions_normalise(given: str, stored: str) -> None:
    assert normalize_version(given) == stored


@pytest.mark.parametrize("given", ["1", "2024", "01.2.3", "1.2.3.4", "1.2.x", "latest", "", "v", "1.2.3-", "-1.2.3"])
def test_other_versions_are_refused_naming_the_field(given: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize_version(given)
    assert caught.value.field == "version"


def test_semantic_order_is_not_string_order() -> None:
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0", "2.0.0"]
    parsed = [parse_version(v) for v in ordered]
    assert all(a is not None and b is not None and a < b for a, b in itertools.pairwise(parsed))
    assert sorted(ordered) != ordered  # a string sort would get this wrong
    assert same_version("v1.2", "1.2.0") and not same_version("1.2.0", "1.2.1")
    assert same_version("weird", "weird") and not same_version(None, "1.0.0")


@given(st.lists(st.text(alphabet="abcdefghij0123456789-_", min_size=1, max_size=12), min_size=1, max_size=300))
def test_waves_hold_every_device_once_in_cumulative_order(ids: list[str]) -> None:
    waves = [5, 25, 100]
    assigned = assign_waves(ids, waves)
    assert sorted(d for d, _, _ in assigned) == sorted(set(ids))
    total = len(set(ids))
    for index, percent in enumerate(waves):
        upto = sum(1 for _, w, _ in assigned if w <= index)
        assert upto >= min(total, -(-total * percent // 100))  # at least ceil(percent of N)
    assert [p for _, _, p in assigned] == list(range(total))


def test_waves_are_stable_and_a_bigger_percentage_adds_devices() -> None:
    ids = [f"dev-{i:04d}" for i in range(1000)]
    first = {d for d, w, _ in assign_waves(ids, [10, 100]) if w == 0}
    again = {d for d, w, _ in assign_waves(list(reversed(ids)), [10, 100]) if w == 0}
    assert first == again and len(first) == 100
    ten = {d for d in ids if device_bucket(d) < 10}
    twenty = {d for d in ids if device_bucket(d) < 20}
    assert ten < twenty and 50 < len(ten) < 150  # about a tenth, and the 20 % includes the 10 %


def test_wave_lists_and_exponential_waves() -> None:
    assert check_waves([5, 25]) == [5, 25, 100]
    assert check_waves([100]) == [100]
    for bad in ([25, 5], [0, 100], [5, 5, 100], [101]):
        with pytest.raises(InvalidInput) as caught:
            check_waves(bad)
        assert caught.value.field == "waves"
    assert exponential_waves(1, 2) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert exponential_waves(10, 3) == [10, 30, 90, 100]


def test_pause_criteria_need_enough_finished_devices() -> None:
    c = Criteria(failure_percent=20, min_finished=10)
    assert not c.tripped(finished=9, failed=9)
    assert c.tripped(finished=10, failed=2)
    assert not c.tripped(finished=10, failed=1)
    assert not Criteria(failure_percent=None, min_finished=1).tripped(100, 100)


@pytest.mark.parametrize(
    ("word", "status"),
    [("downloading", "downloading"), ("success", "completed"), ("Verifying", "installing"), ("error", "failed")],
)
def test_reported_words_map_to_ours(word: str, status: str) -> None:
    assert reported_status(word) == status


def test_an_unknown_reported_word_is_refused() -> None:
    with pytest.raises(InvalidInput) as caught:
        reported_status("exploded")
    assert caught.value.field == "status"


def _fw(i: int, version: str, *, model: str = "m", hardware: str = "ESP32", stable: bool = False) -> FirmwareRow:
    parsed = parse_version(version)
    assert parsed is not None
    return FirmwareRow(
        id=i,
        model=model,
        version=version,
        hardware=hardware,
        is_stable=stable,
        prerelease=parsed.prerelease is not None,
    )


def test_manifest_offers_the_newest_newer_release_only() -> None:
    rows = [_fw(1, "1.0.0"), _fw(2, "1.2.0"), _fw(3, "1.10.0"), _fw(4, "2.0.0-rc.1")]
    assert [r.version for r in manifest.select(rows, current="1.2.0")] == ["1.10.0"]
    assert manifest.select(rows, current="1.10.0") == []
    assert manifest.select(rows, current="9.0.0") == []
    assert [r.version for r in manifest.select(rows, current="1.10.0", prerelease=True)] == ["2.0.0-rc.1"]
    assert [r.version for r in manifest.select(rows, current="2.0.0-alpha")] == ["2.0.0-rc.1"]
    assert [r.version for r in manifest.select(rows, current=None)] == ["1.10.0", "1.2.0", "1.0.0"]
    with pytest.raises(InvalidInput) as caught:
        manifest.select(rows, current="not-a-version")
    assert caught.value.field == "current"


@pytest.mark.parametrize(
    ("header", "span"),
    [("bytes=0-1023", (0, 1024)), ("bytes=1024-", (1024, 5000)), ("bytes=-100", (4900, 5000)),
     ("bytes=4000-99999", (4000, 5000)), ("bytes=-9999", (0, 5000)), ("BYTES = 5 - 9", (5, 10))],
)  # fmt: skip
def test_ranges(header: str, span: tuple[int, int]) -> None:
    assert parse_range(header, 5000) == span


@pytest.mark.parametrize(
    ("header", "status"),
    [("bytes=5000-", 416), ("bytes=-0", 416), ("bytes=9-3", 400), ("bytes=0-1,5-9", 400), ("items=0-1", 400),
     ("bytes=-", 400), ("bytes=a-b", 400)],
)  # fmt: skip
def test_bad_ranges(header: str, status: int) -> None:
    with pytest.raises(RangeRefused) as caught:
        parse_range(header, 5000)
    assert caught.value.status == status
