"""The collector's client id (mqtt/client_id.py): unguessable, the same after a restart, never shared by two
processes running at once on one data directory."""

from __future__ import annotations

import multiprocessing as mp
import re
import stat
from pathlib import Path

from telemetra.mqtt.client_id import CollectorClientId


def test_random_and_kept_across_restarts(tmp_path: Path) -> None:
    with CollectorClientId(tmp_path) as first:
        client_id = first.client_id
    assert re.fullmatch(r"telemetra-[0-9a-f]{24}", client_id), client_id
    with CollectorClientId(tmp_path) as again:
        assert again.client_id == client_id  # the broker's session under it is resumed
    with CollectorClientId(tmp_path / "elsewhere") as other:
        assert other.client_id != client_id
    path = tmp_path / "mqtt" / "collector-0.id"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "mqtt").stat().st_mode) == 0o700


def _hold(data_dir: Path, out: mp.Queue, release: mp.Event) -> None:  # type: ignore[type-arg]
    with CollectorClientId(data_dir) as lease:
        out.put((lease.slot, lease.client_id))
        release.wait(10)


def test_processes_running_at_once_get_different_ids(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    out, release = ctx.Queue(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, out, release))
    holder.start()
    try:
        slot, held = out.get(timeout=20)
        with CollectorClientId(tmp_path) as second:
            assert (slot, second.slot) == (0, 1)
            assert second.client_id != held
    finally:
        release.set()
        holder.join(10)
    # The first slot is free again once its process has gone: a restart resumes the same id.
    with CollectorClientId(tmp_path) as restarted:
        assert (restarted.slot, restarted.client_id) == (0, held)
