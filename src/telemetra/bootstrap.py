"""First-start chores: the data directory and the generated admin key (SPEC §1)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from telemetra.config import Settings
from telemetra.domain.credentials import new_admin_key

ADMIN_KEY_FILE = "admin.key"


@dataclass(frozen=True)
class AdminKeys:
    keys: list[str]
    # A key made for this start, not yet on disk: ``keep`` writes it once the server has really started, so
    # a start that fails (port in use, no database) leaves no key behind for a server that never ran.
    generated: str | None
    path: Path

    def keep(self) -> bool:
        """Write the generated key (mode 0600); True when this start made it."""
        if self.generated is None:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_private(self.path, self.generated + "\n")
        return True


def admin_keys(settings: Settings) -> AdminKeys:
    """The configured admin keys; when there are none, the one kept in the data directory, or a new one."""
    path = settings.data_dir / ADMIN_KEY_FILE
    configured = settings.all_admin_keys
    if configured:
        return AdminKeys(configured, None, path)
    if path.exists():
        return AdminKeys([path.read_text().strip()], None, path)
    key = new_admin_key()
    return AdminKeys([key], key, path)


def ensure_admin_keys(settings: Settings) -> tuple[list[str], str | None]:
    """``admin_keys`` written at once (for callers that have nothing to wait for)."""
    found = admin_keys(settings)
    found.keep()
    return found.keys, found.generated


def _write_private(path: Path, content: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
