"""``check_document``: the values a permissive JSON parser lets through and the stores cannot take."""

from __future__ import annotations

from typing import Any

import pytest

from telemetra.domain.errors import InvalidInput
from telemetra.ingest.documents import INT64_MAX, INT64_MIN, check_document


def check(doc: Any) -> None:
    check_document(doc, max_depth=8, max_text=100, field="doc")


@pytest.mark.parametrize(
    ("doc", "where", "reason"),
    [
        ({"a": INT64_MAX + 1}, "doc.a", "64 bits"),
        ({"a": [0, INT64_MIN - 1]}, "doc.a[1]", "64 bits"),
        ({"a": float("nan")}, "doc.a", "finite"),
        ({"a": {"b": float("-inf")}}, "doc.a.b", "finite"),
        ({"a": "\ud800"}, "doc.a", "surrogates"),
        ({"\udfff": 1}, "doc", "surrogates"),
        ({"a": "x\x00"}, "doc.a", "NUL"),
    ],
)
def test_refused_with_the_place(doc: Any, where: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        check(doc)
    assert refused.value.field == where and reason in refused.value.reason


def test_what_fits_passes() -> None:
    check({"max": INT64_MAX, "min": INT64_MIN, "f": 1.5e308, "b": True, "t": "Küche ☃ 🌡", "n": None, "l": [1, "2"]})
