"""First-start chores: the data directory and the generated admin key (SPEC §1)."""

from __future__ import annotations

import os
from pathlib import Path

from telemetra.config import Settings
from telemetra.domain.credentials import new_admin_key

ADMIN_KEY_FILE = "admin.key"


def ensure_admin_keys(settings: Settings) -> tuple[list[str], str | None]:
    """The configured admin keys; when there are none, the one kept in the data directory, generated
    (0600) on the first start. Returns (keys, the key if it was generated just now)."""
    configured = settings.all_admin_keys
    if configured:
        return configured, None
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / ADMIN_KEY_FILE
    if path.exists():
        return [path.read_text().strip()], None
    key = new_admin_key()
    _write_private(path, key + "\n")
    return [key], key


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
