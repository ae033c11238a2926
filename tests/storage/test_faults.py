"""The outage state logs one line when the database goes and one when it is back, even when calls that
were already in flight finish after another one failed."""

from __future__ import annotations

import logging

import pytest

from telemetra.storage.faults import DatabaseLocation, DatabaseState


def _lines(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


def test_a_call_begun_before_the_outage_does_not_end_it(caplog: pytest.LogCaptureFixture) -> None:
    state = DatabaseState(DatabaseLocation("postgresql", "db:5432/telemetra"))
    caplog.set_level(logging.WARNING, logger="telemetra.storage.faults")
    in_flight = state.attempt()  # a commit that began while the database was still up
    state.failed(ConnectionRefusedError("connection refused"))
    state.failed(ConnectionRefusedError("connection refused"))
    state.succeeded(in_flight)  # it finished on its old connection: proves nothing about now
    assert not state.up
    state.failed(ConnectionRefusedError("connection refused"))
    assert _lines(caplog, "database unreachable") == 1
    assert _lines(caplog, "reachable again") == 0

    state.succeeded(state.attempt())  # positive control: a call begun after the outage ends it
    assert state.up
    assert _lines(caplog, "reachable again") == 1
    assert _lines(caplog, "database unreachable") == 1
    assert "after" in caplog.records[-1].getMessage() and "3 failed calls" in caplog.records[-1].getMessage()
