"""What ``GET /ota/manifest.json`` offers (paku's shape), decided in semantic-version order.

- Without ``current``: every firmware (of ``model``, if given), newest version first per model.
- With ``model`` and ``current``: only the newest version newer than ``current`` — one entry per
  hardware variant of that version — or nothing when ``current`` is the newest (or newer than all).
- "Stable" means "not a pre-release" in semver's sense (``1.3.0-rc.1`` is a pre-release). Pre-releases
  are offered only to a device that runs one (``current`` is a pre-release) or when asked
  (``prerelease=true``). iotmesh's ``is_stable`` star does not gate the manifest; ``stable=true`` asks
  for starred firmware only.
"""

from __future__ import annotations

from collections.abc import Sequence

import semver

from telemetra.domain.errors import InvalidInput
from telemetra.domain.versions import parse_version
from telemetra.storage.schema import FirmwareRow


def _key(row: FirmwareRow) -> tuple[semver.Version, int]:
    version = parse_version(row.version)
    assert version is not None, "stored versions are normalised semver"
    return version, row.id


def select(
    rows: Sequence[FirmwareRow],
    *,
    current: str | None,
    prerelease: bool = False,
    stable_only: bool = False,
    hardware: str | None = None,
) -> list[FirmwareRow]:
    candidates = [r for r in rows if (hardware is None or r.hardware == hardware) and (r.is_stable or not stable_only)]
    if current is None:
        if not prerelease:
            candidates = [r for r in candidates if not r.prerelease]
        newest_first = sorted(candidates, key=_key, reverse=True)
        return sorted(newest_first, key=lambda r: r.model)  # stable: newest first within each model
    running = parse_version(current)
    if running is None:
        raise InvalidInput(f"current {current!r} is not a semantic version", field="current")
    allow_pre = prerelease or running.prerelease is not None
    newer = [r for r in candidates if (allow_pre or not r.prerelease) and _key(r)[0].compare(running) > 0]
    if not newer:
        return []
    best = max(_key(r)[0] for r in newer)
    return sorted((r for r in newer if _key(r)[0].compare(best) == 0), key=lambda r: (r.hardware, -r.id))
